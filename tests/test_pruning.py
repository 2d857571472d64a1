"""The pruning correctness contract on MONAI networks, the project's U-Nets and hand-made graphs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, SegResNet, UNet
from torch import nn

from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import (
    PruningPlan,
    apply_plan,
    max_deviation,
    plan_pruning,
    randomise_norm_statistics,
)
from acdc_prune.pruning.verify import mixes_channel_statistics

ATOL = 1e-5


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_one_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step on a random target; the loss is finite and at least one weight moves."""
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    loss = F.mse_loss(out, torch.zeros_like(out).normal_(generator=torch.Generator().manual_seed(3)))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def check_contract(
    model: nn.Module, x: torch.Tensor, ratios: dict | float = 0.5, **kwargs
) -> tuple[PruningPlan, nn.Module]:
    """Plan, rebuild and check: exact zeroed-channel equivalence (or, with GroupNorm/LayerNorm, shapes,
    forward and backward), a smaller network, untouched outputs, one training step."""
    torch.manual_seed(0)
    randomise_norm_statistics(model)
    model.eval()
    with torch.no_grad():
        original = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_pruning(model, x, ratios, **kwargs)
    pruned = apply_plan(model, plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "the model was modified"
    assert _params(pruned) < _params(model)
    pruned.eval()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == original.shape
    if mixes_channel_statistics(model):
        assert torch.isfinite(out).all()
    else:
        assert max_deviation(model, pruned, plan, x) <= ATOL
    _train_one_step(pruned, x)
    return plan, pruned


MODELS: dict[str, Callable[[], nn.Module]] = {
    "monai_unet_prelu_instance_residual": lambda: UNet(2, 1, 4, (8, 16, 32, 64), (2, 2, 2), num_res_units=2),
    "monai_unet_batch": lambda: UNet(2, 1, 4, (8, 16, 32), (2, 2), num_res_units=2, norm="batch"),
    "monai_unet_plain": lambda: UNet(2, 1, 4, (8, 16, 32), (2, 2), num_res_units=0, dropout=0.1),
    "basic_unet": lambda: BasicUNet(2, 1, 4, features=(8, 8, 16, 32, 64, 8)),
    "attention_unet": lambda: AttentionUnet(2, 1, 4, (8, 16, 32), (2, 2)),
    "dynunet": lambda: DynUNet(2, 1, 4, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 16, 32]),
    "dynunet_residual": lambda: DynUNet(
        2, 1, 4, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 16, 32], res_block=True
    ),
    "segresnet": lambda: SegResNet(2, init_filters=8, in_channels=1, out_channels=4),
    "unet2d": lambda: UNet2D(features=(8, 16, 32)),
    "unet2d_residual_instance_prelu": lambda: UNet2D(
        features=(8, 16, 32), residual=True, norm="instance", act="prelu", dropout=0.1
    ),
    "unet2d_group_bilinear": lambda: UNet2D(features=(8, 16, 32), norm="group", upsample="nontrainable"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_contract_on_networks(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    plan, _ = check_contract(model, torch.randn(2, 1, 32, 32))
    assert plan.layers


def test_contract_on_unet2d_with_odd_input_size_traces_concrete_shapes() -> None:
    """34x34 is not a multiple of the total stride: the decoder resizes, a shape-dependent branch."""
    torch.manual_seed(0)
    plan, pruned = check_contract(UNet2D(features=(8, 16, 32)), torch.randn(1, 1, 34, 34))
    assert plan.trace == "concrete"
    with torch.no_grad():
        assert pruned.eval()(torch.randn(1, 1, 40, 48)).shape == (1, 4, 40, 48)


def test_contract_on_the_classic_basic_unet_design() -> None:
    """The ~44M-parameter design of the original work, at 50% and with block-wise ratios."""
    torch.manual_seed(0)
    model = UNet2D.classic()
    assert _params(model) == 43_886_340
    plan, pruned = check_contract(model, torch.randn(2, 1, 32, 32), {"default": 0.5, "encoders.0": 0.25})
    assert plan.layers["encoders.0.conv1.conv"].kept_out is not None
    assert len(plan.layers["encoders.0.conv1.conv"].kept_out) == 48
    assert len(plan.layers["encoders.1.conv1.conv"].kept_out) == 64
    assert plan.layers["head"].kept_out is None
    assert _params(pruned) < 0.3 * _params(model)


def test_output_layer_keeps_all_outputs_and_input_channels_stay() -> None:
    model = MODELS["monai_unet_batch"]()
    plan = plan_pruning(model, torch.randn(1, 1, 32, 32), 0.9)
    first = plan.layers["model.0.conv.unit0.conv"]
    assert first.kept_in is None
    pruned = apply_plan(model, plan)
    with torch.no_grad():
        assert pruned.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_ratio_zero_returns_an_identical_network() -> None:
    model = randomise_norm_statistics(MODELS["basic_unet"]()).eval()
    x = torch.randn(1, 1, 32, 32)
    plan = plan_pruning(model, x, {"default": 0.0})
    pruned = apply_plan(model, plan)
    assert plan.layers == {}
    assert pruned is not model
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), pruned.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), model(x))


