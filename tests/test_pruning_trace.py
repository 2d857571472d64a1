"""Trace verification: each conv computed once per trace, in-place changes respected, wrong graphs refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from acdc_prune.pruning import (
    PruningError,
    apply_plan,
    max_deviation,
    plan_pruning,
    randomise_norm_statistics,
)
from acdc_prune.pruning.tracing import trace_model


class CountConvolutions(TorchDispatchMode):
    """Counts the convolutions actually computed while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Plain(nn.Module):
    """Traced symbolically: the graph is replayed to verify it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class ShapeDependent(Plain):
    """Traced with concrete shapes (a shape-dependent branch): the trace itself evaluates the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.shape[-1] % 2:
            y = nn.functional.pad(y, (0, 1, 0, 1))
        return self.head(y)


class CalledTwice(Plain):
    """One conv called twice on one input, one result changed in place: each call needs its own output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv[0](x), self.conv[0](x)
        a.relu_()
        return self.head(a - b)


class ChangesInPlace(nn.Module):
    """Changes a conv's input and output in place after the call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(x)
        y = self.conv1(h)
        h.mul_(2)
        y.relu_()
        return self.head(y + h)


class TypeCheck(Plain):
    """Takes another path when its value is a proxy: no torch.fx graph reproduces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if isinstance(y, torch.Tensor):
            y = y * 2
        return self.head(y)


class MatchesAChangedInput(nn.Module):
    """The graph doubles conv1's input before the call, the model after it: the model's input tensor,
    as changed later, equals the graph's, but conv1 saw another value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(x)
        if not isinstance(h, torch.Tensor):
            h = h * 2
        y = self.conv1(h)
        if isinstance(h, torch.Tensor):
            h.mul_(2)
        return y


@pytest.mark.parametrize(
    ("model", "mode", "computed"),
    [
        (Plain(), "symbolic", 2),
        (ShapeDependent(), "concrete", 2),
        (CalledTwice(), "symbolic", 3),
        # conv1's input changed after its call, so its record cannot vouch for the replay: it runs again
        (ChangesInPlace(), "symbolic", 4),
    ],
)
def test_each_conv_is_computed_once_per_trace_unless_its_record_went_stale(model, mode, computed) -> None:
    model = randomise_norm_statistics(model).eval()
    x = torch.randn(1, 1, 9, 9)
    with CountConvolutions() as counter:
        traced = trace_model(model, (x,))
    assert traced.mode == mode
    assert counter.count == computed
    plan = plan_pruning(model, x, 0.5)
    assert max_deviation(model, apply_plan(model, plan), plan, x) <= 1e-5


@pytest.mark.parametrize(("model", "where"), [(TypeCheck(), "head"), (MatchesAChangedInput(), "conv1")])
def test_a_graph_that_departs_from_the_model_is_refused(model, where) -> None:
    with pytest.raises(
        PruningError,
        match=rf"the torch.fx graph of {type(model).__name__} does not reproduce its output on the example "
        rf"input \(max deviation [0-9.e+-]+\); the first difference is at `{where}` \(Conv2d\)",
    ):
        plan_pruning(model.eval(), torch.randn(1, 1, 8, 8), 0.5)
