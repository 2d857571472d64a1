"""Pruning plans: ratios and prefixes, importance, JSON round trip, rebuilding from a fresh model, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from acdc_prune.errors import AcdcPruneError
from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import (
    LayerPlan,
    PruningError,
    PruningPlan,
    apply_plan,
    filter_norms,
    max_deviation,
    plan_pruning,
    randomise_norm_statistics,
    ratio_prefixes,
)
from acdc_prune.pruning.planner import matches, ratio_for

X = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def _unet2d(seed: int = 0) -> UNet2D:
    torch.manual_seed(seed)
    return randomise_norm_statistics(UNet2D(features=(8, 16, 32)), seed).eval()


def test_prefixes_match_on_dotted_boundaries_and_the_longest_wins() -> None:
    assert matches("encoders.1", "encoders.1.conv.0")
    assert matches("encoders.1", "encoders.1")
    assert not matches("encoders.1", "encoders.10.conv")
    ratios = {"default": 0.25, "encoders": 0.4, "encoders.1": 0.5}
    assert ratio_for("encoders.1.conv1.conv", ratios) == ("encoders.1", 0.5)
    assert ratio_for("encoders.10.conv1.conv", ratios) == ("encoders", 0.4)
    assert ratio_for("decoders.0.conv1.conv", ratios) == ("default", 0.25)
    assert ratio_for("decoders.0.conv1.conv", {}) == ("default", 0.0)


def test_block_wise_ratios_apply_per_block_and_unlisted_blocks_follow_default() -> None:
    model = _unet2d()
    plan = plan_pruning(model, X, {"encoders.1": 0.5, "decoders": 0.25})
    assert len(plan.layers["encoders.1.conv1.conv"].kept_out) == 8
    assert len(plan.layers["decoders.0.conv1.conv"].kept_out) == 6
    assert "encoders.0.conv1.conv" not in plan.layers
    assert plan.layers["encoders.2.conv1.conv"].kept_out is None
    assert len(plan.layers["encoders.2.conv1.conv"].kept_in) == 8
    keys = {tuple(g.layers): g.key for g in plan.groups}
    assert keys[("encoders.1.conv1.conv",)] == "encoders.1"
    assert keys[("encoders.0.conv1.conv",)] == "default"


def test_lowest_norm_filters_go_and_l2_can_differ_from_l1() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        # One weight per filter: norms 4, 1, 3, 2.5, so filters 1 and 3 go.
        model[0].weight.copy_(torch.tensor([4.0, 1.0, 3.0, 2.5]).view(4, 1, 1, 1))
    plan = plan_pruning(model, torch.randn(1, 1, 4, 4), 0.5)
    assert plan.layers["0"].kept_out == [0, 2]
    assert plan.layers["2"].kept_in == [0, 2]

    # Filter 0 has L1 2 and L2 1.41, filter 1 has L1 1.5 and L2 1.5: the criteria disagree.
    wide = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 1, 1))
    with torch.no_grad():
        wide[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.5, 0.0]]).view(2, 2, 1, 1))
    x = torch.randn(1, 2, 4, 4)
    assert plan_pruning(wide, x, 0.5, importance="l1").layers["0"].kept_out == [0]
    assert plan_pruning(wide, x, 0.5, importance="l2").layers["0"].kept_out == [1]


def test_filter_norms_and_ratio_prefixes_for_inspection() -> None:
    model = _unet2d()
    norms = filter_norms(model)
    assert norms["encoders.0.conv1.conv"].shape == (8,)
    assert torch.allclose(norms["head"], model.head.weight.abs().sum(dim=(1, 2, 3)))
    assert torch.allclose(filter_norms(model, "l2")["head"], model.head.weight.flatten(1).norm(dim=1))
    prefixes = ratio_prefixes(model, X)
    assert {"encoders", "encoders.1", "bottleneck", "decoders.0.conv2.conv"} <= set(prefixes)
    assert "head" not in prefixes


def test_plan_json_round_trip_and_rebuild_from_a_fresh_model(tmp_path) -> None:
    model = _unet2d()
    plan = plan_pruning(model, X, {"default": 0.5, "decoders.0": 0.25})
    path = plan.save(tmp_path / "plan" / "plan.json")
    text = path.read_text()
    assert '"kept_out": [' in text and "\n" in text
    assert json.loads(text)["format"] == "acdc-prune-plan"
    loaded = PruningPlan.load(path)
    assert loaded == plan
    assert loaded.layers["encoders.1.conv1.conv"].shapes["weight"] == [[16, 8, 3, 3], [8, 4, 3, 3]]

    pruned = apply_plan(model, plan)
    state = pruned.state_dict()
    fresh = apply_plan(UNet2D(features=(8, 16, 32)), loaded)
    fresh.load_state_dict(state)
    fresh.eval()
    pruned.eval()
    with torch.no_grad():
        assert torch.equal(fresh(X), pruned(X))
    assert max_deviation(model, fresh, loaded, X) <= 1e-5


def test_plans_of_monai_paths_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = UNet(2, 1, 3, (8, 16, 32), (2, 2), num_res_units=1)
    plan = plan_pruning(model, X, {"default": 0.5, "model.1.submodule": 0.25})
    assert PruningPlan.load(plan.save(tmp_path / "p.json")) == plan
    fresh = apply_plan(UNet(2, 1, 3, (8, 16, 32), (2, 2), num_res_units=1), plan)
    fresh.load_state_dict(apply_plan(model, plan).state_dict())


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), float("inf"), "0.5", True, None])
def test_bad_ratio_values_are_refused(value) -> None:
    with pytest.raises(PruningError, match="must be a number in \\[0, 1\\)"):
        plan_pruning(_unet2d(), X, {"default": value})


def test_unknown_ratio_keys_list_the_valid_prefixes() -> None:
    with pytest.raises(
        PruningError, match="'encoder.1' matches no prunable layer; valid prefixes: encoders, "
    ) as info:
        plan_pruning(_unet2d(), X, {"encoder.1": 0.5})
    assert "decoders.0" in str(info.value)
    assert isinstance(info.value, AcdcPruneError)
    with pytest.raises(PruningError, match="'head' matches no prunable layer"):
        plan_pruning(_unet2d(), X, {"head": 0.5})
    with pytest.raises(PruningError, match="'encoders.3' matches no prunable layer"):
        plan_pruning(_unet2d(), X, {"encoders.3": 0.5})


def test_bad_importance_round_to_and_example_inputs_are_refused() -> None:
    with pytest.raises(PruningError, match="importance 'l3'"):
        plan_pruning(_unet2d(), X, 0.5, importance="l3")
    with pytest.raises(PruningError, match="round_to"):
        plan_pruning(_unet2d(), X, 0.5, round_to=0)
    with pytest.raises(PruningError, match=r"cannot run on the example input of shape \(1, 3, 32, 32\)"):
        plan_pruning(_unet2d(), torch.randn(1, 3, 32, 32), 0.5)
    with pytest.raises(PruningError, match="tensor or a sequence of tensors"):
        plan_pruning(_unet2d(), [[1.0]], 0.5)


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot record it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.conv(x)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return F.relu(x)
        return x


class ToNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * float(y.detach().numpy().std())


def test_untraceable_operations_name_the_module_and_the_op() -> None:
    with pytest.raises(PruningError, match=r"module `gate` \(Gate\): bool\(\) of a tensor"):
        plan_pruning(DataDependent(), torch.randn(1, 1, 8, 8), 0.5)
    with pytest.raises(PruningError, match=r"cannot trace the model's own forward: `numpy`"):
        plan_pruning(ToNumpy(), torch.randn(1, 1, 8, 8), 0.5)


def test_plans_applied_to_the_wrong_model_are_refused() -> None:
    plan = plan_pruning(_unet2d(), X, 0.5)
    with pytest.raises(PruningError, match="the plan is for a UNet2D, not for this UNet"):
        apply_plan(UNet(2, 1, 4, (8, 16, 32), (2, 2)), plan)
    with pytest.raises(PruningError, match=r"'encoders.0.conv1.conv.weight' has shape \[16, 1, 3, 3\]"):
        apply_plan(UNet2D(features=(16, 32, 64)), plan)
    with pytest.raises(PruningError, match="has no module 'encoders.2.conv1.conv'"):
        apply_plan(UNet2D(features=(8, 16)), plan)
    tampered = PruningPlan.from_dict(plan.to_dict())
    tampered.layers["head"] = LayerPlan("Linear", None, [0], {})
    with pytest.raises(PruningError, match="module 'head' is a Conv2d, the plan expects a Linear"):
        apply_plan(_unet2d(), tampered)


def test_malformed_plan_files_are_refused(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PruningError, match="cannot read the pruning plan"):
        PruningPlan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"layers": {}}')
    with pytest.raises(PruningError, match="not an acdc-prune pruning plan"):
        PruningPlan.load(tmp_path / "other.json")
    data = plan_pruning(_unet2d(), X, 0.5).to_dict()
    data["layers"]["head"] = {"type": "Conv2d", "kept_out": [3, 1], "kept_in": None, "shapes": {}}
    with pytest.raises(PruningError, match="unsorted, repeated or negative"):
        PruningPlan.from_dict(data)
    del data["layers"]
    with pytest.raises(PruningError, match="malformed"):
        PruningPlan.from_dict(data)


def test_group_sizes_follow_floor_of_the_ratio_and_keep_one_channel() -> None:
    model = nn.Sequential(nn.Conv2d(1, 10, 1), nn.Conv2d(10, 3, 1))
    x = torch.randn(1, 1, 2, 2)
    assert len(plan_pruning(model, x, 0.3).layers["0"].kept_out) == 7
    assert len(plan_pruning(model, x, 0.99).layers["0"].kept_out) == 1
    assert math.isclose(plan_pruning(model, x, 0.3).groups[0].ratio, 0.3)
