"""Data criteria: first-order Taylor (|a * dL/da|) and feature-map redundancy, over the caller's batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from acdc_prune.pruning.calibration import iter_batches, model_device
from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.groups import ChannelGraph
from acdc_prune.pruning.importance import (
    Batches,
    ChannelGroup,
    Importance,
    LossFn,
    channel_groups,
    reduce_to_sets,
    register_importance,
)
from acdc_prune.pruning.tracing import eval_mode


def _check_batches(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PruningError(f"num_batches must be a positive integer, got {value!r}")
    return value


def _channels_first(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A producer's output as (N, C, positions): linears hold channels on the last dim, others on dim 1."""
    moved = output.movedim(-1, 1) if isinstance(module, nn.Linear) else output
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


@contextmanager
def _forward_hooks(graph: ChannelGraph, hook: Callable[[str], Callable]) -> Iterator[None]:
    """Register ``hook(name)`` as a forward hook on every producing layer for the duration."""
    handles = [graph.layers[name].module.register_forward_hook(hook(name)) for name in graph.producers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Taylor(Importance):
    """First-order Taylor importance (Molchanov et al. 2019): the loss change a channel's removal causes.

    For every output channel ``c`` of every producing layer, the score is the mean over all samples
    of ``|sum over positions of a * dL/da|`` (``a``: the layer's output), summed over the layers of
    a channel set. The model runs in eval mode (BatchNorm uses its running statistics: in train
    mode a following BatchNorm makes the loss invariant to a channel's scale, so the sum vanishes;
    dropout is off); training flags are restored. Gradients are taken with ``torch.autograd.grad``
    for the activations only, so no parameter's ``.grad`` or value changes.

    Args:
        num_batches: batches read from the caller's iterable (at most).
    """

    name = "taylor"

    def __init__(self, num_batches: int = 8) -> None:
        self.num_batches = _check_batches(num_batches)

    def scores(self, graph, model, batches=None, loss_fn=None) -> dict[int, float]:
        """Accumulate |a * dL/da| per channel over the batches; needs (input, target) batches and a loss."""
        if loss_fn is None:
            raise PruningError("taylor needs a loss: pass loss_fn=, called as loss_fn(output, target)")
        if batches is None:
            raise PruningError("taylor needs training batches: pass batches=, an iterable of (input, target)")
        totals: dict[str, torch.Tensor] = {}
        samples = 0
        with eval_mode(model), torch.enable_grad():
            for x, y in iter_batches(batches, "taylor", self.num_batches, model_device(model)):
                if y is None:
                    raise PruningError(
                        "taylor needs (input, target) batches to compute the loss, got inputs only"
                    )
                for name, value in self._batch(graph, model, loss_fn, x, y).items():
                    totals[name] = totals[name] + value if name in totals else value
                samples += x.shape[0]
        return reduce_to_sets(graph, {name: total / samples for name, total in totals.items()})

    @staticmethod
    def _batch(
        graph: ChannelGraph, model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y
    ) -> dict[str, torch.Tensor]:
        """Per producer: sum over the batch's samples of |sum over positions of a * dL/da|, shape (C,)."""
        captured: list[tuple[str, torch.Tensor]] = []

        def hook(name: str) -> Callable:
            def keep(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
                captured.append((name, output))
                # Later in-place operations (ReLU(inplace=True)) act on the copy, not on ``a``.
                return output.clone()

            return keep

        with _forward_hooks(graph, hook):
            loss = loss_fn(model(x.detach().requires_grad_(True)), y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PruningError("taylor's loss_fn(output, target) must return a scalar tensor")
        grads = torch.autograd.grad(loss, [a for _, a in captured], allow_unused=True)
        result: dict[str, torch.Tensor] = {}
        for (name, a), grad in zip(captured, grads, strict=True):
            if grad is not None:
                value = (
                    _channels_first(a.detach() * grad, graph.layers[name].module).sum(2).abs().sum(0).double()
                )
                result[name] = result[name] + value if name in result else value
        return result


@dataclass
class _Moments:
    """Running count, mean (R,) and centred co-moment (R, R) of a group's channel-set feature maps."""

    count: int = 0
    mean: torch.Tensor | None = None
    comoment: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        """Merge a batch of features (M, R) (Chan et al.'s parallel update, in float64)."""
        n = features.shape[0]
        mean = features.mean(0)
        centred = features - mean
        comoment = (centred.T @ centred).double()
        mean = mean.double()
        if self.mean is None:
            self.count, self.mean, self.comoment = n, mean, comoment
            return
        total = self.count + n
        delta = mean - self.mean
        self.comoment = self.comoment + comoment + torch.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total


def _normalised(matrix: torch.Tensor) -> torch.Tensor:
    """``M_ij / sqrt(M_ii M_jj)``; a channel with zero norm is constant and counts as fully similar."""
    # Symmetric exactly, so that the two channels of a pair tie exactly (BLAS may differ by an ulp).
    matrix = (matrix + matrix.T) / 2
    norms = matrix.diagonal().clamp_min(0).sqrt()
    similarity = matrix / torch.outer(norms, norms).clamp_min(1e-300)
    dead = norms <= 1e-12 * norms.max().clamp_min(1e-300)
    similarity[dead, :] = 1.0
    similarity[:, dead] = 1.0
    return similarity


#: Similarity of feature maps from their moments: Pearson correlation or cosine of the raw maps.
SIMILARITIES: dict[str, Callable[[_Moments], torch.Tensor]] = {
    "pearson": lambda m: _normalised(m.comoment),
    "cosine": lambda m: _normalised(m.comoment + m.count * torch.outer(m.mean, m.mean)),
}


def _averaging(graph: ChannelGraph, group: ChannelGroup) -> dict[str, torch.Tensor]:
    """Per producer, a (C, R) matrix averaging its channels into the group's R channel sets."""
    column = {root: j for j, root in enumerate(group.roots)}
    matrices = {}
    for name in group.producers:
        elements = graph.layers[name].out_elems
        matrix = torch.zeros(len(elements), len(group.roots))
        for i, element in enumerate(elements):
            matrix[i, column[graph.elements.find(element)]] = 1.0
        matrices[name] = matrix / matrix.sum(0).clamp_min(1.0)
    return matrices


class Redundancy(Importance):
    """Feature-map redundancy: channels that copy a kept channel go first.

    Per coupled group, each channel set's feature map (the mean of its producers' output channels, a
    producing layer's maps placed side by side with the others') is compared with every other over
    the batches' positions and samples by ``|similarity|`` (Pearson correlation or cosine; a constant
    map counts as similarity 1). Greedy elimination then repeatedly removes the set with the highest
    similarity to any remaining one (pinned sets stay in the comparison); a set's score is
    ``1 - that similarity`` when removed, so scores rise along the elimination order and ratios take
    its prefix. With ``threshold``, only sets removed while that similarity exceeds it may go (the
    rest score ``inf``), so a group loses the channels duplicating a kept one, capped by its ratio.

    Args:
        similarity: ``"pearson"`` or ``"cosine"``.
        threshold: in (0, 1], or ``None`` for ratio mode.
        num_batches: batches read from the caller's iterable (at most).
    """

    name = "redundancy"

    def __init__(
        self, similarity: str = "pearson", threshold: float | None = None, num_batches: int = 8
    ) -> None:
        if similarity not in SIMILARITIES:
            raise PruningError(f"similarity '{similarity}' is not one of {', '.join(SIMILARITIES)}")
        if threshold is not None and (isinstance(threshold, bool) or not 0 < threshold <= 1):
            raise PruningError(f"the redundancy threshold must be in (0, 1] or None, got {threshold!r}")
        self.similarity = similarity
        self.threshold = threshold
        self.num_batches = _check_batches(num_batches)

    def describe(self) -> str:
        """``redundancy``, with the similarity and threshold when they are not the defaults."""
        options = [f"similarity={self.similarity}"] if self.similarity != "pearson" else []
        options += [f"threshold={self.threshold}"] if self.threshold is not None else []
        return f"{self.name}({', '.join(options)})" if options else self.name

    def scores(self, graph, model, batches=None, loss_fn=None) -> dict[int, float]:
        """Greedy elimination order per group, from feature-map similarities over the batches."""
        if batches is None:
            raise PruningError(
                "redundancy needs training batches: pass batches=, an iterable of input tensors"
            )
        groups, pinned = channel_groups(graph)
        moments = self._moments(graph, model, groups, batches)
        result: dict[int, float] = {}
        for group, moment in zip(groups, moments, strict=True):
            if moment.mean is not None:
                similarity = SIMILARITIES[self.similarity](moment).abs()
                result.update(self._eliminate(group.roots, similarity, pinned))
        return result

    def _moments(
        self, graph: ChannelGraph, model: nn.Module, groups: list[ChannelGroup], batches: Batches
    ) -> list[_Moments]:
        """Moments of every group's channel-set feature maps over the batches (eval mode, no grad)."""
        averaging: dict[str, tuple[int, torch.Tensor]] = {}
        for index, group in enumerate(groups):
            for name, matrix in _averaging(graph, group).items():
                averaging[name] = (index, matrix)
        moments = [_Moments() for _ in groups]

        def hook(name: str) -> Callable:
            def record(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
                index, matrix = averaging[name]
                maps = _channels_first(output.detach().float(), graph.layers[name].module)
                moments[index].add(maps.transpose(1, 2).reshape(-1, maps.shape[1]) @ matrix.to(maps.device))

            return record

        with eval_mode(model), torch.no_grad(), _forward_hooks(graph, hook):
            for x, _target in iter_batches(batches, "redundancy", self.num_batches, model_device(model)):
                model(x)
        return moments

    def _eliminate(self, roots: list[int], similarity: torch.Tensor, pinned: set[int]) -> Mapping[int, float]:
        """Scores from greedy elimination: ``1 - max |similarity| to the remaining sets`` at removal."""
        remaining = similarity.clone().cpu()
        remaining.fill_diagonal_(-math.inf)
        candidate = torch.tensor([root not in pinned for root in roots])
        scores: dict[int, float] = {}
        for _ in range(int(candidate.sum())):
            rows = torch.nonzero(candidate).flatten()
            redundancy = remaining[rows].max(1).values
            best = redundancy.max()
            # The last of equals goes: the lower channel index stays. No partner left: similarity 0.
            pick = int(rows[redundancy == best][-1])
            value = min(max(float(best), 0.0), 1.0)
            keep = self.threshold is not None and value <= self.threshold
            scores[roots[pick]] = math.inf if keep else 1.0 - value
            candidate[pick] = False
            remaining[pick, :] = -math.inf
            remaining[:, pick] = -math.inf
        return scores


register_importance("taylor", Taylor)
register_importance("redundancy", Redundancy)
