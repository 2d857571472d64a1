"""Budget targets (MACs, parameters, latency) and BatchNorm recalibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import (
    PruningError,
    PruningPlan,
    apply_plan,
    plan_to_budget,
    randomise_norm_statistics,
    recalibrate_batchnorm,
)

X = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def phantom_unet() -> UNet2D:
    torch.manual_seed(0)
    return randomise_norm_statistics(UNet2D(features=(8, 16, 32, 64))).eval()


@pytest.mark.parametrize("target", [0.5, 0.2])
def test_mac_budget_on_the_phantom_unet_is_met_within_two_percent(phantom_unet, target) -> None:
    result = plan_to_budget(phantom_unet, X, target)
    assert target * 0.98 <= result.reached_fraction <= target
    pruned = apply_plan(phantom_unet, result.plan)
    assert result.macs_before == _macs(phantom_unet, X)
    assert result.macs_after == _macs(pruned, X), "MACs are counted exactly, without a rebuild"
    assert (result.params_before, result.params_after) == (_params(phantom_unet), _params(pruned))
    assert result.plan.budget == {"metric": "macs", "target": target, "reached": result.reached_fraction}
    assert result.plan.scope == "global"
    assert all(g.channels - g.kept <= 0.9 * g.channels for g in result.plan.groups)
    assert PruningPlan.from_json(result.plan.to_json()) == result.plan


def test_parameter_budget_on_basic_unet_with_rounding() -> None:
    torch.manual_seed(0)
    model = BasicUNet(2, 1, 4, features=(8, 8, 16, 32, 64, 8)).eval()
    x = torch.randn(1, 1, 32, 32)
    result = plan_to_budget(model, x, 0.3, metric="params", round_to=2, min_channels=2)
    assert 0.3 * 0.98 <= result.reached_fraction <= 0.3
    pruned = apply_plan(model, result.plan)
    assert result.params_after == _params(pruned)
    assert result.macs_after == _macs(pruned, x)
    assert all(g.kept >= 2 and (g.kept % 2 == 0 or g.kept == g.channels) for g in result.plan.groups)


def test_mac_budget_on_basic_unet_is_met_within_two_percent() -> None:
    torch.manual_seed(1)
    model = BasicUNet(2, 1, 4, features=(8, 8, 16, 32, 64, 8)).eval()
    result = plan_to_budget(model, torch.randn(1, 1, 32, 32), 0.4)
    assert 0.4 * 0.98 <= result.reached_fraction <= 0.4


def test_latency_budget_bisects_on_the_measured_times(phantom_unet) -> None:
    """A deterministic stand-in for a clock: seconds proportional to the parameter count."""
    calls = []

    def measure(model: nn.Module) -> float:
        calls.append(1)
        return _params(model) * 1e-9

    result = plan_to_budget(phantom_unet, X, 0.5, metric="latency", measure=measure)
    assert 0.49 <= result.reached_fraction <= 0.5
    assert result.latency_before == pytest.approx(_params(phantom_unet) * 1e-9)
    assert result.latency_after == pytest.approx(result.params_after * 1e-9)
    assert len(calls) <= 16


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, True, "0.5", float("nan")])
def test_invalid_targets_are_refused(phantom_unet, target) -> None:
    with pytest.raises(PruningError, match=r"must be a fraction in \(0, 1\] of the original's macs"):
        plan_to_budget(phantom_unet, X, target)


def test_unreachable_targets_say_what_the_smallest_plan_keeps(phantom_unet) -> None:
    with pytest.raises(
        PruningError, match=r"target 0.001 of macs cannot be met: the smallest plan keeps 0\.0\d\d"
    ):
        plan_to_budget(phantom_unet, X, 0.001)
    with pytest.raises(PruningError, match="budget metric 'flops' is not one of macs, params, latency"):
        plan_to_budget(phantom_unet, X, 0.5, metric="flops")
    with pytest.raises(PruningError, match="pass measure="):
        plan_to_budget(phantom_unet, X, 0.5, metric="latency")


def test_a_target_of_one_prunes_nothing(phantom_unet) -> None:
    result = plan_to_budget(phantom_unet, X, 1.0)
    assert result.plan.layers == {} and result.reached_fraction == 1.0


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2),
    )
    return randomise_norm_statistics(model)


def test_recalibration_changes_running_statistics_and_nothing_else() -> None:
    model = _bn_net().train()
    model[1].momentum = 0.3
    batches = [torch.randn(4, 1, 8, 8) for _ in range(5)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, batches, num_batches=3) == 2
    after = model.state_dict()
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in before.items():
        if key.endswith(statistics):
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key
    assert int(after["1.num_batches_tracked"]) == 3
    assert model.training and model[3].training and model[1].momentum == 0.3
    # The cumulative average over 3 batches is the mean of their batch means (eval mode: dropout off).
    with torch.no_grad():
        means = torch.stack([model[0](b).mean((0, 2, 3)) for b in batches[:3]])
    assert torch.allclose(after["1.running_mean"], means.mean(0), atol=1e-5)


def test_recalibration_without_batchnorm_or_batches() -> None:
    assert (
        recalibrate_batchnorm(
            nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2)), [torch.randn(1, 1, 2, 2)]
        )
        == 0
    )
    model = _bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="BatchNorm recalibration got no batches"):
        recalibrate_batchnorm(model, [])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "nothing reset"
    with pytest.raises(PruningError, match="num_batches must be a positive integer"):
        recalibrate_batchnorm(model, [torch.randn(1, 1, 2, 2)], num_batches=0)


def test_recalibration_after_pruning_takes_input_target_pairs_and_a_callable(phantom_unet) -> None:
    pruned = apply_plan(phantom_unet, plan_to_budget(phantom_unet, X, 0.5).plan)
    batches = [(torch.randn(2, 1, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)) for _ in range(2)]
    assert recalibrate_batchnorm(pruned, lambda: iter(batches)) == sum(
        isinstance(m, nn.BatchNorm2d) for m in pruned.modules()
    )
    with torch.no_grad():
        out = pruned(batches[0][0])
    assert torch.isfinite(F.softmax(out, 1)).all()


def test_budget_removes_the_least_important_channel_even_where_another_saves_more() -> None:
    """Filter L1 norms, normalised by their layer's mean: 0.25 for conv ``0``'s first filter, 0.36
    for conv ``2``'s; a channel of conv ``2`` saves 3x the MACs of one of conv ``0``. Ranked per
    unit of cost, conv ``2``'s filter would go first; by importance, conv ``0``'s does."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    model.append(nn.Conv2d(4, 8, 3, padding=1))
    with torch.no_grad():
        for conv, first in ((model[0], 0.2), (model[2], 0.3)):
            conv.weight.copy_(torch.sign(conv.weight) / conv.weight[0].numel())  # every filter's L1 is 1
            conv.weight[0] *= first
    per_pixel = 1 * 4 + 9 * 4 * 4 + 9 * 4 * 8  # MACs of convs 0, 2 and 4 at every position
    one_channel = (1 * 3 + 9 * 3 * 4 + 9 * 4 * 8) / per_pixel  # conv 0 keeps 3 filters: 0.915
    result = plan_to_budget(model.eval(), X, one_channel, tolerance=0.2)  # either filter would do
    kept_out = {name: layer.kept_out for name, layer in result.plan.layers.items()}
    assert kept_out.get("0") == [1, 2, 3]
    assert kept_out.get("2") in (None, [0, 1, 2, 3])
