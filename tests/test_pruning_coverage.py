"""Pruning coverage: MONAI segmentation networks in 2D and 3D, opaque blocks, custom handlers, valid plans."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import _pytree as pytree

from acdc_prune.pruning import (
    LayerHandler,
    OpaqueBlock,
    PerChannelHandler,
    PruningError,
    apply_plan,
    max_deviation,
    plan_pruning,
    randomise_norm_statistics,
    register_layer_handler,
    unregister_layer_handler,
)
from acdc_prune.pruning.verify import changes_channel_statistics
from acdc_prune.pruning.zoo import ZOO

ATOL = 1e-5

CASES = [
    pytest.param(net, dims, id=f"{net.name}-{dims}d")
    for net in ZOO
    for dims in net.dims
    if dims not in net.large_only
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small networks plan fastest on one thread, and one thread keeps the timing steady on a busy CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _leaves(value: object) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def check_contract(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> tuple:
    """Plan and rebuild at ``ratio``: the rebuilt output equals the original with removed channels zeroed
    (within ATOL, relative to outputs larger than 1), or, where a pruned GroupNorm/LayerNorm changes its
    statistics, has the same shapes and is finite. Returns the plan and the pruned network."""
    randomise_norm_statistics(model).eval()
    with torch.no_grad():
        original = _leaves(model(x))
    plan = plan_pruning(model, x, ratio)
    pruned = apply_plan(model, plan).eval()
    with torch.no_grad():
        out = _leaves(pruned(x))
    assert [o.shape for o in out] == [o.shape for o in original]
    assert all(torch.isfinite(o).all() for o in out)
    if not changes_channel_statistics(model, plan):
        scale = max(1.0, *(o.abs().max().item() for o in original))
        assert max_deviation(model, pruned, plan, x) <= ATOL * scale
    return plan, pruned


@pytest.mark.parametrize(("net", "dims"), CASES)
def test_every_monai_network_prunes_exactly(net, dims) -> None:
    if not net.available():
        pytest.skip(f"{net.name} needs {net.requires}")
    torch.manual_seed(0)
    model = net.build(dims, True)
    x = torch.randn(*net.input_shape(dims, True), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.fx cannot trace")  # no opaque fallback on any of them
        plan, pruned = check_contract(model, x)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert plan.layers


def _zoo(name: str):
    return next(net for net in ZOO if net.name == name)


@pytest.mark.parametrize(("name", "encoder"), [("UNETR", "vit."), ("SwinUNETR", "swinViT.")])
def test_transformers_keep_attention_and_mlp_widths_and_prune_their_convs(name, encoder) -> None:
    pytest.importorskip("einops")
    net = _zoo(name)
    model = net.build(2, True)
    plan, _ = check_contract(model, torch.randn(*net.input_shape(2, True)))
    assert not [layer for layer in plan.layers if layer.startswith(encoder)]
    assert any(layer.startswith("encoder") for layer in plan.layers)
    assert any(layer.startswith("decoder") for layer in plan.layers)


class Strict(nn.Module):
    """A block torch.fx cannot trace: it checks its input's type, which a proxy fails."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("Strict takes a tensor")
        return self.conv(x)


class AroundStrict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.strict = Strict(8)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.mid(self.strict(F.relu(self.stem(x)))))))


def test_an_untraceable_block_is_opaque_and_pruned_around() -> None:
    model = AroundStrict()
    with pytest.warns(UserWarning, match=r"cannot trace into 1 module\(s\) \(`strict`: TypeError"):
        plan, pruned = check_contract(model, torch.randn(1, 1, 16, 16))
    assert set(plan.layers) == {"mid", "bn", "head"}  # stem feeds the block: its outputs stay
    assert pruned.strict.conv.weight.shape == (8, 8, 3, 3)
    assert pruned.mid.out_channels == 8 and pruned.head.in_channels == 8


def test_a_registered_opaque_block_is_kept_whole_without_a_warning() -> None:
    register_layer_handler(Strict, OpaqueBlock())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "torch.fx cannot trace")
            plan, _ = check_contract(AroundStrict(), torch.randn(1, 1, 16, 16))
    finally:
        unregister_layer_handler(Strict)
    assert set(plan.layers) == {"mid", "bn", "head"}
    assert plan.trace == "symbolic"


