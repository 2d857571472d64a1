"""Budget targets: the plan whose MACs, parameters or measured latency come to a fraction of the original."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.groups import LayerUse
from acdc_prune.pruning.importance import Batches, ImportanceSpec, LossFn, channel_scores, resolve_importance
from acdc_prune.pruning.plan import PruningPlan
from acdc_prune.pruning.planner import (
    DEFAULT_MAX_RATIO,
    Analysis,
    Step,
    analyse_model,
    build_plan,
    check_limits,
    global_order,
    layer_plans,
    take_steps,
)
from acdc_prune.pruning.rebuild import apply_plan, keep_applicable
from acdc_prune.pruning.tracing import eval_mode

#: Layers whose weight elements make MACs: convs (also transposed, grouped) and linears.
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
#: A cost term: ``coef * kept(out elements) * kept(in elements)``; a side of ``None`` counts 1.
Term = tuple[float, Sequence[int] | None, Sequence[int] | None]


class _Terms:
    """A sum of cost terms, evaluated for a mask of kept channel sets in a few vectorised operations."""

    def __init__(self, terms: list[Term], root_of: torch.Tensor) -> None:
        self.n = len(terms)
        self.coef = torch.tensor([t[0] for t in terms], dtype=torch.float64)
        sides = [t[1] for t in terms] + [t[2] for t in terms]
        self.base = torch.tensor([1.0 if side is None else 0.0 for side in sides], dtype=torch.float64)
        entries = [(i, e) for i, side in enumerate(sides) for e in side or ()]
        self.segment = torch.tensor([i for i, _ in entries], dtype=torch.long)
        self.index = root_of[torch.tensor([e for _, e in entries], dtype=torch.long)]

    def counts(self, keep: torch.Tensor) -> torch.Tensor:
        """Kept elements on every side (2 * n,): out sides first, then in sides."""
        return self.base.index_add(0, self.segment, keep[self.index].double())

    def total(self, keep: torch.Tensor) -> float:
        """The sum of the terms with only the ``keep`` channel sets (bool, one per element id)."""
        counts = self.counts(keep)
        return float((self.coef * counts[: self.n] * counts[self.n :]).sum())


def _weight_term(use: LayerUse) -> Term:
    """Weight elements of a conv/linear as a term (grouped convs keep their per-group fan-in)."""
    numel, out = use.module.weight.numel(), len(use.out_elems)
    if getattr(use.module, "groups", 1) > 1 or use.in_elems is None:
        return numel / out, use.out_elems, None
    return numel / (out * len(use.in_elems)), use.out_elems, use.in_elems


def _positions(node: torch.fx.Node, shapes: Mapping[torch.fx.Node, Any], module: nn.Module) -> int:
    """Positions a conv/linear call applies its weights at, as ``FlopCounterMode`` counts them."""
    out = shapes[node]
    if isinstance(module, nn.Linear):
        return out.numel() // out[-1]
    if module.transposed:
        source = node.args[0] if node.args else next(iter(node.kwargs.values()))
        out = shapes[source]
    return out[0] * out[2:].numel()


def _mac_terms(analysis: Analysis) -> list[Term]:
    terms = []
    layers = analysis.graph.layers
    for node in analysis.traced.graph_module.graph.nodes:
        use = layers.get(str(node.target)) if node.op == "call_module" else None
        if use is not None and isinstance(use.module, _WEIGHTED):
            coef, out, inp = _weight_term(use)
            terms.append((coef * _positions(node, analysis.traced.shapes, use.module), out, inp))
    return terms


def _param_terms(analysis: Analysis) -> list[Term]:
    terms = []
    for use in analysis.graph.layers.values():
        if isinstance(use.module, _WEIGHTED):
            terms.append(_weight_term(use))
            if use.module.bias is not None:
                terms.append((1.0, use.out_elems, None))
        else:
            channels = len(use.out_elems)
            terms.extend(
                (p.numel() / channels, use.out_elems, None) for p in use.module.parameters(recurse=False)
            )
    return terms


class CostModel:
    """Exact MACs and parameters of the network that removing channel sets leaves, without rebuilding it.

    MACs are counted as ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2 of one eval forward
    of the example input (convs and transposed convs: weight elements x output, resp. input,
    positions x batch; linears: weight elements x rows); parameters as ``sum(p.numel())``. Traced
    conv/linear calls and channel-sized parameters are counted from kept channels; the rest (ops the
    analysis keeps whole, e.g. attention products) is a constant measured once on the original.
    """

    def __init__(self, analysis: Analysis) -> None:
        root_of = torch.tensor(analysis.graph.elements.roots(), dtype=torch.long)
        self.size = len(root_of)
        self.terms = {
            "macs": _Terms(_mac_terms(analysis), root_of),
            "params": _Terms(_param_terms(analysis), root_of),
        }
        counter = FlopCounterMode(display=False)
        with eval_mode(analysis.model), torch.no_grad(), counter:
            analysis.model(*analysis.inputs)
        self.before = {
            "macs": counter.get_total_flops() // 2,
            "params": sum(p.numel() for p in analysis.model.parameters()),
        }
        full = self.keep(())
        self.fixed = {metric: self.before[metric] - terms.total(full) for metric, terms in self.terms.items()}

    def keep(self, removed: Iterable[int]) -> torch.Tensor:
        """A bool mask over element ids: ``False`` at the removed channel sets (roots)."""
        mask = torch.ones(self.size, dtype=torch.bool)
        mask[torch.as_tensor(list(removed), dtype=torch.long)] = False
        return mask

    def count(self, keep: torch.Tensor, metric: str) -> int:
        """MACs or parameters (``metric``) of the network keeping the ``keep`` channel sets."""
        return round(self.fixed[metric] + self.terms[metric].total(keep))


@dataclass
class BudgetResult:
    """A plan made to a budget, and what it reaches.

    Attributes:
        plan: the plan (``plan.budget`` records metric, target and reached fraction).
        metric: ``"macs"``, ``"params"`` or ``"latency"``.
        target: the fraction of the original asked for.
        reached_fraction: the plan's value over the original's.
        macs_before, macs_after: MACs of one forward of the example input, original and pruned.
        params_before, params_after: parameters, original and pruned.
        latency_before, latency_after: seconds from ``measure`` (latency budgets only).
    """

    plan: PruningPlan
    metric: str
    target: float
    reached_fraction: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    latency_before: float | None = None
    latency_after: float | None = None


@dataclass
class _Search:
    """What a budget search works with: the global ranking's steps, least important first."""

    analysis: Analysis
    costs: CostModel
    ordered: list[Step]
    target: float
    tolerance: float
    metric: str
    measure: Callable[[nn.Module], float] | None
    scores: Mapping[int, float]

    def prefix(self, count: int) -> torch.Tensor:
        """Keep mask after the first ``count`` ordered steps."""
        return self.costs.keep(r for step in self.ordered[:count] for r in step.roots)

    def unreachable(self, smallest: float) -> PruningError:
        """The error for a target below ``smallest``, the fraction the smallest allowed plan keeps."""
        return PruningError(
            f"target {self.target:g} of {self.metric} cannot be met: the smallest plan keeps {smallest:.3f} "
            "(min_channels, max_ratio and any scores of inf set that limit)"
        )


