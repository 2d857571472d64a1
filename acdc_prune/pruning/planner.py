"""Planning: trace, group channels, score them, and choose what each group keeps under block-wise ratios."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.groups import ChannelGraph, analyse
from acdc_prune.pruning.importance import channel_scores, check_importance
from acdc_prune.pruning.plan import GroupPlan, LayerPlan, PruningPlan
from acdc_prune.pruning.rebuild import RESIZABLE, resize
from acdc_prune.pruning.tracing import TracedModel, trace_model

DEFAULT_KEY = "default"
#: Tolerance when turning ``ratio * channels`` into a whole number of channels (0.3 * 10 is 3).
_EPS = 1e-9


@dataclass
class _Group:
    """The channel sets of one coupled group, in order of first appearance, and who produces them."""

    roots: list[int]
    producers: list[str]
    multiple: int = 1


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


def _check_ratios(ratios: Mapping[str, float] | float | None) -> dict[str, float]:
    """Validated ratios: a float is shorthand for ``{"default": float}``; ``None`` prunes nothing."""
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


def _groups(graph: ChannelGraph) -> tuple[list[_Group], set[int]]:
    """Coupled groups in execution order, and the pinned channel sets."""
    find = graph.elements.find
    pinned = {find(e) for e in graph.pinned}
    by_id: dict[int, _Group] = {}
    seen: set[int] = set()
    for name in graph.producers:
        for element in graph.layers[name].out_elems:
            group = by_id.setdefault(graph.groups.find(element), _Group([], []))
            if name not in group.producers:
                group.producers.append(name)
            root = find(element)
            if root not in seen:
                seen.add(root)
                group.roots.append(root)
    for elements, num_groups in graph.multiples:
        for group_id in {graph.groups.find(e) for e in elements}:
            if group_id in by_id:
                by_id[group_id].multiple = math.lcm(by_id[group_id].multiple, num_groups)
    return list(by_id.values()), pinned


def _prunable(groups: list[_Group], pinned: set[int]) -> list[str]:
    """Producing layers of groups that have at least one removable channel set."""
    return [name for g in groups if any(r not in pinned for r in g.roots) for name in g.producers]


def _check_keys(ratios: Mapping[str, float], prunable: list[str]) -> None:
    for key in ratios:
        if key != DEFAULT_KEY and not any(matches(key, name) for name in prunable):
            raise PruningError(
                f"ratio key '{key}' matches no prunable layer; valid prefixes: "
                f"{', '.join(_prefixes(prunable)) or '(none)'}"
            )


def _kept_width(n: int, n_pinned: int, ratio: float, multiple: int) -> int:
    """Channel sets a group of ``n`` keeps: at least one and every pinned one, rounded up."""
    keep = max(n - math.floor(ratio * n + _EPS), 1, n_pinned)
    return min(n, math.ceil(keep / multiple) * multiple)


def _choose(
    groups: list[_Group],
    pinned: set[int],
    scores: Mapping[int, float],
    ratios: Mapping[str, float],
    round_to: int,
) -> tuple[set[int], list[GroupPlan]]:
    """The channel sets to remove (lowest scores per group), and a summary of every prunable group."""
    removed: set[int] = set()
    summary = []
    for group in groups:
        free = [r for r in group.roots if r not in pinned]
        if not free:
            continue
        key, ratio = ratio_for(group.producers[0], ratios)
        n = len(group.roots)
        keep = _kept_width(n, n - len(free), ratio, math.lcm(round_to, group.multiple))
        position = {r: i for i, r in enumerate(group.roots)}
        ranked = sorted(free, key=lambda r: (scores.get(r, 0.0), position[r]))
        removed.update(ranked[: n - keep])
        summary.append(GroupPlan(list(group.producers), key, ratio, n, keep))
    return removed, summary


def _layer_plans(graph: ChannelGraph, removed: set[int]) -> dict[str, LayerPlan]:
    find = graph.elements.find

    def kept(elements: list[int] | None) -> list[int] | None:
        if elements is None:
            return None
        indices = [i for i, e in enumerate(elements) if find(e) not in removed]
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
    unused = [
        name
        for name, module in model.named_modules()
        if isinstance(module, RESIZABLE) and name not in called and any(True for _ in module.parameters())
    ]
    if unused and plan_layers:
        warnings.warn(
            f"{len(unused)} layer(s) are not used in eval mode on the example input and are left unpruned "
            f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}); if they run in training "
            "mode on pruned channels, the pruned model will fail there",
            stacklevel=3,
        )


def _analysed(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    inputs = _as_inputs(example_input)
    traced = trace_model(model, inputs)
    return inputs, traced, analyse(traced, model)


def ratio_prefixes(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> list[str]:
    """Every valid ratio key besides ``"default"``: the dotted prefixes of the prunable layers.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (N, C, ...) or a sequence of tensors, one per forward argument.

    Returns:
        Prefixes in execution order of their first layer, e.g. ``["encoders", "encoders.0", ...]``.
    """
    _inputs, _traced, graph = _analysed(model, example_input)
    groups, pinned = _groups(graph)
    return _prefixes(_prunable(groups, pinned))


def plan_pruning(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    ratios: Mapping[str, float] | float | None = None,
    importance: str = "l1",
    round_to: int = 1,
) -> PruningPlan:
    """Plan structured channel pruning of any model; the model is not modified.

    The model is traced with torch.fx on the example input (verified against its real output), its
    channels are grouped into sets that must go together (residual adds, grouped convs, norms,
    concatenation offsets...), each set is scored by the L1 or L2 norm of the filters producing it,
    and every coupled group drops its lowest-scoring sets.

    Ratios are block-wise: a key is a module-path prefix on dotted boundaries (``"encoders.1"``
    covers ``"encoders.1.conv.0"``, not ``"encoders.10"``), the longest matching key wins, and
    ``"default"`` (0 when absent) covers the rest. A coupled group spanning several layers (e.g. the
    two sides of a residual add) takes the ratio of the first layer, in execution order, that
    produces its channels. A group of ``n`` channel sets removes ``floor(ratio * n)`` of them, keeps
    at least one and every pinned one (model inputs and outputs, operands of unknown operations),
    and rounds the kept width up to a multiple of ``round_to`` and of the group counts of any
    GroupNorm on it.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (N, C, ...) or a sequence of tensors, one per forward argument; a
            small spatial size is enough (channels, not pixels, are analysed).
        ratios: prefix -> fraction of channels to remove, in [0, 1); a float means
            ``{"default": float}``; ``None`` removes nothing.
        importance: ``"l1"`` (default) or ``"l2"`` filter norm.
        round_to: round kept widths up to a multiple of this (8 suits vector units); 1 = no rounding.

    Returns:
        The plan; ``plan.layers[name].kept_out`` / ``kept_in`` list the kept channel indices.

    Raises:
        PruningError: a bad ratio key or value, an unknown importance, a model that cannot run on
            the example input, or one that cannot be traced correctly.
    """
    check_importance(importance)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PruningError(f"round_to must be a positive integer, got {round_to!r}")
    checked = _check_ratios(ratios)
    inputs, traced, graph = _analysed(model, example_input)
    groups, pinned = _groups(graph)
    _check_keys(checked, _prunable(groups, pinned))
    removed, summary = _choose(groups, pinned, channel_scores(graph, importance), checked, round_to)
    layers = _layer_plans(graph, removed)
    _warn_unused(model, traced, layers)
    return PruningPlan(
        model_class=type(model).__name__,
        layers=layers,
        groups=summary,
        ratios=checked,
        importance=importance,
        round_to=round_to,
        input_shapes=[list(t.shape) for t in inputs],
        trace=traced.mode,
    )
