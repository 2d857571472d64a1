"""torch.fx tracing of a model on an example input: symbolic first, concrete shapes as fallback, verified."""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from acdc_prune.pruning.errors import PruningError

#: Tensor attributes that describe a tensor rather than its data; read from the concrete value.
_METADATA_ATTRS = frozenset(
    {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse", "is_quantized"}
)
#: Tensor methods whose non-tensor result depends on shapes only, so it may be baked into the graph.
_METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "get_device"}
)
_METADATA_FUNCTIONS = frozenset({getattr, torch.numel, torch.is_tensor, torch.is_floating_point})
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
    """

    graph_module: torch.fx.GraphModule
    shapes: dict[torch.fx.Node, Any]
    mode: str


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


def _is_user_function(target: Any) -> bool:
    """A Python function registered with ``torch.fx.wrap`` (opaque to the channel analysis)."""
    module = getattr(target, "__module__", None) or ""
    return isinstance(target, types.FunctionType) and not module.startswith(("torch", "math", "operator"))


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


class _ConcreteMixin:
    """Python-level behaviour of a proxy that carries the concrete value it stands for."""

    value: Any

    def __getattr__(self, name: str) -> Any:
        if name in _METADATA_ATTRS:
            return getattr(self.value, name)
        return _ConcreteAttribute(self, name)

    def __bool__(self) -> bool:
        if isinstance(self.value, torch.Tensor):
            self.tracer.fail_data_dependent("bool() of a tensor (control flow on tensor values)")
        return bool(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        return iter([self[i] for i in range(len(self.value))])

    def __int__(self) -> int:
        self.tracer.fail_data_dependent("int() of a tensor")

    def __float__(self) -> float:
        self.tracer.fail_data_dependent("float() of a tensor")

    def __index__(self) -> int:
        self.tracer.fail_data_dependent("a tensor used as an index")


class _ConcreteProxy(_ConcreteMixin, torch.fx.Proxy):
    """A ``torch.fx.Proxy`` that also holds the node's value computed on the example input."""

    def __init__(self, node: torch.fx.Node, tracer: _ConcreteTracer, value: Any) -> None:
        super().__init__(node, tracer)
        self.value = value


class _ConcreteAttribute(_ConcreteMixin, torch.fx.proxy.Attribute):
    """An attribute access on a concrete proxy; becomes a method call or a ``getattr`` node."""

    @property
    def value(self) -> Any:
        return getattr(self.root.value, self.attr)


def _unwrap(args: Any) -> Any:
    return map_aggregate(args, lambda a: a.value if isinstance(a, _ConcreteMixin) else a)


class _ConcreteTracer(torch.fx.Tracer):
    """Symbolic tracer whose proxies carry concrete values, so shape-dependent Python runs for real.

    Every node is evaluated as it is recorded. Shape queries (``x.shape``, ``x.size()``) return the
    example input's concrete values, so ``if up.shape[-2:] != skip.shape[-2:]`` takes the branch
    the example takes; ``torch.jit.isinstance`` sees the concrete tensor; functions registered with
    ``torch.fx.wrap`` are traced into instead of recorded as opaque calls. Control flow on tensor
    *values* cannot be captured and raises ``PruningError``.
    """

    def __init__(self, placeholder_values: dict[str, Any]) -> None:
        super().__init__()
        self._placeholder_values = placeholder_values
        self._evaluating = 0
        self._recording = 0
        #: Shape of every recorded node's value, as :class:`TracedModel` wants them.
        self.shapes: dict[torch.fx.Node, Any] = {}
        #: The traced forward's return value, computed while tracing.
        self.output: Any = None

    def where(self) -> str:
        """The module whose forward is being traced, for error messages."""
        if not self.module_stack:
            return "the model's own forward"
        path, module_type = next(reversed(self.module_stack.values()))
        return f"module `{path}` ({getattr(module_type, '__name__', module_type)})"

    def fail_data_dependent(self, op: str) -> None:
        """Raise the error for an operation whose result depends on tensor values."""
        raise PruningError(
            f"cannot trace {self.where()}: {op} depends on tensor values, which torch.fx cannot record"
        )

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        self._evaluating += 1
        try:
            if kind == "placeholder":
                return self._placeholder_values.get(target, args[0] if args else None)
            if kind == "get_attr":
                return _fetch(self.root, target)
            args, kwargs = _unwrap(args), _unwrap(kwargs)
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return self.root.get_submodule(target)(*args, **kwargs)
        finally:
            self._evaluating -= 1

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple,
        kwargs: dict,
        name: str | None = None,
        type_expr: Any = None,
        proxy_factory_fn: Any = None,
    ) -> Any:
        if kind == "call_function" and _is_user_function(target):
            return target(*args, **kwargs)
        value = self._evaluate(kind, target, args, kwargs)
        if kind in ("call_function", "call_method") and not _has_tensor(value):
            if target not in _METADATA_METHODS and target not in _METADATA_FUNCTIONS:
                op = target if isinstance(target, str) else getattr(target, "__name__", str(target))
                self.fail_data_dependent(f"`{op}` returns a Python value computed from a tensor and")
            return value
        self._recording += 1
        try:
            proxy = super().create_proxy(
                kind,
                target,
                args,
                kwargs,
                name,
                type_expr,
                proxy_factory_fn=lambda node: _ConcreteProxy(node, self, value),
            )
        finally:
            self._recording -= 1
        self.shapes[proxy.node] = _shape_of(value)
        return proxy

    def create_arg(self, a: Any) -> Any:
        # Outside create_proxy, fx lowers only the forward's return value (into the output node).
        if not self._recording:
            self.output = _unwrap(a)
        return super().create_arg(a)