def _bisect(count: int, meets: Callable[[int], bool]) -> int:
    """The smallest ``t`` in [0, count] with ``meets(t)``, given ``meets(count)`` and monotone ``meets``."""
    low, high = 0, count
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _search_count(search: _Search) -> tuple[torch.Tensor, dict[str, float]]:
    """Fewest steps reaching the MAC/parameter target, then the closest fill from just above it."""
    costs, metric, target = search.costs, search.metric, search.target

    def fraction(keep: torch.Tensor) -> float:
        return costs.count(keep, metric) / costs.before[metric]

    smallest = fraction(search.prefix(len(search.ordered)))
    if smallest > target:
        raise search.unreachable(smallest)
    first = _bisect(len(search.ordered), lambda t: fraction(search.prefix(t)) <= target)
    best = search.prefix(first)
    if first == 0 or fraction(best) >= target * (1 - search.tolerance):
        return best, {}
    keep, low = search.prefix(first - 1), target * (1 - search.tolerance)

    def accept(step: Step) -> bool:
        nonlocal keep
        trial = keep.clone()
        trial[step.roots] = False
        if fraction(keep) <= target or fraction(trial) < low:
            return False
        keep = trial
        return True

    take_steps(search.ordered[first - 1 :], accept)
    return (keep if fraction(keep) <= target else best), {}


def _final(search: _Search, keep: torch.Tensor) -> set[int]:
    """The removed channel sets of a keep mask, less any that ``apply_plan`` could not take."""
    return keep_applicable(search.analysis.graph, set(torch.nonzero(~keep).flatten().tolist()), search.scores)


def _pruned(search: _Search, keep: torch.Tensor) -> nn.Module:
    """The network a keep mask leaves, rebuilt (for measuring)."""
    analysis = search.analysis
    plan = PruningPlan(
        type(analysis.model).__name__, layer_plans(analysis.graph, _final(search, keep)), [], {}
    )
    return apply_plan(analysis.model, plan)


def _search_latency(search: _Search) -> tuple[torch.Tensor, dict[str, float]]:
    """Bisection over the number of steps on the latencies ``measure`` reports, stopping within tolerance."""
    measure, steps = search.measure, len(search.ordered)
    before = float(measure(search.analysis.model))
    seconds = {steps: float(measure(_pruned(search, search.prefix(steps))))}
    if seconds[steps] > search.target * before:
        raise search.unreachable(seconds[steps] / before)
    low, high = 0, steps
    while low < high and seconds[high] < search.target * (1 - search.tolerance) * before:
        middle = (low + high) // 2
        seconds[middle] = float(measure(_pruned(search, search.prefix(middle))))
        if seconds[middle] <= search.target * before:
            high = middle
        else:
            low = middle + 1
    return search.prefix(high), {"latency_before": before, "latency_after": seconds[high]}


