"""The pruning plan: kept channel indices per layer, as data that round-trips through readable JSON."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from acdc_prune.pruning.errors import PruningError

PLAN_FORMAT = "acdc-prune-plan"
PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """What happens to one module of the original model.

    Attributes:
        type: the module's class name (``"Conv2d"``, ``"BatchNorm2d"``, ...), checked on apply.
        kept_out: sorted kept output-channel indices, ``None`` when the outputs are untouched. For
            norms and PReLU (whose parameters follow their input) equal to ``kept_in``.
        kept_in: sorted kept input-channel indices, ``None`` when the inputs are untouched.
        shapes: parameter or buffer name -> ``[shape before, shape after]`` for every tensor of the
            module that changes shape; the "before" shapes fingerprint the model the plan is for.
        axis: for ``LayerNorm`` only, the axis of ``normalized_shape`` that holds the channels.
    """

    type: str
    kept_out: list[int] | None
    kept_in: list[int] | None
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)
    axis: int | None = None


@dataclass
class GroupPlan:
    """One coupled channel group and the ratio applied to it (a summary, not needed to rebuild).

    Attributes:
        layers: the layers that create the group's channels (convs, linears), in execution order;
            the ratio is looked up for the first of them.
        key: the ratio key that matched the first layer (``"default"`` when none did).
        ratio: the fraction of the group's channel sets asked to be removed.
        channels: number of channel sets in the group (channels merged by a residual add or a
            grouped conv count once).
        kept: number of channel sets kept, after rounding and pins.
    """

    layers: list[str]
    key: str
    ratio: float
    channels: int
    kept: int


@dataclass
class PruningPlan:
    """The outcome of :func:`plan_pruning`: enough, with a state_dict, to rebuild the pruned network.

    Attributes:
        model_class: class name of the planned model, checked on apply.
        layers: original module name (as in ``named_modules()``) -> :class:`LayerPlan`, for every
            module whose parameters, buffers or channel counts change.
        groups: a summary of every prunable channel group, in execution order.
        ratios: the ratios asked for, by module-path prefix plus ``"default"``.
        importance: the criterion that ranked the channels (``"l1"``, ``"taylor"``, ...).
        round_to: kept widths were rounded up to a multiple of this.
        input_shapes: shapes of the example inputs the model was traced with.
        trace: ``"symbolic"`` or ``"concrete"`` (traced with the example input's concrete shapes).
        scope: ``"block"`` (ratios per block) or ``"global"`` (one ranking over the network).
        budget: for a plan made to a budget, ``metric``, ``target`` and ``reached`` (fractions of
            the original); ``None`` otherwise.
        steps: for a composed plan, the summary (importance, scope, ratios, round_to, budget) of
            every plan composed, first first; empty for a plan made in one step.
    """

    model_class: str
    layers: dict[str, LayerPlan]
    groups: list[GroupPlan]
    ratios: dict[str, float]
    importance: str = "l1"
    round_to: int = 1
    input_shapes: list[list[int]] = field(default_factory=list)
    trace: str = "symbolic"
    scope: str = "block"
    budget: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a format tag and version."""
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> PruningPlan:
        """Inverse of :meth:`to_dict`; ``PruningError`` when ``data`` is not a valid plan."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PruningError("the data is not an acdc-prune pruning plan (missing 'format' tag)")
        if data.get("version") != PLAN_VERSION:
            raise PruningError(f"pruning plan version {data.get('version')} is not supported (expected 1)")
        try:
            layers = {str(name): _layer_from_dict(name, entry) for name, entry in data["layers"].items()}
            groups = [GroupPlan(**group) for group in data["groups"]]
            return cls(
                model_class=str(data["model_class"]),
                layers=layers,
                groups=groups,
                ratios={str(k): float(v) for k, v in data["ratios"].items()},
                importance=str(data["importance"]),
                round_to=int(data["round_to"]),
                input_shapes=[[int(s) for s in shape] for shape in data["input_shapes"]],
                trace=str(data["trace"]),
                scope=str(data.get("scope", "block")),
                budget=None if data.get("budget") is None else dict(data["budget"]),
                steps=[dict(step) for step in data.get("steps", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PruningError(f"the pruning plan is malformed: {type(error).__name__}: {error}") from error

    def to_json(self) -> str:
        """The plan as human-readable JSON text (index lists on one line), as :meth:`save` writes it."""
        return _dumps(self.to_dict()) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        """Inverse of :meth:`to_json`; ``PruningError`` when ``text`` is not a valid plan."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise PruningError(f"the pruning plan is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` atomically (a crash never leaves half a plan); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a plan written by :meth:`save`; ``PruningError`` when unreadable or malformed."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PruningError(f"cannot read the pruning plan {path}: {error}") from None
        return cls.from_dict(data)


def _indices(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    indices = [int(i) for i in value]
    if any(i < 0 for i in indices) or indices != sorted(set(indices)):
        raise PruningError(f"the pruning plan's layer '{name}' has unsorted, repeated or negative indices")
    return indices


def _layer_from_dict(name: str, entry: dict[str, Any]) -> LayerPlan:
    return LayerPlan(
        type=str(entry["type"]),
        kept_out=_indices(name, entry["kept_out"]),
        kept_in=_indices(name, entry["kept_in"]),
        shapes={str(k): [[int(s) for s in shape] for shape in v] for k, v in entry["shapes"].items()},
        axis=None if entry.get("axis") is None else int(entry["axis"]),
    )


def _is_flat(value: Any) -> bool:
    """Lists of scalars, or of lists of scalars (shapes), print on one line."""
    scalar = (int, float, str, bool, type(None))
    return all(
        isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(w, scalar) for w in v))
        for v in value
    )


def _dumps(value: Any, depth: int = 0) -> str:
    """JSON with two-space indentation whose index and shape lists stay on one line."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and not _is_flat(value):
        return "[\n" + ",\n".join(inner + _dumps(v, depth + 1) for v in value) + "\n" + pad + "]"
    if isinstance(value, float) and not math.isfinite(value):
        raise PruningError(f"cannot write the non-finite number {value} into a pruning plan")
    return json.dumps(value)


def _chain(name: str, side: str, first: list[int] | None, second: list[int] | None) -> list[int] | None:
    """Original indices kept by ``first`` then ``second`` (whose indices count ``first``'s survivors)."""
    if second is None:
        return first
    if first is None:
        return list(second)
    if second and second[-1] >= len(first):
        raise PruningError(
            f"the second plan keeps {side} channel {second[-1]} of layer '{name}', which has only "
            f"{len(first)} after the first plan: it was made for another network"
        )
    return [first[i] for i in second]


def _compose_layer(name: str, first: LayerPlan | None, second: LayerPlan | None) -> LayerPlan:
    if first is None or second is None:
        return copy.deepcopy(first or second)
    if first.type != second.type:
        raise PruningError(
            f"the plans disagree on layer '{name}': a {first.type} in one, a {second.type} in the other"
        )
    shapes = {}
    for key in dict.fromkeys([*first.shapes, *second.shapes]):
        if key in first.shapes and key in second.shapes and first.shapes[key][1] != second.shapes[key][0]:
            raise PruningError(
                f"the second plan expects '{name}.{key}' of shape {second.shapes[key][0]}, the first plan "
                f"leaves {first.shapes[key][1]}: it was made for another network"
            )
        before = first.shapes[key][0] if key in first.shapes else second.shapes[key][0]
        after = second.shapes[key][1] if key in second.shapes else first.shapes[key][1]
        shapes[key] = [list(before), list(after)]
    return LayerPlan(
        type=first.type,
        kept_out=_chain(name, "output", first.kept_out, second.kept_out),
        kept_in=_chain(name, "input", first.kept_in, second.kept_in),
        shapes=shapes,
        axis=first.axis,
    )


def _step_summaries(plan: PruningPlan) -> list[dict[str, Any]]:
    if plan.steps:
        return copy.deepcopy(plan.steps)
    summary = {"importance": plan.importance, "scope": plan.scope, "ratios": dict(plan.ratios)}
    return [{**summary, "round_to": plan.round_to, "budget": copy.deepcopy(plan.budget)}]


def _compose_groups(first: list[GroupPlan], second: list[GroupPlan]) -> list[GroupPlan]:
    """Original channel counts from ``first``, final kept counts, key and ratio from ``second``."""
    later = {tuple(g.layers): g for g in second}
    groups = []
    for group in first:
        after = later.pop(tuple(group.layers), None)
        source = after or group
        groups.append(GroupPlan(list(group.layers), source.key, source.ratio, group.channels, source.kept))
    return groups + [copy.deepcopy(g) for g in later.values()]


def compose(first: PruningPlan, second: PruningPlan) -> PruningPlan:
    """One plan, against the original architecture, that prunes as ``first`` then ``second`` do.

    ``second`` must have been made on ``apply_plan(model, first)``. Then
    ``apply_plan(model, compose(first, second))`` has the same shapes and bit-identical weights as
    ``apply_plan(apply_plan(model, first), second)``: kept indices are chained, so each tensor is
    sliced once from the original. The result records the original model class, example inputs and
    trace, the second plan's ratios, importance and scope, and in ``steps`` every plan composed (a
    child of a child records one plan and its whole history).

    Raises:
        PruningError: the plans are for different model classes, or ``second`` does not fit the
            network ``first`` produces (a layer's type, a shape or a channel index disagrees).
    """
    if first.model_class != second.model_class:
        raise PruningError(
            f"cannot compose a plan for a {first.model_class} with one for a {second.model_class}"
        )
    layers = {
        name: _compose_layer(name, first.layers.get(name), second.layers.get(name))
        for name in dict.fromkeys([*first.layers, *second.layers])
    }
    return PruningPlan(
        model_class=first.model_class,
        layers=layers,
        groups=_compose_groups(first.groups, second.groups),
        ratios=dict(second.ratios),
        importance=second.importance,
        round_to=second.round_to,
        input_shapes=copy.deepcopy(first.input_shapes),
        trace=first.trace,
        scope=second.scope,
        budget=copy.deepcopy(second.budget),
        steps=_step_summaries(first) + _step_summaries(second),
    )
