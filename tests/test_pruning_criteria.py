"""Importance criteria against hand-computed scores, the criterion registry, and global ranking."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import (
    IMPORTANCES,
    Importance,
    PruningError,
    Redundancy,
    Taylor,
    check_importance,
    importance_names,
    plan_pruning,
    randomise_norm_statistics,
    register_importance,
)
from acdc_prune.pruning import importance as importance_module
from acdc_prune.pruning.importance import channel_scores
from acdc_prune.pruning.planner import analyse_model

X = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def _set(module: nn.Module, name: str, values: list[float]) -> None:
    with torch.no_grad():
        getattr(module, name).copy_(torch.tensor(values).view_as(getattr(module, name)))


def _scores_by_channel(model: nn.Module, layer: str, importance, x=X, **data) -> list[float]:
    """Scores of the channel sets produced by ``layer``, by its output channel."""
    graph = analyse_model(model, x).graph
    scores = channel_scores(graph, importance, model, **data)
    return [scores[graph.elements.find(e)] for e in graph.layers[layer].out_elems]


def _conv_bn(gammas: list[float]) -> nn.Sequential:
    """conv(1->4) -> BN -> ReLU -> conv(4->1), filter L1 norms 4, 1, 3, 2."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    _set(model[0], "weight", [4.0, -1.0, 3.0, 2.0])
    _set(model[1], "weight", gammas)
    return model.eval()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private copy of the criterion registry, so registrations do not leak into other tests."""
    monkeypatch.setattr(importance_module, "_REGISTRY", dict(importance_module._REGISTRY))


def test_builtin_criteria_are_registered_and_unknown_names_list_them() -> None:
    assert IMPORTANCES == ("l1", "l2", "bn_scale", "taylor", "redundancy")
    assert importance_names()[:5] == IMPORTANCES
    check_importance("taylor")
    with pytest.raises(
        PruningError, match="importance 'l3' is not one of l1, l2, bn_scale, taylor, redundancy"
    ):
        check_importance("l3")
    with pytest.raises(PruningError, match="importance 'slimming' is not one of l1, l2, bn_scale"):
        plan_pruning(_conv_bn([1, 1, 1, 1]), X, 0.5, importance="slimming")


def test_l1_and_l2_sum_filter_norms_over_a_residual_group() -> None:
    """Two convs whose outputs are added form one group: l1 sums both L1 norms, l2 takes the joint norm."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = (
                nn.Conv2d(2, 2, 1, bias=False),
                nn.Conv2d(2, 2, 1, bias=False),
                nn.Conv2d(2, 1, 1),
            )

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    model = Residual()
    _set(model.a, "weight", [1.0, -2.0, 0.0, 3.0])
    _set(model.b, "weight", [4.0, 0.0, 1.0, 1.0])
    x = torch.randn(1, 2, 3, 3)
    assert _scores_by_channel(model, "a", "l1", x) == pytest.approx([3 + 4, 3 + 2])
    assert _scores_by_channel(model, "a", "l2", x) == pytest.approx([math.sqrt(5 + 16), math.sqrt(9 + 2)])


def test_bn_scale_scores_are_the_following_norms_gammas() -> None:
    model = _conv_bn([0.5, -2.0, 0.1, 1.0])
    assert _scores_by_channel(model, "0", "bn_scale") == pytest.approx([0.5, 2.0, 0.1, 1.0])
    plan = plan_pruning(model, X, 0.5, importance="bn_scale")
    assert plan.layers["0"].kept_out == [1, 3]
    assert plan.importance == "bn_scale"
    assert plan_pruning(model, X, 0.5, importance="l1").layers["0"].kept_out == [0, 2]


def test_bn_scale_without_a_following_norm_uses_the_layers_normalised_l1() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 1, 1))
    _set(model[0], "weight", [4.0, -1.0, 3.0, 2.0])
    assert _scores_by_channel(model, "0", "bn_scale") == pytest.approx([1.6, 0.4, 1.2, 0.8])


