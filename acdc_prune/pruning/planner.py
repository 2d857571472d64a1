"""Planning: trace, group channels, score them, and choose what each group keeps (block-wise or global).

A little over 450 lines: the block-wise and global choices share their limits, steps and plan
building, which ``budget.py`` reuses; kept together so the two scopes stay one algorithm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.groups import ChannelGraph, analyse
from acdc_prune.pruning.importance import (
    Batches,
    ChannelGroup,
    ImportanceSpec,
    LossFn,
    channel_groups,
    channel_scores,
    resolve_importance,
)
from acdc_prune.pruning.plan import GroupPlan, LayerPlan, PruningPlan
from acdc_prune.pruning.rebuild import RESIZABLE, keep_applicable, resize
from acdc_prune.pruning.tracing import TracedModel, trace_model

DEFAULT_KEY = "default"
#: Tolerance when turning ``ratio * channels`` into a whole number of channels (0.3 * 10 is 3).
_EPS = 1e-9


def _as_inputs(example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if (
        isinstance(example_input, Sequence)
        and example_input
        and all(isinstance(t, torch.Tensor) for t in example_input)
    ):
        return tuple(example_input)
    raise PruningError(
        "the example input must be a tensor or a sequence of tensors (one per forward argument)"
    )


def _check_ratios(ratios: Mapping[str, float] | float | None, scope: str) -> dict[str, float]:
    """Validated ratios: a float is shorthand for ``{"default": float}``; ``None`` prunes nothing;
    global scope takes a float only."""
    if ratios is None:
        return {}
    if not isinstance(ratios, Mapping):
        ratios = {DEFAULT_KEY: ratios}
    checked = {}
    for key, value in ratios.items():
        if not isinstance(key, str) or not key:
            raise PruningError(f"ratio keys must be non-empty module-path prefixes or 'default', got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise PruningError(
                f"ratio {value!r} for '{key}' must be a number in [0, 1) (the fraction of channels removed)"
            )
        checked[key] = float(value)
    if scope == "global" and set(checked) - {DEFAULT_KEY}:
        raise PruningError("global scope takes one ratio for the whole network (a float), not block keys")
    return checked


def matches(prefix: str, name: str) -> bool:
    """Whether a ratio key covers a module name, on dotted-path boundaries.

    ``"encoders.1"`` covers ``"encoders.1"`` and ``"encoders.1.conv.0"`` but not ``"encoders.10"``.
    """
    return name == prefix or name.startswith(prefix + ".")


def ratio_for(name: str, ratios: Mapping[str, float]) -> tuple[str, float]:
    """The ratio of a layer: its longest matching prefix key, else ``"default"`` (0 when absent).

    Returns:
        ``(key, ratio)``.
    """
    keys = [k for k in ratios if k != DEFAULT_KEY and matches(k, name)]
    if keys:
        key = max(keys, key=len)
        return key, ratios[key]
    return DEFAULT_KEY, ratios.get(DEFAULT_KEY, 0.0)


def _prefixes(names: Sequence[str]) -> list[str]:
    """Every dotted prefix of every name, in order of first appearance."""
    seen: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def _prunable(groups: list[ChannelGroup], pinned: set[int]) -> list[str]:
    """Producing layers of groups that have at least one removable channel set."""
    return [name for g in groups if any(r not in pinned for r in g.roots) for name in g.producers]


def _check_keys(ratios: Mapping[str, float], prunable: list[str]) -> None:
    for key in ratios:
        if key != DEFAULT_KEY and not any(matches(key, name) for name in prunable):
            raise PruningError(
                f"ratio key '{key}' matches no prunable layer; valid prefixes: "
                f"{', '.join(_prefixes(prunable)) or '(none)'}"
            )


@dataclass
class Limits:
    """How far any group may shrink.

    Attributes:
        round_to: kept widths are rounded up to a multiple of this (and of GroupNorm group counts).
        max_ratio: no group loses more than this fraction of its channel sets (1 = no cap).
        min_channels: every group keeps at least this many channel sets (or all it has).
    """

    round_to: int = 1
    max_ratio: float = 1.0
    min_channels: int = 1


def check_limits(round_to: int, max_ratio: float | None, min_channels: int, default_max: float) -> Limits:
    """Validated :class:`Limits`; ``max_ratio=None`` takes ``default_max``."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PruningError(f"round_to must be a positive integer, got {round_to!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise PruningError(f"min_channels must be a positive integer, got {min_channels!r}")
    max_ratio = default_max if max_ratio is None else max_ratio
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0 < max_ratio <= 1:
        raise PruningError(
            f"max_ratio must be a number in (0, 1] (the largest fraction a group loses), got {max_ratio!r}"
        )
    return Limits(round_to, float(max_ratio), min_channels)


@dataclass
class Analysis:
    """A traced model and its channel groups: everything planning needs besides the scores.

    Attributes:
        model: the model.
        inputs: the example inputs, one tensor per forward argument.
        traced: the verified trace.
        graph: the channel graph.
        groups: the coupled groups in execution order.
        pinned: channel sets (roots) that must stay.
    """

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    traced: TracedModel
    graph: ChannelGraph
    groups: list[ChannelGroup]
    pinned: set[int]

    def prunable(self) -> list[ChannelGroup]:
        """Groups with at least one channel set that may go."""
        return [g for g in self.groups if any(r not in self.pinned for r in g.roots)]


def analyse_model(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> Analysis:
    """Trace ``model`` on the example input (verified) and group its channels."""
    inputs = _as_inputs(example_input)
    traced = trace_model(model, inputs)
    graph = analyse(traced, model)
    groups, pinned = channel_groups(graph)
    return Analysis(model, inputs, traced, graph, groups, pinned)


def _free(group: ChannelGroup, pinned: set[int], scores: Mapping[int, float]) -> list[int]:
    """Channel sets a criterion lets go, lowest score first (ties: the higher channel index first)."""
    position = {r: i for i, r in enumerate(group.roots)}
    free = [r for r in group.roots if r not in pinned and scores.get(r, 0.0) != math.inf]
    return sorted(free, key=lambda r: (scores.get(r, 0.0), -position[r]))


def _min_width(n: int, n_fixed: int, limits: Limits) -> int:
    """The narrowest a group of ``n`` sets with ``n_fixed`` unremovable ones may get, before rounding."""
    capped = n - math.floor(limits.max_ratio * n + _EPS)
    return max(1, n_fixed, min(limits.min_channels, n), capped)


def _rounded(keep: int, n: int, multiple: int) -> int:
    return min(n, math.ceil(keep / multiple) * multiple)


def _choose_block(
    analysis: Analysis, scores: Mapping[int, float], ratios: Mapping[str, float], limits: Limits
) -> set[int]:
    """Each group removes its ``floor(ratio * n)`` lowest-scoring sets (within the limits)."""
    removed: set[int] = set()
    for group in analysis.prunable():
        ratio = ratio_for(group.producers[0], ratios)[1]
        n, ranked = len(group.roots), _free(group, analysis.pinned, scores)
        keep = max(n - math.floor(ratio * n + _EPS), _min_width(n, n - len(ranked), limits))
        keep = _rounded(keep, n, math.lcm(limits.round_to, group.multiple))
        removed.update(ranked[: n - keep])
    return removed


@dataclass
class Step:
    """One step of a group's shrinking in global ranking: the next channel sets it would remove.

    Attributes:
        group: index of the group in ``Analysis.groups``.
        roots: the channel sets this step removes (``round_to`` of them, or fewer to reach a multiple).
        threshold: normalised score of the highest-scoring set the group has removed by this step.
        index: a running index that orders the steps of a group (they are taken in that order).
    """

    group: int
    roots: list[int]
    threshold: float
    index: int


def _normalise(ranked: list[int], scores: Mapping[int, float]) -> list[float]:
    """Scores divided by their mean (a group of zeros stays zero), so groups compare."""
    values = [scores.get(r, 0.0) for r in ranked]
    mean = sum(values) / len(values) if values else 0.0
    return [v / mean for v in values] if mean > 0 else values


def global_steps(analysis: Analysis, scores: Mapping[int, float], limits: Limits) -> list[Step]:
    """Every group's removal steps, from its widest to its narrowest allowed width, in group order.

    Within a group sets go in score order; a step's width is a multiple of ``round_to`` and of the
    group's GroupNorm group counts, and no step goes below :class:`Limits`' floor.
    """
    steps = []
    for index, group in enumerate(analysis.groups):
        ranked = _free(group, analysis.pinned, scores)
        if not ranked:
            continue
        n, multiple = len(group.roots), math.lcm(limits.round_to, group.multiple)
        normalised = _normalise(ranked, scores)
        lowest = _rounded(_min_width(n, n - len(ranked), limits), n, multiple)
        done = 0
        for width in range(((n - 1) // multiple) * multiple, lowest - 1, -multiple):
            steps.append(Step(index, ranked[done : n - width], normalised[n - width - 1], len(steps)))
            done = n - width
    return steps


def global_order(analysis: Analysis, scores: Mapping[int, float], limits: Limits) -> list[Step]:
    """Every group's removal steps (:func:`global_steps`) in one ranking, lowest normalised score first."""
    return sorted(global_steps(analysis, scores, limits), key=lambda s: (s.threshold, s.group, s.index))


def take_steps(ordered: Sequence[Step], accept: Callable[[Step], bool]) -> set[int]:
    """The channel sets removed by taking ``ordered`` steps while ``accept(step)`` allows.

    A refused step closes its group: the group's later steps are skipped, so each group always
    removes a prefix of its own order.
    """
    removed: set[int] = set()
    closed: set[int] = set()
    for step in ordered:
        if step.group in closed:
            continue
        if accept(step):
            removed.update(step.roots)
        else:
            closed.add(step.group)
    return removed


def _choose_global(
    analysis: Analysis, scores: Mapping[int, float], ratios: Mapping[str, float], limits: Limits
) -> set[int]:
    """Remove ``floor(ratio * total)`` channel sets of all prunable groups, lowest normalised score first."""
    ratio = ratios.get(DEFAULT_KEY, 0.0)
    target = math.floor(ratio * sum(len(g.roots) for g in analysis.prunable()) + _EPS)
    ordered = global_order(analysis, scores, limits)
    count = 0

    def accept(step: Step) -> bool:
        nonlocal count
        if count + len(step.roots) > target:
            return False
        count += len(step.roots)
        return True

    return take_steps(ordered, accept)


#: Scope name -> chooser ``(analysis, scores, ratios, limits) -> removed channel sets``.
SCOPES: dict[str, Callable[..., set[int]]] = {
    "block": _choose_block,
    "global": _choose_global,
}
#: ``max_ratio`` when not given: block ratios are their own caps; global ranking needs one.
DEFAULT_MAX_RATIO = {"block": 1.0, "global": 0.9}
#: What a plan's group summary records per group: scope -> ``(group, ratios) -> (key, ratio)``.
_LABELS: dict[str, Callable[[ChannelGroup, Mapping[str, float]], tuple[str, float]]] = {
    "block": lambda group, ratios: ratio_for(group.producers[0], ratios),
    "global": lambda group, ratios: ("global", ratios.get(DEFAULT_KEY, 0.0)),
}


def layer_plans(graph: ChannelGraph, removed: set[int]) -> dict[str, LayerPlan]:
    """The :class:`LayerPlan` of every layer whose channels change when ``removed`` sets go."""
    root_of = graph.elements.roots()

    def kept(elements: list[int] | None) -> list[int] | None:
        if elements is None:
            return None
        indices = [i for i, e in enumerate(elements) if root_of[e] not in removed]
        return None if len(indices) == len(elements) else indices

    layers = {}
    for name, use in graph.layers.items():
        kept_out, kept_in = kept(use.out_elems), kept(use.in_elems)
        if kept_out is None and kept_in is None:
            continue
        axis = use.axis if use.kind == "layer_norm" else None
        tensors, _ = resize(name, use.module, kept_out, kept_in, axis)
        shapes = {key: [list(getattr(use.module, key).shape), list(t.shape)] for key, t in tensors.items()}
        layers[name] = LayerPlan(type(use.module).__name__, kept_out, kept_in, shapes, axis)
    return layers


def _warn_unused(model: nn.Module, traced: TracedModel, plan_layers: Mapping[str, LayerPlan]) -> None:
    """Layers that the eval-mode trace never called (deep-supervision heads...) are left as they are."""
    called = {str(n.target) for n in traced.graph_module.graph.nodes if n.op == "call_module"}
    inside_called = tuple(f"{name}." for name in called)  # layers of a block kept whole run inside it
    unused = [
        name
        for name, module in model.named_modules()
        if isinstance(module, RESIZABLE)
        and name not in called
        and not name.startswith(inside_called)
        and any(True for _ in module.parameters())
    ]
    if unused and plan_layers:
        warnings.warn(
            f"{len(unused)} layer(s) are not used in eval mode on the example input and are left unpruned "
            f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}); if they run in training "
            "mode on pruned channels, the pruned model will fail there",
            stacklevel=4,
        )


def build_plan(
    analysis: Analysis,
    removed: set[int],
    label: Callable[[ChannelGroup], tuple[str, float]],
    **record: Any,
) -> PruningPlan:
    """The :class:`PruningPlan` removing the given channel sets.

    Args:
        analysis: from :func:`analyse_model`.
        removed: channel sets (roots) to remove, as ``rebuild.keep_applicable`` leaves them.
        label: the ratio key and ratio the group summary records for a prunable group.
        record: further :class:`PruningPlan` fields (``ratios``, ``importance``, ``round_to``, ``scope``...).
    """
    layers = layer_plans(analysis.graph, removed)
    _warn_unused(analysis.model, analysis.traced, layers)
    summary = [
        GroupPlan(list(g.producers), *label(g), len(g.roots), sum(r not in removed for r in g.roots))
        for g in analysis.prunable()
    ]
    return PruningPlan(
        model_class=type(analysis.model).__name__,
        layers=layers,
        groups=summary,
        input_shapes=[list(t.shape) for t in analysis.inputs],
        trace=analysis.traced.mode,
        **record,
    )


def ratio_prefixes(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> list[str]:
    """Every valid ratio key besides ``"default"``: the dotted prefixes of the prunable layers.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (N, C, ...) or a sequence of tensors, one per forward argument.

    Returns:
        Prefixes in execution order of their first layer, e.g. ``["encoders", "encoders.0", ...]``.
    """
    analysis = analyse_model(model, example_input)
    return _prefixes(_prunable(analysis.groups, analysis.pinned))


def plan_pruning(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    ratios: Mapping[str, float] | float | None = None,
    importance: ImportanceSpec = "l1",
    round_to: int = 1,
    *,
    scope: str = "block",
    max_ratio: float | None = None,
    min_channels: int = 1,
    batches: Batches | None = None,
    loss_fn: LossFn | None = None,
) -> PruningPlan:
    """Plan structured channel pruning of any model; the model is not modified.

    The model is traced with torch.fx on the example input (verified against its real output), its
    channels are grouped into sets that must go together (residual adds, grouped convs, norms,
    concatenation offsets...), each set is scored by the importance criterion reduced over every
    layer producing it, and the lowest-scoring sets go.

    ``scope="block"``: ratios are block-wise: a key is a module-path prefix on dotted boundaries
    (``"encoders.1"`` covers ``"encoders.1.conv.0"``, not ``"encoders.10"``), the longest matching
    key wins, and ``"default"`` (0 when absent) covers the rest. A coupled group spanning several
    layers (e.g. the two sides of a residual add) takes the ratio of the first layer, in execution
    order, that produces its channels. A group of ``n`` channel sets removes ``floor(ratio * n)``.

    ``scope="global"``: one ratio for the network; scores are divided by their group's mean and
    ranked across groups, and ``floor(ratio * total)`` sets of all prunable groups go, lowest first.

    Either way a group keeps at least one set, every pinned one (model inputs and outputs, operands
    of unknown operations) and every one its criterion scores ``inf``, at least ``min_channels``,
    loses at most ``max_ratio`` of its sets, and its kept width is rounded up to a multiple of
    ``round_to`` and of the group counts of any GroupNorm on it.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (N, C, ...) or a sequence of tensors, one per forward argument; a
            small spatial size is enough (channels, not pixels, are analysed).
        ratios: prefix -> fraction of channels to remove, in [0, 1); a float means
            ``{"default": float}``; ``None`` removes nothing. Global scope takes a float only.
        importance: a registered name (``importance_names()``: ``"l1"`` (default), ``"l2"``,
            ``"bn_scale"``, ``"taylor"``, ``"redundancy"``...), an :class:`Importance` instance
            (for options, e.g. ``Redundancy(similarity="cosine", threshold=0.9)``), or a function
            ``fn(graph, model, batches, loss_fn) -> {channel set: score}``.
        round_to: round kept widths up to a multiple of this (8 suits vector units); 1 = no rounding.
        scope: ``"block"`` or ``"global"``.
        max_ratio: the largest fraction of a group that may go; ``None``: 1 in block scope (the
            ratios decide), 0.9 in global scope.
        min_channels: the fewest channel sets any group keeps.
        batches: training batches for data criteria (``taylor``, ``redundancy``): an iterable, or a
            callable returning one, of input tensors (N, C, H, W) or ``(input, target)`` pairs.
        loss_fn: ``loss_fn(output, target) -> scalar`` for ``taylor``.

    Returns:
        The plan; ``plan.layers[name].kept_out`` / ``kept_in`` list the kept channel indices.

    Raises:
        PruningError: a bad ratio key or value, scope or limit, an unknown importance, a data
            criterion without data, a model that cannot run on the example input, or one that
            cannot be traced correctly.
    """
    criterion = resolve_importance(importance)
    if scope not in SCOPES:
        raise PruningError(f"scope '{scope}' is not one of {', '.join(SCOPES)}")
    limits = check_limits(round_to, max_ratio, min_channels, DEFAULT_MAX_RATIO[scope])
    checked = _check_ratios(ratios, scope)
    analysis = analyse_model(model, example_input)
    _check_keys(checked, _prunable(analysis.groups, analysis.pinned))
    scores = channel_scores(analysis.graph, criterion, model, batches, loss_fn)
    removed = SCOPES[scope](analysis, scores, checked, limits)
    removed = keep_applicable(analysis.graph, removed, scores)  # never a plan apply_plan rejects
    return build_plan(
        analysis,
        removed,
        lambda group: _LABELS[scope](group, checked),
        ratios=checked,
        importance=criterion.describe(),
        round_to=round_to,
        scope=scope,
    )