class ChannelScale(nn.Module):
    """A learnt per-channel scale: unknown to the engine until a handler is registered for it."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.weight = nn.Parameter(torch.rand(num_channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, *([1] * (x.ndim - 2)))


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = ChannelScale(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.stem(x)))


def test_a_user_handler_makes_a_custom_layer_prunable() -> None:
    with pytest.raises(PruningError, match="matches no prunable layer"):
        plan_pruning(Scaled(), torch.randn(1, 1, 8, 8), {"stem": 0.5})  # the scale pins its channels
    register_layer_handler(ChannelScale, PerChannelHandler("scale", "num_channels"))
    try:
        plan, pruned = check_contract(Scaled(), torch.randn(1, 1, 8, 8))
    finally:
        unregister_layer_handler(ChannelScale)
    assert plan.layers["scale"].kept_out == plan.layers["stem"].kept_out
    assert pruned.scale.weight.shape == (4,) and pruned.scale.num_channels == 4


class _BrokenHandler(LayerHandler):
    def analyse(self, ctx, node, module, source):
        return ctx.chan(source).elems[99]


def test_a_failing_handler_becomes_a_pruning_error_naming_the_module() -> None:
    register_layer_handler(ChannelScale, _BrokenHandler())
    try:
        with pytest.raises(
            PruningError, match=r"channel analysis fails at `scale` \(ChannelScale\): IndexError"
        ):
            plan_pruning(Scaled(), torch.randn(1, 1, 8, 8), 0.5)
    finally:
        unregister_layer_handler(ChannelScale)


class _RandomNet(nn.Module):
    """A random graph of convs, norms, residual adds, concatenations, splits and grouped convs."""

    def __init__(self, ops: list[tuple]) -> None:
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleList()
        widths = [4]
        self.layers.append(nn.Conv2d(1, 4, 3, padding=1))
        for kind, a, b, width in ops:
            src, other = widths[a % len(widths)], widths[b % len(widths)]
            widths.append(self._add(kind, src, other, width))
        self.head = nn.Conv2d(widths[-1], 3, 1)

    def _add(self, kind: str, src: int, other: int, width: int) -> int:
        """Append the layer of one op (``nn.Identity`` for parameter-free ops); its output width."""
        layer, out = {
            "conv": (nn.Conv2d(src, width, 3, padding=1), width),
            "grouped": (nn.Conv2d(src, src * 2, 3, padding=1, groups=src), src * 2),
            "deconv": (nn.ConvTranspose2d(src, width, 3, padding=1), width),
            "bn": (nn.BatchNorm2d(src), src),
            "gn": (nn.GroupNorm(2 if src % 2 == 0 else 1, src), src),
            "prelu": (nn.PReLU(src), src),
        }.get(kind, (nn.Identity(), src + other if kind == "cat" else src))
        if kind == "split":
            out = src - src // 2 if src > 1 else src
        self.layers.append(layer)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [self.layers[0](x)]
        for (kind, a, b, _width), layer in zip(self.ops, self.layers[1:], strict=True):
            src, other = values[a % len(values)], values[b % len(values)]
            if kind == "add":
                y = src + other if src.shape == other.shape else src
            elif kind == "cat":
                y = torch.cat([src, other], dim=1)
            elif kind == "split":
                y = src[:, src.shape[1] // 2 :] if src.shape[1] > 1 else src
            else:
                y = layer(src)
            values.append(F.relu(y) if kind in ("conv", "deconv") else y)
        return self.head(values[-1])


_OPS = st.tuples(
    st.sampled_from(["conv", "grouped", "deconv", "bn", "gn", "prelu", "add", "cat", "split"]),
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(1, 8),
)


@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(_OPS, min_size=1, max_size=10),
    ratio=st.floats(0.0, 0.95),
    round_to=st.sampled_from([1, 2, 4]),
)
def test_plans_are_never_rejected_by_apply_plan(ops, ratio, round_to) -> None:
    torch.manual_seed(0)
    model = randomise_norm_statistics(_RandomNet(ops)).eval()
    x = torch.randn(1, 1, 8, 8)
    plan = plan_pruning(model, x, ratio, round_to=round_to)
    pruned = apply_plan(model, plan)
    if not changes_channel_statistics(model, plan):
        assert max_deviation(model, pruned, plan, x) <= ATOL
    assert all(
        len(layer.kept_out or [0]) > 0 and len(layer.kept_in or [0]) > 0 for layer in plan.layers.values()
    )
