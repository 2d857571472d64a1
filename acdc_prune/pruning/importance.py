"""Channel importance: a registry of criteria scoring every coupled channel set, and the weight criteria."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.groups import ChannelGraph

#: What data criteria read: an iterable of batches, or a callable returning a fresh one. A batch is
#: an input tensor (N, C, ...) or an ``(input, target)`` pair.
Batches = Iterable[Any] | Callable[[], Iterable[Any]]
#: ``loss_fn(output, target) -> scalar tensor``, for gradient-based criteria.
LossFn = Callable[[Any, Any], torch.Tensor]
#: Norm kinds (see ``LayerUse.kind``) whose per-channel weight is a scale, for ``bn_scale``.
_SCALED_NORMS = ("norm", "group_norm")


@dataclass
class ChannelGroup:
    """The channel sets of one coupled group (union-find roots, in order of first appearance).

    Attributes:
        roots: the group's channel sets; a set is removed or kept as a whole.
        producers: the layers (convs, linears) creating the group's channels, in execution order.
        multiple: the kept width must stay a multiple of this (group counts of GroupNorms on it).
    """

    roots: list[int]
    producers: list[str]
    multiple: int = 1


def channel_groups(graph: ChannelGraph) -> tuple[list[ChannelGroup], set[int]]:
    """The coupled groups of a channel graph in execution order, and its pinned channel sets (roots)."""
    root_of, group_of = graph.elements.roots(), graph.groups.roots()
    pinned = {root_of[e] for e in graph.pinned}
    by_id: dict[int, ChannelGroup] = {}
    seen: set[int] = set()
    for name in graph.producers:
        for element in graph.layers[name].out_elems:
            group = by_id.setdefault(group_of[element], ChannelGroup([], []))
            if name not in group.producers:
                group.producers.append(name)
            root = root_of[element]
            if root not in seen:
                seen.add(root)
                group.roots.append(root)
    for elements, num_groups in graph.multiples:
        for group_id in {group_of[e] for e in elements}:
            if group_id in by_id:
                by_id[group_id].multiple = math.lcm(by_id[group_id].multiple, num_groups)
    return list(by_id.values()), pinned


def reduce_to_sets(
    graph: ChannelGraph, per_layer: Mapping[str, torch.Tensor], power: int = 1
) -> dict[int, float]:
    """Reduce per-filter scores of producing layers to one score per channel set.

    Args:
        graph: the channel graph.
        per_layer: producer name -> tensor (out_channels,) of non-negative filter scores.
        power: ``p`` of the reduction ``(sum of score**p over every filter producing the set)**(1/p)``.

    Returns:
        Channel set (union-find root) -> score.
    """
    totals: dict[int, float] = {}
    root_of = graph.elements.roots()
    for name, values in per_layer.items():
        for element, value in zip(graph.layers[name].out_elems, values.tolist(), strict=True):
            root = root_of[element]
            totals[root] = totals.get(root, 0.0) + value**power
    return totals if power == 1 else {root: total ** (1 / power) for root, total in totals.items()}


class Importance(abc.ABC):
    """A channel criterion: scores every prunable channel set of a traced model; lower scores go first.

    Implement :meth:`scores`; options are constructor arguments (``Redundancy(similarity="cosine")``).
    :func:`register_importance` makes a criterion available by name. A score of ``math.inf`` keeps
    its channel set whatever the ratio (a criterion's veto); scores should be non-negative, since
    global ranking divides them by their group's mean.
    """

    #: The name plans record; :func:`register_importance` sets it on the instances it builds.
    name: str = ""

    @abc.abstractmethod
    def scores(
        self,
        graph: ChannelGraph,
        model: nn.Module,
        batches: Batches | None = None,
        loss_fn: LossFn | None = None,
    ) -> Mapping[int, float]:
        """Score the channel sets.

        Args:
            graph: the channel graph; ``graph.producers`` name the layers creating channels and
                ``graph.elements.find(e)`` maps an element to its channel set.
            model: the traced model (data criteria run it; it must come back unchanged).
            batches: training batches for data criteria, ``None`` for weight criteria.
            loss_fn: ``loss_fn(output, target)`` for gradient criteria.

        Returns:
            Channel set (union-find root) -> score; missing sets score 0.
        """

    def describe(self) -> str:
        """The criterion as plans record it: its name (with non-default options where it has some)."""
        return self.name or type(self).__name__


class FunctionImportance(Importance):
    """A plain function ``fn(graph, model, batches, loss_fn) -> {root: score}`` used as a criterion."""

    def __init__(self, function: Callable[..., Mapping[int, float]], name: str = "") -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", "custom")

    def scores(self, graph, model, batches=None, loss_fn=None) -> Mapping[int, float]:
        """Call the function with the same arguments."""
        return self.function(graph, model, batches, loss_fn)


ImportanceSpec = str | Importance | type[Importance] | Callable[..., Mapping[int, float]]
_REGISTRY: dict[str, Callable[[], Importance]] = {}


def _factory(criterion: Any, name: str) -> Callable[[], Importance]:
    """A builder of fresh instances carrying ``name`` (shared when ``criterion`` is an instance)."""
    if isinstance(criterion, type) and issubclass(criterion, Importance):

        def build() -> Importance:
            instance = criterion()
            instance.name = name
            return instance

        return build
    if isinstance(criterion, Importance):
        return lambda: criterion
    if callable(criterion):
        return lambda: FunctionImportance(criterion, name)
    raise PruningError(
        f"importance '{name}' must be a registered name, an Importance subclass or instance, or a function"
        f"(graph, model, batches, loss_fn) returning {{channel set: score}}, not {type(criterion).__name__}"
    )


def register_importance(name: str, criterion: Any = None, replace: bool = False) -> Any:
    """Make a criterion available by name to ``plan_pruning(..., importance=name)``.

    Use as a decorator (``@register_importance("mine")`` on a class or function) or call it.

    Args:
        name: the name; registering a taken name needs ``replace=True``.
        criterion: an :class:`Importance` subclass (built with no arguments for each use), an
            instance, or a function ``fn(graph, model, batches, loss_fn) -> {root: score}``.
        replace: allow replacing a registered criterion.

    Returns:
        ``criterion`` unchanged (or, without it, a decorator that registers and returns its target).
    """
    if not isinstance(name, str) or not name:
        raise PruningError(f"an importance name must be a non-empty string, got {name!r}")

    def add(target: Any) -> Any:
        if name in _REGISTRY and not replace:
            raise PruningError(f"importance '{name}' is already registered; pass replace=True to replace it")
        _REGISTRY[name] = _factory(target, name)
        return target

    return add if criterion is None else add(criterion)


def importance_names() -> tuple[str, ...]:
    """Names of every registered criterion, built-in ones first."""
    return tuple(_REGISTRY)


def resolve_importance(spec: ImportanceSpec) -> Importance:
    """The criterion a name, an :class:`Importance` (instance or subclass) or a plain function stands for.

    Raises:
        PruningError: an unknown name (the message lists the known ones) or an unusable object.
    """
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise PruningError(
                f"importance '{spec}' is not one of {', '.join(_REGISTRY)}; "
                "register new criteria with register_importance"
            )
        return _REGISTRY[spec]()
    if isinstance(spec, Importance):
        return spec
    return _factory(spec, getattr(spec, "__name__", "custom"))()


def check_importance(importance: ImportanceSpec) -> None:
    """Raise ``PruningError`` unless ``importance`` names (or is) a usable criterion."""
    resolve_importance(importance)


def channel_scores(
    graph: ChannelGraph,
    importance: ImportanceSpec = "l1",
    model: nn.Module | None = None,
    batches: Batches | None = None,
    loss_fn: LossFn | None = None,
) -> dict[int, float]:
    """Importance of every prunable channel set (union-find root -> score); lower goes first.

    Args:
        graph: the channel graph of ``model``.
        importance: a registered name, an :class:`Importance`, or a plain function (see
            :class:`FunctionImportance`).
        model: the traced model (needed by data criteria).
        batches: training batches for data criteria.
        loss_fn: ``loss_fn(output, target)`` for ``taylor``.

    Raises:
        PruningError: an unknown criterion, missing data, or a NaN score.
    """
    criterion = resolve_importance(importance)
    scores = {
        int(root): float(value) for root, value in criterion.scores(graph, model, batches, loss_fn).items()
    }
    if any(math.isnan(value) for value in scores.values()):
        raise PruningError(
            f"importance '{criterion.describe()}' gave NaN scores; check the model and the data"
        )
    return scores


def filter_weights(module: nn.Module) -> torch.Tensor:
    """The weights of each output filter of a conv, transposed conv or linear layer, one row each.

    Returns:
        Tensor of shape (out_channels, fan): row ``j`` holds every weight that produces output
        channel ``j`` (for a transposed conv, ``weight[:, j]`` within its group).
    """
    weight = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        grouped = weight.reshape(groups, in_per_group, out_per_group, -1).transpose(1, 2)
        return grouped.reshape(groups * out_per_group, -1)
    return weight.reshape(weight.shape[0], -1)


#: Filter norms for inspection and the ``l1``/``l2`` criteria: name -> vector-norm order.
_NORM_ORDERS = {"l1": 1, "l2": 2}


def filter_norm(module: nn.Module, importance: str = "l1") -> torch.Tensor:
    """Per-output-filter norm of a conv, transposed conv or linear layer.

    Args:
        module: a ``nn.Conv*d``, ``nn.ConvTranspose*d`` or ``nn.Linear``.
        importance: ``"l1"`` (sum of absolute weights) or ``"l2"`` (Euclidean norm).

    Returns:
        Tensor of shape (out_channels,).
    """
    if importance not in _NORM_ORDERS:
        raise PruningError(f"filter norms are 'l1' or 'l2', not '{importance}'")
    return torch.linalg.vector_norm(filter_weights(module).float(), ord=_NORM_ORDERS[importance], dim=1)


def filter_norms(model: nn.Module, importance: str = "l1") -> dict[str, torch.Tensor]:
    """Per-filter norms of every conv, transposed conv and linear layer of a model, for inspection.

    Args:
        model: any ``nn.Module``; it is not traced.
        importance: ``"l1"`` or ``"l2"``.

    Returns:
        Module name -> tensor of shape (out_channels,), in ``named_modules()`` order.
    """
    return {
        name: filter_norm(module, importance)
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
    }


class NormImportance(Importance):
    """``l1``: sum of the L1 norms of every filter producing a channel set; ``l2``: the Euclidean norm of
    all those filters together (square root of their summed squared L2 norms)."""

    def __init__(self, order: str = "l1") -> None:
        if order not in _NORM_ORDERS:
            raise PruningError(f"a norm criterion is 'l1' or 'l2', not '{order}'")
        self.order = order
        self.name = order

    def scores(self, graph, model=None, batches=None, loss_fn=None) -> dict[int, float]:
        """Reduce each producing layer's filter norms over the channel sets (weights only, no data)."""
        norms = {name: filter_norm(graph.layers[name].module, self.order) for name in graph.producers}
        return reduce_to_sets(graph, norms, _NORM_ORDERS[self.order])


def _norm_scales(graph: ChannelGraph) -> dict[int, float]:
    """Element -> |weight| of the first affine batch/instance/group norm (in execution order) over it."""
    scales: dict[int, float] = {}
    for use in graph.layers.values():
        weight = getattr(use.module, "weight", None)
        if use.kind in _SCALED_NORMS and use.out_elems is not None and weight is not None:
            for element, scale in zip(use.out_elems, weight.detach().abs().tolist(), strict=True):
                scales.setdefault(element, scale)
    return scales


class BNScaleImportance(Importance):
    """Network slimming (Liu et al. 2017): |gamma| of the affine norm that follows each producing filter.

    A producer counts when every output channel of it reaches an affine BatchNorm, InstanceNorm or
    GroupNorm through channel-preserving operations (activations, dropout, pooling); a set's score is
    the sum of |gamma| over such producers (a residual add's side without a norm adds nothing). A
    group none of whose producers has a following norm (e.g. a transposed-conv up-sampling feeding a
    concatenation) is scored by its producers' L1 norms divided by each layer's mean L1 norm.
    """

    name = "bn_scale"

    def scores(self, graph, model=None, batches=None, loss_fn=None) -> dict[int, float]:
        """|gamma| per channel set, or normalised L1 where a group has no following norm."""
        scales = _norm_scales(graph)
        per_layer: dict[str, torch.Tensor] = {}
        scaled_groups: set[int] = set()
        for name in graph.producers:
            elements = graph.layers[name].out_elems
            if all(e in scales for e in elements):
                per_layer[name] = torch.tensor([scales[e] for e in elements])
                scaled_groups.add(graph.groups.find(elements[0]))
        for name in graph.producers:
            use = graph.layers[name]
            if name not in per_layer and graph.groups.find(use.out_elems[0]) not in scaled_groups:
                norms = filter_norm(use.module, "l1")
                per_layer[name] = norms / norms.mean() if norms.mean() > 0 else norms
        return reduce_to_sets(graph, per_layer)


register_importance("l1", NormImportance("l1"))
register_importance("l2", NormImportance("l2"))
register_importance("bn_scale", BNScaleImportance)
