"""torch.fx tracing of a model on an example input: symbolic first, concrete shapes as fallback, verified."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from acdc_prune.pruning.concrete import (
    ConcreteTracer,
    LeafTracer,
    concrete_patches,
    first_line,
    is_user_function,
    shape_of,
)
from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.recorded import RecordedCalls

#: Relative and absolute tolerance of the trace verification (the graph replays the same kernels).
_RTOL, _ATOL = 1e-4, 1e-5


@dataclass
class TracedModel:
    """A verified torch.fx graph of a model and the shape of every node's value on the example input.

    Attributes:
        graph_module: the traced graph; its ``call_module`` targets are the model's module names.
        shapes: node -> ``torch.Size`` for tensor values, a list of such (or ``None``) for tuples and
            lists of tensors, ``None`` for anything else.
        mode: ``"symbolic"`` (plain symbolic trace, valid for any input size) or ``"concrete"``
            (traced with the example input's concrete shapes baked in).
        opaque: path -> reason of every module torch.fx could not trace into, recorded as one call
            whose input and output channels are kept.
        shape_reads: for a concrete trace, node -> the dimensions of its value whose sizes the code
            read (and the graph baked in); a value whose channel count is read keeps its channels.
    """

    graph_module: torch.fx.GraphModule
    shapes: dict[torch.fx.Node, Any]
    mode: str
    opaque: dict[str, str] = field(default_factory=dict)
    shape_reads: dict[torch.fx.Node, set[int]] = field(default_factory=dict)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, then restore each one's own flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class _ReplayError(Exception):
    """Replaying a graph failed at ``node``."""

    def __init__(self, node: torch.fx.Node, error: Exception) -> None:
        super().__init__(str(error))
        self.node = node
        self.error = error


class _Diverged(Exception):
    """A replayed leaf-module call's output differs from the model's: at ``node``."""

    def __init__(self, node: torch.fx.Node) -> None:
        super().__init__(str(node))
        self.node = node


class _Replay(torch.fx.Interpreter):
    """Runs a traced graph on the example inputs, recording the shape of every node's value.

    Args:
        graph_module: the traced graph.
        reference: optional module path -> the model's outputs of each call of that module (from
            forward hooks); the run then stops with :class:`_Diverged` at the first ``call_module``
            node whose output differs.
        run_module: optional ``(module, args, kwargs) -> output`` that runs ``call_module`` nodes
            (a :class:`~acdc_prune.pruning.recorded.ReplayCalls`); by default the module is called.
    """

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        reference: dict[str, list[Any]] | None = None,
        run_module: Callable[[torch.nn.Module, tuple, dict], Any] | None = None,
    ):
        super().__init__(graph_module)
        self.extra_traceback = False
        self.shapes: dict[torch.fx.Node, Any] = {}
        self.reference = reference
        self.run_module = run_module
        self.calls: dict[str, int] = {}

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.run_module is None:
            return super().call_module(target, args, kwargs)
        return self.run_module(self.fetch_attr(target), args, kwargs)

    def output(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # fx hands the output over in its immutable containers; the model returns plain ones.
        return _plain(args[0])

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as error:
            raise _ReplayError(n, error) from error
        self.shapes[n] = shape_of(value)
        if self.reference is not None and n.op == "call_module":
            index = self.calls.get(str(n.target), 0)
            self.calls[str(n.target)] = index + 1
            expected = self.reference.get(str(n.target), [])
            if index >= len(expected) or not _same_output(expected[index], value)[0]:
                raise _Diverged(n)
        return value


def _plain(value: Any) -> Any:
    """A value with fx's immutable lists and dicts turned back into plain ones, recursively."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _same_output(expected: Any, actual: Any) -> tuple[bool, float]:
    """Whether two model outputs agree within the verification tolerance, and the max deviation."""
    leaves_e, spec_e = pytree.tree_flatten(expected)
    leaves_a, spec_a = pytree.tree_flatten(actual)
    if spec_e != spec_a:
        return False, float("inf")
    worst = 0.0
    for e, a in zip(leaves_e, leaves_a, strict=True):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or e.shape != a.shape:
                return False, float("inf")
            if e.numel():
                deviation = (e.float() - a.float()).abs().max().item()
                worst = max(worst, deviation)
                if deviation > _ATOL + _RTOL * e.float().abs().max().item():
                    return False, worst
        elif e != a:
            return False, float("inf")
    return True, worst


def _extra_defaults(model: torch.nn.Module, n_inputs: int) -> dict[str, Any]:
    """Forward parameters beyond the example inputs, fixed to their defaults for tracing."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    return {
        p.name: p.default
        for p in parameters[n_inputs:]
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _input_names(model: torch.nn.Module, n_inputs: int) -> list[str]:
    parameters = list(inspect.signature(model.forward).parameters.values())
    return [p.name for p in parameters[:n_inputs]]


def _describe_inputs(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in inputs)


def innermost_module(model: torch.nn.Module, node: torch.fx.Node) -> str:
    """Name and type of the module a graph node was traced in."""
    if node.op == "call_module":
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
    if not path:
        return f"the forward of {type(model).__name__}"
    return f"`{path}` ({type(model.get_submodule(path)).__name__})"


def detached_copy(value: Any) -> Any:
    """A copy of a module's output that later in-place operations (``ReLU(inplace=True)``) leave alone."""
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def _module_outputs(
    model: torch.nn.Module, graph_module: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> dict[str, list[Any]]:
    """The model's output of each call of every module the graph calls, by path (via forward hooks)."""
    reference: dict[str, list[Any]] = {}
    called = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_module"}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: reference.setdefault(name, []).append(detached_copy(out))
        )
        for name in sorted(called)
    ]
    try:
        model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return reference