# Hand-made graphs: each exercises one coupling rule.


class ChainedConcat(nn.Module):
    """cat(cat(a, b), c) where c itself consumes cat(a, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.c = nn.Conv2d(14, 10, 3, padding=1)
        self.head = nn.Conv2d(24, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ab = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(torch.cat((ab, self.c(ab)), dim=1))


class ConcatTwice(nn.Module):
    """The same tensor concatenated twice, and along the channel axis given as -3."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU())
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.head(torch.cat([a, a], dim=-3))


class ResidualIdentity(nn.Module):
    """Residual add with an identity skip, an in-place add and a non-affine norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        y = self.block2(x)
        y += x
        return self.head(y)


class Depthwise(nn.Module):
    """Depthwise conv, pointwise conv, a depthwise conv with multiplier 2 and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Conv2d(8, 16, 1)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.grouped = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, groups=4), nn.PReLU(16))
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.dw2(self.pw(self.dw(self.stem(x))))))


class AttentionGate(nn.Module):
    """x * sigmoid(psi(x)) with a one-channel gate broadcast over x's channels, and a GLU split."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.psi = nn.Conv2d(8, 1, 1)
        self.glu = nn.Conv2d(8, 12, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x * torch.sigmoid(self.psi(x))
        value, gate = self.glu(x).chunk(2, dim=1)
        return self.head(value * gate.sigmoid())


class ClassicStyleResize(nn.Module):
    """A two-level U-Net with the classic shape test: resize the up-sampled map only when needed."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.bottom = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Dropout2d(0.2), nn.LeakyReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        up = self.up(self.bottom(self.pool(skip)))
        if up.shape[-2:] != skip.shape[-2:]:
            up = F.interpolate(up, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat((skip, up), dim=1)))


class Classifier(nn.Module):
    """Conv features, flatten of a 2x2 map into a linear layer, then a linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(32, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(torch.flatten(self.features(x), 1))))


class TransposedGrouped(nn.Module):
    """A grouped transposed conv between plain convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2, groups=4)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.stem(x)))


class ChannelLastLayerNorm(nn.Module):
    """LayerNorm over channels after a permute to channel-last, then back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(y)


class GroupNormNet(nn.Module):
    """GroupNorm with 4 groups on 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU())
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


GRAPHS = [
    ChainedConcat,
    ConcatTwice,
    ResidualIdentity,
    Depthwise,
    AttentionGate,
    ClassicStyleResize,
    TransposedGrouped,
]


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: g.__name__)
def test_contract_on_hand_made_graphs(graph: type[nn.Module]) -> None:
    torch.manual_seed(0)
    check_contract(graph(), torch.randn(2, 1, 12, 12))


def test_concat_offsets_map_to_the_consumer_inputs() -> None:
    torch.manual_seed(0)
    plan, _ = check_contract(ChainedConcat(), torch.randn(1, 1, 8, 8))
    a, b, c = (plan.layers[n].kept_out for n in ("a", "b.0", "c"))
    assert plan.layers["c"].kept_in == a + [8 + i for i in b]
    assert plan.layers["head"].kept_in == a + [8 + i for i in b] + [14 + i for i in c]


