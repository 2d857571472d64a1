"""Block outputs of an unpruned network, replayed into pruned copies that equal it up to a layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from acdc_prune.errors import AcdcPruneError
from acdc_prune.pruning.tracing import detached_copy


def _first_shape(args: tuple) -> tuple[int, ...] | None:
    tensors = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    return tuple(tensors[0].shape) if tensors else None


class BlockOutputs:
    """The outputs of a network's blocks over a fixed series of forward passes, recorded once and
    replayed into copies of the network, so that a copy computes only from its first changed layer on.

    A sensitivity analysis runs many copies of one network, each with one block pruned, on the same
    recalibration batches and validation slices. Everything that runs before the pruned block's
    first layer computes what the unpruned network computed: the same layers on the same inputs.
    :meth:`record` keeps the output of every listed block during the unpruned network's passes;
    :meth:`replay` compares a copy's parameters and buffers with the recorded network's, finds the
    first layer (in execution order) whose tensors differ, and answers every block that ends before
    that layer from the recording instead of running it. The replayed passes give bit for bit what
    running the copy would give, and on leaving, the skipped blocks' buffers are set to what the
    recorded network held at the end of its passes (BatchNorm statistics re-estimated on the same
    inputs are the same statistics).

    The copy must be called exactly as the recorded network was: the same inputs, in the same
    order, with the same modules in eval or training mode, and layer names kept (as ``apply_plan``
    keeps them). A module whose own parameters are read by another (tied or functional use) counts
    as changed from the first layer on, so nothing is skipped for it.

    Args:
        blocks: names of submodules whose outputs are kept (``encoders.0``...); memory grows with the
            size of their outputs times the number of calls.
    """

    def __init__(self, blocks: Sequence[str]) -> None:
        self.blocks = list(blocks)
        self.outputs: dict[str, list[Any]] = {}
        self.shapes: dict[str, list[tuple[int, ...] | None]] = {}
        self.first_call: dict[str, int] = {}
        self.block_end: dict[str, int] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.final_buffers: dict[str, torch.Tensor] = {}

    @property
    def recorded(self) -> bool:
        """Whether :meth:`record` has run."""
        return bool(self.state)

    @contextmanager
    def record(self, model: nn.Module) -> Iterator[None]:
        """Record the blocks' outputs of every forward pass of ``model`` made inside the context.

        Positions in execution order are counted from the start of each pass of ``model`` itself, so
        they mean the same in every pass.

        Args:
            model: the unpruned network, on the device and in the memory format the copies will use.

        Raises:
            AcdcPruneError: a listed block is not a submodule of ``model``.
        """
        modules = dict(model.named_modules())
        missing = [name for name in self.blocks if name not in modules]
        if missing:
            raise AcdcPruneError(f"blocks {', '.join(missing)} are not submodules of the network")
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.state, self.first_call, self.block_end = {}, {}, {}
        self.outputs = {name: [] for name in self.blocks}
        self.shapes = {name: [] for name in self.blocks}
        position = [0]

        def enter(name: str) -> Any:
            def hook(module: nn.Module, args: tuple) -> None:
                if module is model:
                    position[0] = 0
                position[0] += 1
                self.first_call.setdefault(name, position[0])
                if name in self.shapes:
                    self.shapes[name].append(_first_shape(args))

            return hook

        def leave(name: str) -> Any:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                position[0] += 1
                self.block_end[name] = max(self.block_end.get(name, 0), position[0])
                self.outputs[name].append(detached_copy(output))

            return hook

        with ExitStack() as hooks:
            for name, module in modules.items():
                hooks.callback(module.register_forward_pre_hook(enter(name)).remove)
                if name in self.outputs:
                    hooks.callback(module.register_forward_hook(leave(name)).remove)
            yield
        self.final_buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
        self.state = state

    def skippable(self, model: nn.Module) -> list[str]:
        """The blocks of ``model`` that end before its first layer differing from the recorded network.

        Args:
            model: a copy of the recorded network (same layer names), possibly pruned.
        """
        state = model.state_dict()
        changed = set(state.keys() ^ self.state.keys())
        changed |= {
            key
            for key in state.keys() & self.state.keys()
            if state[key].shape != self.state[key].shape or not torch.equal(state[key], self.state[key])
        }
        owners = {key.rpartition(".")[0] for key in changed}
        first_changed = min((self.first_call.get(owner, 0) for owner in owners), default=None)
        ends = [
            name
            for name in self.blocks
            if name in self.block_end and (first_changed is None or self.block_end[name] < first_changed)
        ]
        return [name for name in ends if not any(name.startswith(f"{outer}.") for outer in ends)]

    @contextmanager
    def replay(self, model: nn.Module) -> Iterator[list[str]]:
        """Answer the skippable blocks of ``model`` from the recording while inside the context.

        Yields the names of the blocks skipped. On leaving, their buffers are the recorded network's
        at the end of its passes, and every recorded output must have been replayed.

        Raises:
            AcdcPruneError: :meth:`record` has not run, or ``model`` was called differently from the
                recorded network (another number of passes or other input shapes).
        """
        if not self.recorded:
            raise AcdcPruneError("replay needs a recording: run the unpruned network inside record() first")
        skipped = self.skippable(model)
        modules = dict(model.named_modules())
        calls = dict.fromkeys(skipped, 0)

        def replayed(name: str) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                index = calls[name]
                if index >= len(self.outputs[name]) or self.shapes[name][index] != _first_shape(args):
                    raise AcdcPruneError(
                        f"block '{name}' was called differently from the recorded network (call "
                        f"{index + 1}); replay needs the same inputs in the same order"
                    )
                calls[name] = index + 1
                return detached_copy(self.outputs[name][index])

            return forward

        for name in skipped:
            modules[name].forward = replayed(name)
        try:
            yield skipped
        finally:
            for name in skipped:
                del modules[name].forward
        unused = [name for name in skipped if calls[name] != len(self.outputs[name])]
        if unused:
            raise AcdcPruneError(
                f"blocks {', '.join(unused)} were called fewer times than in the recording; replay "
                "needs the same inputs in the same order"
            )
        with torch.no_grad():
            for key, buffer in model.named_buffers():
                if any(key.startswith(f"{name}.") for name in skipped):
                    buffer.copy_(self.final_buffers[key])