def test_bn_scale_counts_only_the_normed_side_of_a_residual_add() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3)
            self.skip, self.head = nn.Conv2d(1, 3, 1), nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x))) + self.skip(x))

    model = Block().eval()
    _set(model.norm, "weight", [0.3, -0.7, 0.2])
    _set(model.skip, "weight", [9.0, 0.0, 5.0])
    assert _scores_by_channel(model, "conv", "bn_scale", torch.randn(1, 1, 3, 3)) == pytest.approx(
        [0.3, 0.7, 0.2]
    )


class TwoConvs(nn.Module):
    """conv1 (1->3, 1x1, no bias) -> optional ReLU -> conv2 (3->1, 1x1, no bias), weights w and v."""

    def __init__(self, relu: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False)
        self.act = relu or nn.Identity()
        self.drop = nn.Dropout(0.5)
        _set(self.conv1, "weight", [2.0, -1.0, 0.5])
        _set(self.conv2, "weight", [0.5, 3.0, -4.0])

    def forward(self, x):
        return self.conv2(self.drop(self.act(self.conv1(x))))


def _sum_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output * target).sum()


def test_taylor_matches_the_hand_computed_activation_times_gradient() -> None:
    """L = sum(t * sum_c v_c w_c x), so a_c * dL/da_c summed over positions is w_c v_c sum(t * x)."""
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(2, 1, 3, 3, generator=generator), torch.rand(2, 1, 3, 3, generator=generator))
        for _ in range(2)
    ]
    x_all, t_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    per_sample = (x_all * t_all).flatten(1).sum(1).abs().mean()
    expected = [abs(w * v) * float(per_sample) for w, v in [(2.0, 0.5), (-1.0, 3.0), (0.5, -4.0)]]
    model = TwoConvs().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = _scores_by_channel(model, "conv1", "taylor", batches=batches, loss_fn=_sum_loss)
    assert scores == pytest.approx(expected, rel=1e-5)
    assert model.training and model.drop.training, "training flags are restored"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    plan = plan_pruning(model, X, 0.34, importance="taylor", batches=lambda: iter(batches), loss_fn=_sum_loss)
    assert plan.layers["conv1"].kept_out == [1, 2]


def test_taylor_sees_activations_before_an_in_place_relu() -> None:
    batches = [(torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2)), torch.ones(4, 1, 3, 3))]
    inplace = _scores_by_channel(
        TwoConvs(nn.ReLU(inplace=True)), "conv1", Taylor(), batches=batches, loss_fn=_sum_loss
    )
    plain = _scores_by_channel(TwoConvs(nn.ReLU()), "conv1", Taylor(), batches=batches, loss_fn=_sum_loss)
    assert inplace == pytest.approx(plain)
    assert min(plain) > 0


def test_data_criteria_without_data_say_what_is_missing() -> None:
    model = TwoConvs()
    with pytest.raises(PruningError, match="taylor needs a loss: pass loss_fn="):
        plan_pruning(model, X, 0.5, importance="taylor", batches=[X])
    with pytest.raises(PruningError, match="taylor needs training batches: pass batches="):
        plan_pruning(model, X, 0.5, importance="taylor", loss_fn=_sum_loss)
    with pytest.raises(PruningError, match="redundancy needs training batches: pass batches="):
        plan_pruning(model, X, 0.5, importance="redundancy")
    with pytest.raises(PruningError, match=r"taylor needs \(input, target\) batches"):
        plan_pruning(model, X, 0.5, importance="taylor", batches=[X], loss_fn=_sum_loss)
    with pytest.raises(PruningError, match="redundancy got no batches"):
        plan_pruning(model, X, 0.5, importance="redundancy", batches=[])
    with pytest.raises(PruningError, match="input tensors .* or \\(input, target\\) pairs, not dict"):
        plan_pruning(model, X, 0.5, importance="redundancy", batches=[{"image": X}])
    with pytest.raises(PruningError, match="similarity 'euclid' is not one of pearson, cosine"):
        Redundancy(similarity="euclid")