def test_the_same_tensor_concatenated_twice_is_pruned_once() -> None:
    torch.manual_seed(0)
    plan, _ = check_contract(ConcatTwice(), torch.randn(1, 1, 8, 8))
    kept = plan.layers["a.0"].kept_out
    assert plan.layers["a.1"].kept_out == kept
    assert plan.layers["head"].kept_in == kept + [8 + i for i in kept]


def test_residual_add_couples_both_sides() -> None:
    torch.manual_seed(0)
    plan, _ = check_contract(ResidualIdentity(), torch.randn(1, 1, 8, 8))
    kept = plan.layers["stem.0"].kept_out
    assert len(kept) == 4
    for name in ("block.0", "block.1", "block2.0", "block2.1"):
        assert plan.layers[name].kept_out == kept
    assert plan.layers["head"].kept_in == kept
    assert [g.layers for g in plan.groups][0] == ["stem.0", "block.0", "block2.0"]


def test_depthwise_and_grouped_convs_keep_whole_groups() -> None:
    torch.manual_seed(0)
    plan, pruned = check_contract(Depthwise(), torch.randn(1, 1, 8, 8))
    kept = plan.layers["stem"].kept_out
    assert plan.layers["dw.0"].kept_in == plan.layers["dw.0"].kept_out == kept
    assert pruned.dw[0].groups == len(kept)
    dw2 = plan.layers["dw2"]
    assert dw2.kept_out == [2 * i + j for i in dw2.kept_in for j in range(2)]
    assert pruned.dw2.groups == len(dw2.kept_in)
    # Each of the 4 groups of `grouped` reads 4 of `pw`'s channels, so `pw` loses whole blocks of 4.
    grouped = pruned.grouped[0]
    assert (grouped.groups, grouped.in_channels, grouped.out_channels) == (2, 16, 8)
    assert len(plan.layers["pw"].kept_out) == 8


def test_attention_gate_keeps_its_broadcast_channel() -> None:
    torch.manual_seed(0)
    plan, _ = check_contract(AttentionGate(), torch.randn(1, 1, 8, 8))
    assert "psi" not in plan.layers or plan.layers["psi"].kept_out is None
    value_gate = plan.layers["glu"].kept_out
    assert value_gate[: len(value_gate) // 2] == [i - 6 for i in value_gate[len(value_gate) // 2 :]]


def test_shape_dependent_control_flow_is_traced_with_concrete_shapes() -> None:
    torch.manual_seed(0)
    plan, pruned = check_contract(ClassicStyleResize(), torch.randn(1, 1, 13, 13))
    assert plan.trace == "concrete"
    assert plan.layers["dec"].kept_in == plan.layers["enc.0"].kept_out + [
        8 + i for i in plan.layers["up"].kept_out
    ]


def test_linear_layers_after_flatten() -> None:
    torch.manual_seed(0)
    plan, _ = check_contract(Classifier(), torch.randn(2, 1, 8, 8))
    kept = plan.layers["features.0"].kept_out
    assert plan.layers["fc"].kept_in == [4 * c + k for c in kept for k in range(4)]
    assert plan.layers["out"].kept_out is None


def test_channel_last_layer_norm_and_group_norm_train() -> None:
    torch.manual_seed(0)
    plan, pruned = check_contract(ChannelLastLayerNorm(), torch.randn(2, 1, 8, 8))
    assert pruned.norm.normalized_shape == (4,)
    plan, pruned = check_contract(GroupNormNet(), torch.randn(2, 1, 8, 8), 0.6)
    assert pruned.stem[1].num_channels % pruned.stem[1].num_groups == 0
    assert pruned.stem[1].num_channels == 8


def test_round_to_keeps_widths_at_a_multiple() -> None:
    torch.manual_seed(0)
    model = UNet2D(features=(16, 32, 64))
    plan, pruned = check_contract(model, torch.randn(1, 1, 32, 32), 0.3, round_to=8)
    assert plan.round_to == 8
    for module in pruned.modules():
        if isinstance(module, nn.Conv2d) and module is not pruned.head:
            assert module.out_channels % 8 == 0
    assert pruned.encoders[0].conv1.conv.out_channels == 16
    assert pruned.encoders[1].conv1.conv.out_channels == 24
