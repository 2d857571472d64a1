"""The reference forward's conv and linear outputs, reused by graph replays that call them identically."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

#: Forwards that compute a pure function of the input and the parameters: the costly layers. A
#: subclass overriding ``forward`` is not listed, so it is always run.
_PURE_FORWARDS = frozenset(
    cls.forward
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.Linear,
    )
)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter; ``None`` for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


@dataclass
class _Call:
    """One recorded call: its arguments, their version counters, and a copy of its output."""

    args: tuple
    kwargs: dict[str, Any]
    versions: list[int]
    output: torch.Tensor
    output_version: int

    def matches(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether ``args``/``kwargs`` equal the recorded ones bit for bit (values, shapes, strides).

        Leaves are compared, not containers: fx hands arguments over in its own immutable ones, and
        the listed forwards read the same values however they are passed. The recorded arguments are
        the model's own tensors, kept by reference: a version counter that moved means the model
        changed one in place afterwards, so it no longer shows what the call saw.
        """
        if _version(self.output) != self.output_version:
            return False
        recorded = pytree.tree_leaves((self.args, self.kwargs))
        given = pytree.tree_leaves((args, kwargs))
        if len(recorded) != len(given):
            return False
        tensors = iter(self.versions)
        for old, new in zip(recorded, given, strict=True):
            if not isinstance(old, torch.Tensor):
                if isinstance(new, torch.Tensor) or old != new:
                    return False
                continue
            version = next(tensors)
            if (
                not isinstance(new, torch.Tensor)
                or _version(old) != version
                or (old.dtype, old.device, old.shape, old.stride())
                != (new.dtype, new.device, new.shape, new.stride())
                or not torch.equal(old, new)
            ):
                return False
        return True


class RecordedCalls:
    """The outputs of a model's convs and linears on one forward, for replays of its traced graph.

    Verifying a trace runs the model and then its graph on the same input; both call the same
    layers on the same values wherever the graph is right. Recording the costly layers' outputs in
    the first run lets the replay take them instead of computing them again, which halves the time
    of a trace. This changes no result: a layer is skipped only when its forward is a pure function
    (stock ``torch.nn`` conv and linear forwards, no hooks on the module) and the replay gives it
    arguments equal bit for bit to the recorded ones; anywhere the graph departs from the model, the
    arguments differ and the layer runs.

    Only CPU calls are recorded: the recorded arguments and outputs stay in memory until the trace
    is done (as autograd keeps activations in training; HoVerNet at 256x256 peaks at 3.1 GB instead
    of 1.0 GB), which an accelerator's memory may not hold and whose fast forward needs no help.

    Args:
        model: the model whose forward :meth:`recording` observes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: dict[nn.Module, list[_Call]] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record every call of the model's pure convs and linears while the context is open."""
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            yield  # a global hook could alter any layer's output: nothing is recorded
            return
        hooks = [
            module.register_forward_hook(self._record, with_kwargs=True)
            for module in self.model.modules()
            if type(module).forward in _PURE_FORWARDS
            and not (module._forward_hooks or module._forward_pre_hooks)
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.device.type != "cpu":
            return
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        versions = [_version(tensor) for tensor in tensors]
        if None in versions or _version(output) is None:
            return  # inference tensors: a later in-place change could not be detected
        if any(tensor.layout != torch.strided for tensor in tensors):
            return  # sparse and other layouts have no strides to compare
        # A copy, since the model may change its output in place afterwards (an in-place ReLU).
        copy = output.detach().clone()
        self.calls.setdefault(module, []).append(_Call(args, kwargs, versions, copy, _version(copy)))

    def replay(self) -> ReplayCalls:
        """A fresh view for one replay: each recorded output is handed out at most once per replay."""
        return ReplayCalls(self)


class ReplayCalls:
    """Calls a module for one graph replay, taking a recorded output where the arguments match.

    Args:
        recorded: the calls recorded on the reference forward.
    """

    def __init__(self, recorded: RecordedCalls) -> None:
        self.recorded = recorded
        self.used: set[int] = set()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``module(*args, **kwargs)``, or the recorded output of an identical call.

        A recorded output goes to one consumer only: two graph nodes sharing a tensor would see
        each other's in-place changes.
        """
        for call in self.recorded.calls.get(module, ()):
            if id(call) not in self.used and call.matches(args, kwargs):
                self.used.add(id(call))
                return call.output
        return module(*args, **kwargs)
