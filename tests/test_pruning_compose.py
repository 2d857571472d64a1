"""Plan composition: prune(prune(A, p1), p2) == prune(A, compose(p1, p2)), exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, UNet
from torch import nn

from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import (
    PruningError,
    PruningPlan,
    apply_plan,
    compose,
    plan_pruning,
    randomise_norm_statistics,
)

NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "unet2d": lambda: UNet2D(features=(8, 16, 32)),
    "unet2d_residual": lambda: UNet2D(features=(8, 16, 32), residual=True, norm="instance", act="prelu"),
    "basic_unet": lambda: BasicUNet(2, 1, 4, features=(8, 8, 16, 32, 64, 8)),
    "monai_unet_residual": lambda: UNet(2, 1, 4, (8, 16, 32, 64), (2, 2, 2), num_res_units=2),
    "attention_unet": lambda: AttentionUnet(2, 1, 4, (8, 16, 32), (2, 2)),
}


def _assert_same_network(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key, value in state_a.items():
        assert value.shape == state_b[key].shape, key
        assert torch.equal(value, state_b[key]), key
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_composed_plan_equals_sequential_pruning(name: str) -> None:
    torch.manual_seed(0)
    original = randomise_norm_statistics(NETWORKS[name]()).eval()
    x = torch.randn(1, 1, 32, 32)
    first = plan_pruning(original, x, 0.3)
    child = apply_plan(original, first)
    second = plan_pruning(child, x, 0.4, importance="l2", scope="global")
    grandchild = apply_plan(child, second)
    composed = compose(first, second)
    _assert_same_network(grandchild, apply_plan(original, composed), x)
    # From a fresh instance with A's weights, and through JSON.
    fresh = NETWORKS[name]()
    fresh.load_state_dict(original.state_dict())
    _assert_same_network(grandchild, apply_plan(fresh, PruningPlan.from_json(composed.to_json())), x)


def test_a_child_of_a_child_records_one_plan_and_its_history() -> None:
    torch.manual_seed(1)
    original = randomise_norm_statistics(UNet2D(features=(8, 16, 32))).eval()
    x = torch.randn(1, 1, 32, 32)
    plans, model = [], original
    for ratios in ({"encoders": 0.25}, 0.25, {"decoders": 0.5}):
        plans.append(plan_pruning(model, x, ratios))
        model = apply_plan(model, plans[-1])
    once = compose(compose(plans[0], plans[1]), plans[2])
    _assert_same_network(model, apply_plan(original, once), x)
    assert compose(plans[0], compose(plans[1], plans[2])).layers == once.layers, "composition is associative"
    assert [step["ratios"] for step in once.steps] == [
        {"encoders": 0.25},
        {"default": 0.25},
        {"decoders": 0.5},
    ]
    assert once.input_shapes == [[1, 1, 32, 32]]
    by_layers = {tuple(g.layers): g for g in once.groups}
    first_encoder = by_layers[("encoders.0.conv1.conv",)]
    assert (first_encoder.channels, first_encoder.kept) == (8, 5)
    for name, layer in once.layers.items():
        weight = layer.shapes.get("weight")
        if weight is not None:
            assert list(original.get_submodule(name).weight.shape) == weight[0]
            assert list(model.get_submodule(name).weight.shape) == weight[1]


def test_composing_plans_of_other_networks_is_refused() -> None:
    torch.manual_seed(2)
    original = UNet2D(features=(8, 16, 32)).eval()
    x = torch.randn(1, 1, 32, 32)
    first = plan_pruning(original, x, 0.5)
    unrelated = plan_pruning(original, x, 0.25)
    with pytest.raises(PruningError, match="it was made for another network"):
        compose(first, unrelated)
    other = plan_pruning(UNet(2, 1, 4, (8, 16, 32), (2, 2)), x, 0.5)
    with pytest.raises(PruningError, match="cannot compose a plan for a UNet2D with one for a UNet"):
        compose(first, other)