@contextmanager
def _concrete_jit_isinstance() -> Iterator[None]:
    """Let ``torch.jit.isinstance`` (used by MONAI's ``UpCat``) see a concrete proxy's value."""
    original = torch.jit.isinstance

    def patched(obj: Any, target_type: Any) -> bool:
        return original(obj.value if isinstance(obj, _ConcreteMixin) else obj, target_type)

    torch.jit.isinstance = patched
    try:
        yield
    finally:
        torch.jit.isinstance = original


class _ReplayError(Exception):
    """Replaying a graph failed at ``node``."""

    def __init__(self, node: torch.fx.Node, error: Exception) -> None:
        super().__init__(str(error))
        self.node = node
        self.error = error


@dataclass
class _Replay:
    output: Any
    shapes: dict[torch.fx.Node, Any]
    module_outputs: list[tuple[torch.fx.Node, Any]]


def _replay(
    graph_module: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], keep_module_outputs: bool = False
) -> _Replay:
    """Run a graph node by node, recording each value's shape (and leaf-module outputs on request)."""
    env: dict[torch.fx.Node, Any] = {}
    shapes: dict[torch.fx.Node, Any] = {}
    module_outputs: list[tuple[torch.fx.Node, Any]] = []
    remaining = iter(inputs)
    for node in graph_module.graph.nodes:
        args = torch.fx.node.map_arg(node.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
        try:
            if node.op == "placeholder":
                value = next(remaining, args[0] if args else None)
            elif node.op == "get_attr":
                value = _fetch(graph_module, node.target)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                value = graph_module.get_submodule(node.target)(*args, **kwargs)
            else:
                return _Replay(args[0], shapes, module_outputs)
        except Exception as error:
            raise _ReplayError(node, error) from error
        env[node] = value
        shapes[node] = _shape_of(value)
        if keep_module_outputs and node.op == "call_module":
            module_outputs.append((node, value))
    raise _ReplayError(node, RuntimeError("the graph has no output node"))


def _fetch(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [v.shape if isinstance(v, torch.Tensor) else None for v in value]
    return None


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


def _innermost_module(model: torch.nn.Module, node: torch.fx.Node) -> str:
    """Name and type of the module a graph node was traced in."""
    if node.op == "call_module":
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
    if not path:
        return f"the forward of {type(model).__name__}"
    return f"`{path}` ({type(model.get_submodule(path)).__name__})"


def _first_divergence(
    model: torch.nn.Module, graph_module: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> str:
    """Where a graph's replay first departs from the model: the first leaf module whose output differs."""
    reference: dict[str, list[Any]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            hooks.append(
                module.register_forward_hook(
                    lambda _m, _i, out, name=name: reference.setdefault(name, []).append(out)
                )
            )
    try:
        model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    try:
        replay = _replay(graph_module, inputs, keep_module_outputs=True)
    except _ReplayError as failure:
        where = _innermost_module(model, failure.node)
        return f"replaying the graph fails at {where} ({type(failure.error).__name__})"
    calls: dict[str, int] = {}
    for node, output in replay.module_outputs:
        index = calls.get(str(node.target), 0)
        calls[str(node.target)] = index + 1
        expected = reference.get(str(node.target), [])
        if index >= len(expected) or not _same_output(expected[index], output)[0]:
            return f"the first difference is at {_innermost_module(model, node)}"
    return "the difference arises after the last module call"


def _symbolic_graph(model: torch.nn.Module, defaults: dict[str, Any]) -> torch.fx.GraphModule | None:
    """Plain symbolic trace; ``None`` when it fails or records a function opaque to the analysis."""
    try:
        graph = torch.fx.Tracer().trace(model, concrete_args=defaults or None)
    except Exception:
        return None
    if any(node.op == "call_function" and _is_user_function(node.target) for node in graph.nodes):
        return None
    return torch.fx.GraphModule(model, graph)


def _concrete_graph(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], defaults: dict[str, Any]
) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, Any], Any]:
    """Trace with concrete shapes; ``PruningError`` naming the module when an op cannot be recorded.

    Returns the graph, each node's value shape and the output, all computed while tracing: every
    node is evaluated on its arguments' values as it is recorded, which is exactly a replay.
    """
    values = dict(zip(_input_names(model, len(inputs)), inputs, strict=True))
    tracer = _ConcreteTracer(values)
    try:
        with _concrete_jit_isinstance():
            graph = tracer.trace(model, concrete_args=defaults or None)
    except PruningError:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PruningError(
            f"cannot trace {tracer.where()} with torch.fx: {type(error).__name__}: {message}"
        ) from error
    for node in graph.nodes:
        # fx's wrapper of a torch.fx.wrap'ed function tags the node it gets back; after inlining, that
        # is a torch op or a module call, which must not be re-registered as a wrapped global.
        if node.op != "call_function" or getattr(node.target, "__module__", "").startswith("torch"):
            node.meta.pop("is_wrapped", None)
    return torch.fx.GraphModule(model, graph), tracer.shapes, tracer.output


def _verified(
    model: torch.nn.Module, graph_module: torch.fx.GraphModule, inputs: tuple, reference: Any
) -> tuple[dict[torch.fx.Node, Any] | None, float]:
    """Node shapes when the graph reproduces ``reference`` on ``inputs``; otherwise ``None``."""
    try:
        replay = _replay(graph_module, inputs)
    except _ReplayError:
        return None, float("inf")
    same, deviation = _same_output(reference, replay.output)
    return (replay.shapes if same else None), deviation


def trace_model(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> TracedModel:
    """Trace ``model`` with torch.fx and verify that the graph reproduces its output on ``inputs``.

    A plain symbolic trace is tried first. When it fails (shape-dependent control flow), records a
    function opaque to the channel analysis, or yields a graph whose replay differs from the model
    (MONAI's ``UpCat`` silently drops its skip under symbolic tracing), the model is traced again
    with the example input's concrete shapes and verified again. The model runs in eval mode under
    ``torch.no_grad`` and is left exactly as it was.

    Args:
        model: any ``nn.Module``.
        inputs: the positional example inputs of ``model.forward``, e.g. ``(x,)`` with x of shape
            (N, C, H, W).

    Returns:
        The verified graph and the shape of every node's value.

    Raises:
        PruningError: the model cannot run on the inputs, an operation cannot be traced, or no graph
            reproduces the model's output.
    """
    defaults = _extra_defaults(model, len(inputs))
    with eval_mode(model), torch.no_grad():
        try:
            reference = model(*inputs)
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise PruningError(
                f"{type(model).__name__} cannot run on the example input of shape "
                f"{_describe_inputs(inputs)}: {first_line}"
            ) from error
        graph_module = _symbolic_graph(model, defaults)
        if graph_module is not None:
            shapes, _ = _verified(model, graph_module, inputs, reference)
            if shapes is not None:
                return TracedModel(graph_module, shapes, "symbolic")
        graph_module, shapes, output = _concrete_graph(model, inputs, defaults)
        same, deviation = _same_output(reference, output)
        if not same:
            raise PruningError(
                f"the torch.fx graph of {type(model).__name__} does not reproduce its output on the "
                f"example input (max deviation {deviation:.3g}); "
                f"{_first_divergence(model, graph_module, inputs)}"
            )
        return TracedModel(graph_module, shapes, "concrete")
