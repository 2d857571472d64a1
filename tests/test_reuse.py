"""Replaying an unpruned network's block outputs into pruned copies: exactness, what is skipped, misuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from acdc_prune.errors import AcdcPruneError
from acdc_prune.experiments.reuse import BlockOutputs
from acdc_prune.pruning import apply_plan, plan_pruning


class SkipNet(nn.Module):
    """Two encoder blocks, a decoder reading both through a concatenation, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.third = nn.Sequential(nn.Conv2d(14, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        b = self.second(a)
        return self.head(self.third(torch.cat([a, b], dim=1)))


BLOCKS = ["first", "second", "third"]


def _net() -> SkipNet:
    torch.manual_seed(0)
    net = SkipNet().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net


def _passes(net: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Training-mode BatchNorm passes (statistics change), then eval-mode outputs."""
    with torch.no_grad():
        net.train()
        for x in inputs:
            net(x)
        net.eval()
        return [net(x) for x in inputs]


@pytest.mark.parametrize(("block", "skipped"), [("first", []), ("second", ["first"]), ("third", BLOCKS[:2])])
def test_a_pruned_copy_replays_the_blocks_before_its_first_changed_layer_and_ends_as_if_run(block, skipped):
    inputs = [torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    net = _net()
    pruned = apply_plan(net, plan_pruning(net, inputs[0], {block: 0.5}))
    outputs = BlockOutputs(BLOCKS)
    reference = copy.deepcopy(net)
    with outputs.record(reference):
        _passes(reference, inputs)
    replayed, computed = copy.deepcopy(pruned), copy.deepcopy(pruned)
    with outputs.replay(replayed) as names:
        got = _passes(replayed, inputs)
    assert names == skipped
    for value, expected in zip(got, _passes(computed, inputs), strict=True):
        assert torch.equal(value, expected)
    states = zip(replayed.state_dict().values(), computed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in states)


def test_an_unchanged_copy_skips_every_block_followed_by_a_layer_and_a_changed_first_layer_none():
    net, x = _net(), torch.randn(1, 1, 8, 8)
    outputs = BlockOutputs(BLOCKS)
    with outputs.record(net), torch.no_grad():
        net(x)
    assert outputs.skippable(copy.deepcopy(net)) == BLOCKS
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed.first[0].weight[0, 0, 0, 0] += 1.0
    assert outputs.skippable(changed) == []
    head_changed = copy.deepcopy(net)
    with torch.no_grad():
        head_changed.head.bias[0] += 1.0
    assert outputs.skippable(head_changed) == BLOCKS


def test_misuse_is_one_line_and_leaves_the_network_whole():
    net, x = _net(), torch.randn(1, 1, 8, 8)
    with pytest.raises(AcdcPruneError, match="needs a recording"), BlockOutputs(BLOCKS).replay(net):
        pass
    with (
        pytest.raises(AcdcPruneError, match="nowhere are not submodules"),
        BlockOutputs(["nowhere"]).record(net),
    ):
        pass
    outputs = BlockOutputs(BLOCKS)
    with outputs.record(net), torch.no_grad():
        expected = net(x)
    other = copy.deepcopy(net)
    called_differently = pytest.raises(AcdcPruneError, match="block 'first' was called differently")
    with called_differently, torch.no_grad(), outputs.replay(other):
        other(torch.randn(1, 1, 10, 10))
    with pytest.raises(AcdcPruneError, match="called fewer times"), outputs.replay(other):
        pass
    with torch.no_grad():
        assert torch.equal(other(x), expected)