#: Metric -> search ``(search) -> (keep mask, extra BudgetResult fields)``.
SEARCHES: dict[str, Callable[[_Search], tuple[torch.Tensor, dict[str, float]]]] = {
    "macs": _search_count,
    "params": _search_count,
    "latency": _search_latency,
}


def _check_budget(target: float, metric: str, measure: Callable | None, tolerance: float) -> None:
    if metric not in SEARCHES:
        raise PruningError(f"budget metric '{metric}' is not one of {', '.join(SEARCHES)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise PruningError(f"target {target!r} must be a fraction in (0, 1] of the original's {metric}")
    if (metric == "latency") != (measure is not None):
        raise PruningError(
            "pass measure=, a function(model) -> seconds, with metric='latency' (and only then)"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise PruningError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")


def plan_to_budget(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    target: float,
    metric: str = "macs",
    importance: ImportanceSpec = "l1",
    round_to: int = 1,
    *,
    max_ratio: float | None = None,
    min_channels: int = 1,
    batches: Batches | None = None,
    loss_fn: LossFn | None = None,
    measure: Callable[[nn.Module], float] | None = None,
    tolerance: float = 0.02,
) -> BudgetResult:
    """Plan pruning down to ``target`` times the original's MACs, parameters or latency.

    Channel sets are ranked globally (scores divided by their group's mean, as ``scope="global"``)
    and removed least important first, within the limits (``max_ratio``, ``min_channels``,
    ``round_to``). The ranking is by importance alone, not per unit of cost saved: that order strips
    the full-resolution layers, whose channels cost the most MACs, to their floor first (on the demo
    U-Net at 30% of its MACs, Dice 0.000 even after retraining, against 0.916 by importance). For
    MACs and parameters, counted exactly from the trace without rebuilding, a bisection finds the
    fewest removals reaching the target, then a fill from just above it takes the next steps that
    keep the result within ``tolerance`` (relative) below the target. For latency, a bisection over
    the same order calls ``measure`` on rebuilt candidates (about log2 of the step count of them).

    Args:
        model: any ``nn.Module``; not modified.
        example_input: a tensor (N, C, ...) or one per forward argument; MACs are counted for it.
        target: fraction of the original to reach, in (0, 1].
        metric: ``"macs"``, ``"params"`` or ``"latency"``.
        importance: as for :func:`plan_pruning`.
        round_to: kept widths are multiples of this.
        max_ratio: the largest fraction of a group that may go (``None``: 0.9).
        min_channels: the fewest channel sets any group keeps.
        batches, loss_fn: data for data criteria, as for :func:`plan_pruning`.
        measure: ``measure(model) -> seconds`` for ``metric="latency"`` (called on the original and
            on pruned copies; it should time warm eval-mode forwards).
        tolerance: acceptable shortfall below the target, relative (0.02: within 2%).

    Returns:
        A :class:`BudgetResult` with the plan, target, reached fraction, MACs and parameters before
        and after (and latencies for a latency budget).

    Raises:
        PruningError: a target outside (0, 1], a target the smallest allowed plan cannot meet (the
            message gives what it keeps), an unknown metric, a latency budget without ``measure``,
            or anything :func:`plan_pruning` refuses.
    """
    _check_budget(target, metric, measure, tolerance)
    criterion = resolve_importance(importance)
    limits = check_limits(round_to, max_ratio, min_channels, DEFAULT_MAX_RATIO["global"])
    analysis = analyse_model(model, example_input)
    scores = channel_scores(analysis.graph, criterion, model, batches, loss_fn)
    costs = CostModel(analysis)
    ordered = global_order(analysis, scores, limits)
    search = _Search(analysis, costs, ordered, float(target), float(tolerance), metric, measure, scores)
    keep, extra = SEARCHES[metric](search)
    return _budget_result(search, _final(search, keep), extra, criterion.describe(), round_to)


def _budget_result(
    search: _Search, removed: set[int], extra: dict[str, float], importance: str, round_to: int
) -> BudgetResult:
    """The plan that removes ``removed`` (channel sets), with what it reached and costs before and after."""
    costs, metric = search.costs, search.metric
    after = {m: costs.count(costs.keep(removed), m) for m in ("macs", "params")}
    reached = (
        extra["latency_after"] / extra["latency_before"]
        if metric == "latency"
        else after[metric] / costs.before[metric]
    )
    total = sum(len(g.roots) for g in search.analysis.prunable())
    ratio = len(removed) / total if total else 0.0
    plan = build_plan(
        search.analysis,
        removed,
        lambda _group: ("budget", ratio),
        ratios={"default": ratio},
        importance=importance,
        round_to=round_to,
        scope="global",
        budget={"metric": metric, "target": search.target, "reached": reached},
    )
    return BudgetResult(
        plan,
        metric,
        search.target,
        reached,
        costs.before["macs"],
        after["macs"],
        costs.before["params"],
        after["params"],
        **extra,
    )