def _three_maps() -> tuple[nn.Sequential, list[torch.Tensor]]:
    """Feature maps u, u + 3 (Pearson-identical to u) and u + 0.1 v (cosine-closest to u)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    _set(model[0], "weight", [1.0, 0.0, 1.0, 0.0, 1.0, 0.1])
    _set(model[0], "bias", [0.0, 3.0, 0.0])
    generator = torch.Generator().manual_seed(3)
    return model.eval(), [torch.randn(4, 2, 5, 5, generator=generator) for _ in range(3)]


def _similarity(maps: torch.Tensor, centred: bool) -> torch.Tensor:
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1).double()
    flat = flat - flat.mean(1, keepdim=True) if centred else flat
    unit = flat / flat.norm(dim=1, keepdim=True)
    return (unit @ unit.T).abs()


def test_redundancy_scores_follow_greedy_elimination_by_pearson_or_cosine() -> None:
    model, batches = _three_maps()
    with torch.no_grad():
        maps = torch.cat([model[0](b) for b in batches])
    pearson, cosine = _similarity(maps, centred=True), _similarity(maps, centred=False)
    # Pearson: 0 and 1 tie at similarity 1, the higher index (1) goes; then 2 goes against 0; 0 stays last.
    expected = [1.0, 1 - float(pearson[0, 1]), 1 - float(pearson[0, 2])]
    x = batches[0][:1]
    assert _scores_by_channel(model, "0", "redundancy", x, batches=batches) == pytest.approx(
        expected, abs=1e-6
    )
    # Cosine: u + 3 is far from u; 0 and 2 tie, 2 goes; then 1 goes against 0.
    expected = [1.0, 1 - float(cosine[0, 1]), 1 - float(cosine[0, 2])]
    assert _scores_by_channel(model, "0", Redundancy("cosine"), x, batches=batches) == pytest.approx(
        expected, abs=1e-6
    )
    assert plan_pruning(model, x, 0.34, importance="redundancy", batches=batches).layers["0"].kept_out == [
        0,
        2,
    ]
    cosine_plan = plan_pruning(model, x, 0.34, importance=Redundancy("cosine"), batches=batches)
    assert cosine_plan.layers["0"].kept_out == [0, 1]
    assert cosine_plan.importance == "redundancy(similarity=cosine)"


def test_redundancy_threshold_mode_is_capped_by_the_ratio() -> None:
    model, batches = _three_maps()
    x = batches[0][:1]
    strict = Redundancy(threshold=0.999)
    assert plan_pruning(model, x, 0.67, importance=strict, batches=batches).layers["0"].kept_out == [0, 2]
    loose = Redundancy(threshold=0.9)
    assert plan_pruning(model, x, 0.67, importance=loose, batches=batches).layers["0"].kept_out == [0]
    assert plan_pruning(model, x, 0.34, importance=loose, batches=batches).layers["0"].kept_out == [0, 2]


def test_redundancy_prunes_one_of_two_duplicated_filters_first() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight[4] = model[0].weight[1]
        model[0].bias[4] = model[0].bias[1]
    batches = [torch.randn(2, 1, 8, 8) for _ in range(2)]
    for similarity in ("pearson", "cosine"):
        plan = plan_pruning(model, batches[0], 0.17, importance=Redundancy(similarity), batches=batches)
        assert plan.layers["0"].kept_out == [0, 1, 2, 3, 5]


def test_registered_criteria_classes_functions_and_plain_callables_rank_channels(registry) -> None:
    @register_importance("reverse")
    class Reverse(Importance):
        """Scores channels by minus their index: the last ones stay."""

        def scores(self, graph, model, batches=None, loss_fn=None):
            return {
                graph.elements.find(e): -float(i)
                for name in graph.producers
                for i, e in enumerate(graph.layers[name].out_elems)
            }

    model = _conv_bn([1.0, 1.0, 1.0, 1.0])
    plan = plan_pruning(model, X, 0.5, importance="reverse")
    assert plan.layers["0"].kept_out == [0, 1]
    assert plan.importance == "reverse"
    assert "reverse" in importance_names()
    with pytest.raises(PruningError, match="'reverse' is already registered; pass replace=True"):
        register_importance("reverse", Reverse)

    def keep_two(graph, model, batches, loss_fn):
        """Vetoes channel 2 (inf) and ranks the others by index."""
        elements = graph.layers["0"].out_elems
        return {graph.elements.find(e): math.inf if i == 2 else float(i) for i, e in enumerate(elements)}

    assert plan_pruning(model, X, 0.75, importance=keep_two).layers["0"].kept_out == [2]
    register_importance("keep_two", keep_two)
    assert plan_pruning(model, X, 0.5, importance="keep_two").layers["0"].kept_out == [2, 3]
    assert plan_pruning(model, X, 0.5, importance=keep_two).importance == "keep_two"


def _two_groups(a_norms: list[float], b_norms: list[float]) -> nn.Sequential:
    """conv a (1->8) -> conv b (8->8) -> head: two groups of 8 with the given filter L1 norms."""
    model = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(a_norms).view(8, 1, 1, 1))
        model[1].weight.copy_(torch.tensor(b_norms).view(8, 1, 1, 1).expand(8, 8, 1, 1) / 8)
    return model


def _kept(plan, layer: str) -> int:
    entry = plan.layers.get(layer)
    return 8 if entry is None or entry.kept_out is None else len(entry.kept_out)


def test_global_scope_normalises_each_group_by_its_mean() -> None:
    """Group a's norms are 100x group b's; by group mean both rank alike and lose half each."""
    model = _two_groups([100.0 * i for i in range(1, 9)], [float(i) for i in range(1, 9)])
    plan = plan_pruning(model, X, 0.5, scope="global")
    assert plan.layers["0"].kept_out == [4, 5, 6, 7]
    assert plan.layers["1"].kept_out == [4, 5, 6, 7]
    assert plan.scope == "global" and plan.groups[0].key == "global"


def test_global_scope_respects_max_ratio_min_channels_and_round_to() -> None:
    model = _two_groups([float(i) for i in range(1, 9)], [1.0] * 7 + [10.0])
    # Normalised, a scores i / 4.5 and b 0.47 (seven sets) or 4.7: b's seven go first unless capped.
    free = plan_pruning(model, X, 0.5, scope="global", max_ratio=1.0)
    assert (_kept(free, "0"), _kept(free, "1")) == (6, 2)
    capped = plan_pruning(model, X, 0.5, scope="global", max_ratio=0.5)
    assert (_kept(capped, "0"), _kept(capped, "1")) == (4, 4)
    floor = plan_pruning(model, X, 0.5, scope="global", max_ratio=1.0, min_channels=6)
    assert (_kept(floor, "0"), _kept(floor, "1")) == (6, 6)
    # Widths go by 4: b's step (4 sets, normalised 0.47) fits the 6 to remove, a's next 4 would not.
    rounded = plan_pruning(model, X, 0.4, scope="global", max_ratio=1.0, round_to=4)
    assert (_kept(rounded, "0"), _kept(rounded, "1")) == (8, 4)


def test_global_scope_on_a_unet_keeps_limits_in_every_group() -> None:
    torch.manual_seed(0)
    model = randomise_norm_statistics(UNet2D(features=(8, 16, 32))).eval()
    plan = plan_pruning(model, torch.randn(1, 1, 32, 32), 0.6, scope="global", round_to=2, min_channels=4)
    assert all(
        g.kept >= 4 and g.kept % 2 == 0 and g.channels - g.kept <= math.floor(0.9 * g.channels)
        for g in plan.groups
    )
    removed = sum(g.channels - g.kept for g in plan.groups)
    assert (
        0.55 * sum(g.channels for g in plan.groups) <= removed <= 0.6 * sum(g.channels for g in plan.groups)
    )
    assert len({round(g.kept / g.channels, 2) for g in plan.groups}) > 1, "groups lose different fractions"


def test_bad_scope_limits_and_global_block_keys_are_refused() -> None:
    model = _conv_bn([1.0] * 4)
    with pytest.raises(PruningError, match="scope 'layer' is not one of block, global"):
        plan_pruning(model, X, 0.5, scope="layer")
    with pytest.raises(PruningError, match=r"max_ratio must be a number in \(0, 1\]"):
        plan_pruning(model, X, 0.5, scope="global", max_ratio=0)
    with pytest.raises(PruningError, match="min_channels must be a positive integer"):
        plan_pruning(model, X, 0.5, min_channels=0)
    with pytest.raises(PruningError, match="global scope takes one ratio"):
        plan_pruning(model, X, {"0": 0.5}, scope="global")


def test_ties_keep_the_lower_channel_index() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.Conv2d(4, 1, 1))
    nn.init.constant_(model[0].weight, 1.0)
    assert plan_pruning(model, X, 0.5).layers["0"].kept_out == [0, 1]
