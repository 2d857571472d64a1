"""Data lent by the caller: batch iteration for data criteria, and BatchNorm recalibration after pruning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.importance import Batches
from acdc_prune.pruning.tracing import eval_mode


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (the CPU for a model without either)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _split(batch: Any, user: str) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Sequence) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1]
    raise PruningError(
        f"{user} takes batches that are input tensors (N, C, ...) or (input, target) pairs, "
        f"not {type(batch).__name__}"
    )


def iter_batches(
    batches: Batches | None, user: str, limit: int | None = None, device: torch.device | None = None
) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(input, target)`` pairs (target ``None`` for a lone tensor) from a caller's batches.

    Args:
        batches: an iterable of batches, a callable returning one (called once), or a single tensor;
            a batch is an input tensor (N, C, ...) or an ``(input, target)`` pair.
        user: what reads the batches, for error messages (``"taylor"``, ``"BatchNorm recalibration"``).
        limit: stop after this many batches; ``None`` reads them all.
        device: move inputs and tensor targets there.

    Raises:
        PruningError: ``batches`` is ``None`` or yields nothing, or a batch has another form.
    """
    if batches is None:
        raise PruningError(f"{user} needs training batches: pass batches=, an iterable of input tensors")
    source = [batches] if isinstance(batches, torch.Tensor) else batches() if callable(batches) else batches
    count = 0
    for batch in source:
        if limit is not None and count >= limit:
            break
        x, y = _split(batch, user)
        if device is not None:
            x = x.to(device)
            y = y.to(device) if isinstance(y, torch.Tensor) else y
        count += 1
        yield x, y
    if count == 0:
        raise PruningError(f"{user} got no batches: the batches it was given are empty")


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]


def recalibrate_batchnorm(model: nn.Module, batches: Batches, num_batches: int | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on training batches, in place.

    Pruning changes what each BatchNorm sees, so its running mean and variance go stale; this
    replaces them by the cumulative average (``momentum=None``) of the batch statistics over
    ``num_batches`` batches, with no gradient and no optimiser step. The model runs in eval mode
    except its BatchNorms (so dropout is off); every module's training flag and every BatchNorm's
    momentum are restored. Nothing else changes: weights, biases and other buffers stay bit-identical
    (``num_batches_tracked`` counts the batches used).

    Args:
        model: any ``nn.Module``; batches are moved to the device of its first parameter.
        batches: an iterable of input tensors (N, C, H, W) or ``(input, target)`` pairs, or a
            callable returning one; targets are ignored. Use training data only.
        num_batches: batches to use (``None``: every batch the iterable yields).

    Returns:
        The number of BatchNorm layers recalibrated (0, with nothing done, for a model without any).

    Raises:
        PruningError: the batches are missing, empty or malformed, or ``num_batches`` is not positive.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise PruningError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    norms = _batch_norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        try:
            for index, (x, _target) in enumerate(
                iter_batches(batches, "BatchNorm recalibration", num_batches, device)
            ):
                if index == 0:
                    for norm in norms:
                        norm.reset_running_stats()
                        norm.momentum = None
                        norm.train()
                model(x)
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
    return len(norms)