def _first_divergence(
    model: torch.nn.Module, graph_module: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> str:
    """Where a graph's replay first departs from the model: the first module call whose output differs."""
    replay = _Replay(graph_module, _module_outputs(model, graph_module, inputs))
    try:
        replay.run(*inputs)
    except _ReplayError as failure:
        where = innermost_module(model, failure.node)
        return f"replaying the graph fails at {where} ({type(failure.error).__name__})"
    except _Diverged as divergence:
        return f"the first difference is at {innermost_module(model, divergence.node)}"
    return "the difference arises after the last module call"


def _symbolic_graph(model: torch.nn.Module, defaults: dict[str, Any]) -> torch.fx.GraphModule | None:
    """Plain symbolic trace; ``None`` when it fails or records a function opaque to the analysis."""
    try:
        graph = LeafTracer().trace(model, concrete_args=defaults or None)
    except Exception:
        return None
    if any(node.op == "call_function" and is_user_function(node.target) for node in graph.nodes):
        return None
    return torch.fx.GraphModule(model, graph)


def _concrete_graph(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    defaults: dict[str, Any],
    recorded: RecordedCalls,
) -> tuple[torch.fx.GraphModule, ConcreteTracer]:
    """Trace with concrete shapes; ``PruningError`` naming the module when an op cannot be recorded.

    Returns the graph and the tracer, which holds each node's value shape, the output and the opaque
    modules, all computed while tracing: every node is evaluated on its arguments' values as it is
    recorded, which is exactly a replay (taking the ``recorded`` outputs of identical layer calls).
    """
    values = dict(zip(_input_names(model, len(inputs)), inputs, strict=True))
    tracer = ConcreteTracer(values, recorded.replay())
    try:
        with concrete_patches():
            graph = tracer.trace(model, concrete_args=defaults or None)
    except PruningError:
        raise
    except Exception as error:
        raise PruningError(
            f"cannot trace {tracer.where()} with torch.fx: {type(error).__name__}: {first_line(error)}"
        ) from error
    for node in graph.nodes:
        # fx's wrapper of a torch.fx.wrap'ed function tags the node it gets back; after inlining, that
        # is a torch op or a module call, which must not be re-registered as a wrapped global.
        if node.op != "call_function" or getattr(node.target, "__module__", "").startswith("torch"):
            node.meta.pop("is_wrapped", None)
    return torch.fx.GraphModule(model, graph), tracer


def _verified(
    graph_module: torch.fx.GraphModule, inputs: tuple, reference: Any, recorded: RecordedCalls
) -> dict[torch.fx.Node, Any] | None:
    """Node shapes when the graph reproduces ``reference`` on ``inputs``; otherwise ``None``."""
    replay = _Replay(graph_module, run_module=recorded.replay())
    try:
        output = replay.run(*inputs)
    except _ReplayError:
        return None
    return replay.shapes if _same_output(reference, output)[0] else None


def _warn_opaque(opaque: dict[str, str]) -> None:
    if opaque:
        listed = "; ".join(f"`{path}`: {reason}" for path, reason in list(opaque.items())[:3])
        more = "; ..." if len(opaque) > 3 else ""
        warnings.warn(
            f"torch.fx cannot trace into {len(opaque)} module(s) ({listed}{more}); "
            "each is kept as an opaque block whose input and output channels stay, and the network is "
            "pruned around it",
            stacklevel=4,
        )


def trace_model(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> TracedModel:
    """Trace ``model`` with torch.fx and verify that the graph reproduces its output on ``inputs``.

    A plain symbolic trace is tried first. When it fails (shape-dependent control flow), records a
    function opaque to the channel analysis, or yields a graph whose replay differs from the model
    (MONAI's ``UpCat`` silently drops its skip under symbolic tracing), the model is traced again
    with the example input's concrete shapes and verified again. The model runs in eval mode under
    ``torch.no_grad`` and is left exactly as it was. It runs once: the replays take its recorded
    conv and linear outputs wherever they call those layers identically (see
    :class:`~acdc_prune.pruning.recorded.RecordedCalls`).

    Args:
        model: any ``nn.Module``.
        inputs: the positional example inputs of ``model.forward``, e.g. ``(x,)`` with x of shape
            (N, C, H, W).

    A submodule whose forward the concrete trace cannot follow (einops, an unsupported construct;
    not control flow on tensor values) is recorded as one opaque call, with a warning.

    Returns:
        The verified graph, the shape of every node's value and the opaque modules.

    Raises:
        PruningError: the model cannot run on the inputs, an operation cannot be traced, or no graph
            reproduces the model's output.
    """
    defaults = _extra_defaults(model, len(inputs))
    recorded = RecordedCalls(model)
    with eval_mode(model), torch.no_grad():
        try:
            with recorded.recording():
                reference = model(*inputs)
        except Exception as error:
            raise PruningError(
                f"{type(model).__name__} cannot run on the example input of shape "
                f"{_describe_inputs(inputs)}: {first_line(error)}"
            ) from error
        graph_module = _symbolic_graph(model, defaults)
        if graph_module is not None:
            shapes = _verified(graph_module, inputs, reference, recorded)
            if shapes is not None:
                return TracedModel(graph_module, shapes, "symbolic")
        graph_module, tracer = _concrete_graph(model, inputs, defaults, recorded)
        same, deviation = _same_output(reference, tracer.output)
        if not same:
            raise PruningError(
                f"the torch.fx graph of {type(model).__name__} does not reproduce its output on the "
                f"example input (max deviation {deviation:.3g}); "
                f"{_first_divergence(model, graph_module, inputs)}"
            )
        _warn_opaque(tracer.opaque)
        reads = {node: dims for node, dims in tracer.shape_reads.items() if dims}
        return TracedModel(graph_module, tracer.shapes, "concrete", dict(tracer.opaque), reads)
