"""Concrete-shape tracing with torch.fx: proxies that carry their values, opaque fallbacks, shape reads."""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.handlers import is_registered_leaf

#: Tensor attributes that describe a tensor rather than its data; read from the concrete value.
_METADATA_ATTRS = frozenset(
    {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse", "is_quantized"}
)
#: Tensor methods whose non-tensor result depends on shapes only, so it may be baked into the graph.
_METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "get_device"}
)
_METADATA_FUNCTIONS = frozenset({getattr, torch.numel, torch.is_tensor, torch.is_floating_point})


def is_user_function(target: Any) -> bool:
    """A Python function registered with ``torch.fx.wrap`` (opaque to the channel analysis)."""
    module = getattr(target, "__module__", None) or ""
    return isinstance(target, types.FunctionType) and not module.startswith(("torch", "math", "operator"))


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


class _ConcreteMixin:
    """Python-level behaviour of a proxy that carries the concrete value it stands for."""

    value: Any

    def __getattr__(self, name: str) -> Any:
        if name == "shape" and isinstance(self.value, torch.Tensor):
            return _TrackedSize(self.value.shape, self.tracer.reads_of(self))
        if name in _METADATA_ATTRS:
            return getattr(self.value, name)
        if name.startswith("__") and name.endswith("__"):
            # Protocol probes (``__cuda_array_interface__``, ``__array__``...) are absent, as on a tensor.
            raise AttributeError(name)
        return _ConcreteAttribute(self, name)

    def __bool__(self) -> bool:
        if isinstance(self.value, torch.Tensor):
            self.tracer.fail_data_dependent("bool() of a tensor (control flow on tensor values)")
        return bool(self.value)

    def __len__(self) -> int:
        if isinstance(self.value, torch.Tensor):
            self.tracer.reads_of(self).add(0)
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        return iter([self[i] for i in range(len(self.value))])

    def __int__(self) -> int:
        self.tracer.fail_data_dependent("int() of a tensor")

    def __float__(self) -> float:
        self.tracer.fail_data_dependent("float() of a tensor")

    def __index__(self) -> int:
        self.tracer.fail_data_dependent("a tensor used as an index")


class _TrackedSize(tuple):
    """A tensor's shape during concrete tracing that records which dimensions the traced code reads.

    The concrete trace bakes every size it reads into the graph; the pruned network recomputes them.
    Recording the reads lets the analysis keep the channels of a tensor whose channel count the code
    uses (``x.shape[1] // 2``, ``if a.shape == b.shape``), so the pruned network takes the same path.
    """

    reads: set[int]

    def __new__(cls, size: Iterable[int], reads: set[int] | None = None) -> _TrackedSize:
        tracked = super().__new__(cls, size)
        tracked.reads = set() if reads is None else reads
        return tracked

    def _read_all(self) -> None:
        self.reads.update(range(len(self)))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            self.reads.update(range(len(self))[index])
            return torch.Size(tuple.__getitem__(self, index))
        self.reads.add(index % len(self))
        return tuple.__getitem__(self, index)

    def __iter__(self) -> Iterator[int]:
        self._read_all()
        return tuple.__iter__(self)

    def __eq__(self, other: object) -> bool:
        self._read_all()
        return tuple(tuple.__iter__(self)) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __add__(self, other: Any) -> Any:
        self._read_all()
        return torch.Size(tuple.__iter__(self)) + other

    def numel(self) -> int:
        """The number of elements (reads every dimension)."""
        self._read_all()
        return math.prod(tuple.__iter__(self))


class _ConcreteProxy(_ConcreteMixin, torch.fx.Proxy):
    """A ``torch.fx.Proxy`` that also holds the node's value computed on the example input."""

    def __init__(self, node: torch.fx.Node, tracer: ConcreteTracer, value: Any) -> None:
        super().__init__(node, tracer)
        self.value = value


class _ConcreteAttribute(_ConcreteMixin, torch.fx.proxy.Attribute):
    """An attribute access on a concrete proxy; becomes a method call or a ``getattr`` node."""

    @property
    def value(self) -> Any:
        return getattr(self.root.value, self.attr)


def _unwrap(args: Any) -> Any:
    return map_aggregate(args, lambda a: a.value if isinstance(a, _ConcreteMixin) else a)


class _DataDependent(PruningError):
    """An operation whose result depends on tensor values: torch.fx cannot record it."""


class LeafTracer(torch.fx.Tracer):
    """The symbolic tracer, stopping also at registered modules (opaque blocks, custom handlers)."""

    def __init__(self) -> None:
        super().__init__()
        #: Paths of modules recorded as one call because their forward could not be traced.
        self.leaf_paths: set[str] = set()

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaf_paths
            or is_registered_leaf(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


class ConcreteTracer(LeafTracer):
    """Symbolic tracer whose proxies carry concrete values, so shape-dependent Python runs for real.

    Every node is evaluated as it is recorded. Shape queries (``x.shape``, ``x.size()``) return the
    example input's concrete values, so ``if up.shape[-2:] != skip.shape[-2:]`` takes the branch
    the example takes; ``torch.jit.isinstance`` sees the concrete tensor; functions registered with
    ``torch.fx.wrap`` are traced into instead of recorded as opaque calls. Control flow on tensor
    *values* cannot be captured and raises ``PruningError``. A submodule whose forward cannot be
    traced otherwise (einops, an unsupported Python construct) is recorded as one call instead: an
    opaque block, listed in :attr:`opaque`.

    Args:
        placeholder_values: forward parameter name -> its example value.
        run_module: ``(module, args, kwargs) -> output`` evaluating each recorded module call (a
            :class:`~acdc_prune.pruning.recorded.ReplayCalls`); by default the module is called.
    """

    def __init__(
        self,
        placeholder_values: dict[str, Any],
        run_module: Callable[[torch.nn.Module, tuple, dict], Any] | None = None,
    ) -> None:
        super().__init__()
        self._placeholder_values = placeholder_values
        self._run_module = run_module or (lambda module, args, kwargs: module(*args, **kwargs))
        self._evaluating = 0
        self._recording = 0
        self._output_depth = 0
        self._erased: set[torch.fx.Node] = set()
        #: Shape of every recorded node's value, as :class:`TracedModel` wants them.
        self.shapes: dict[torch.fx.Node, Any] = {}
        #: The traced forward's return value, computed while tracing.
        self.output: Any = None
        #: Path -> reason of each module recorded as an opaque call.
        self.opaque: dict[str, str] = {}
        #: Node -> the dimensions of its value whose sizes the traced code read.
        self.shape_reads: dict[torch.fx.Node, set[int]] = {}

    def reads_of(self, proxy: _ConcreteMixin) -> set[int]:
        """The set recording which dimensions of a proxy's tensor the code reads.

        Reads through an attribute (``x.T.shape``) are charged to every dimension of its root.
        """
        if isinstance(proxy, _ConcreteProxy):
            return self.shape_reads.setdefault(proxy.node, set())
        root = proxy
        while isinstance(root, _ConcreteAttribute):
            root = root.root
        if isinstance(root, _ConcreteProxy) and isinstance(root.value, torch.Tensor):
            self.shape_reads.setdefault(root.node, set()).update(range(root.value.ndim))
        return set()

    def _metadata(self, target: Any, args: tuple, value: Any) -> Any:
        """A shape query's result, its reads recorded (``x.size()`` as a :class:`_TrackedSize`)."""
        source = args[0] if args and isinstance(args[0], _ConcreteMixin) else None
        if source is None or not isinstance(source.value, torch.Tensor):
            return value
        reads, ndim = self.reads_of(source), source.value.ndim
        if isinstance(value, torch.Size):
            return _TrackedSize(value, reads)
        if target == "size" and len(args) > 1:
            reads.add(int(args[1]) % ndim)
        elif target in ("numel", "nelement", "stride") or target is torch.numel:
            reads.update(range(ndim))
        return value

    def where(self) -> str:
        """The module whose forward is being traced, for error messages."""
        if not self.module_stack:
            return "the model's own forward"
        path, module_type = next(reversed(self.module_stack.values()))
        return f"module `{path}` ({getattr(module_type, '__name__', module_type)})"

    def fail_data_dependent(self, op: str) -> None:
        """Raise the error for an operation whose result depends on tensor values."""
        raise _DataDependent(
            f"cannot trace {self.where()}: {op} depends on tensor values, which torch.fx cannot record"
        )

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        n_nodes, depth = len(self.graph.nodes), len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _DataDependent:
            raise
        except Exception as error:
            self._roll_back(n_nodes, depth)
            self.opaque[path] = f"{type(error).__name__}: {first_line(error)}"
            self.leaf_paths.add(path)
            return super().call_module(m, forward, args, kwargs)

    def _roll_back(self, n_nodes: int, depth: int) -> None:
        """Forget what a failed module trace recorded: nodes after the first ``n_nodes``, stack entries."""
        for node in reversed(list(self.graph.nodes)[n_nodes:]):
            self.graph.erase_node(node)
            self.shapes.pop(node, None)
            self.shape_reads.pop(node, None)
            self._erased.add(node)
        while len(self.module_stack) > depth:
            self.module_stack.popitem(last=True)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        for name in [n for n, proxy in parameter_proxy_cache.items() if proxy.node in self._erased]:
            del parameter_proxy_cache[name]
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
            return self._run_module(self.root.get_submodule(target), args, kwargs)
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
        if kind == "call_function" and is_user_function(target):
            return target(*args, **kwargs)
        value = self._evaluate(kind, target, args, kwargs)
        if kind in ("call_function", "call_method") and not _has_tensor(value):
            # A Python value from tensors is data-dependent, unless it describes their shapes; one from
            # constants (fx's guards on non-tensor forward arguments) is just that constant.
            if target in _METADATA_METHODS or target in _METADATA_FUNCTIONS:
                return self._metadata(target, args, value)
            if _has_tensor(_unwrap((args, kwargs))):
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
        self.shapes[proxy.node] = shape_of(value)
        return proxy

    def create_arg(self, a: Any) -> Any:
        if self._recording:
            return super().create_arg(a)
        # Outside create_proxy, fx lowers only the forward's return value (into the output node); its
        # outermost call sees the whole value (a tensor, or a list or dict of them).
        if not self._output_depth:
            self.output = pytree.tree_map(lambda v: v.value if isinstance(v, _ConcreteMixin) else v, a)
        self._output_depth += 1
        try:
            return super().create_arg(a)
        finally:
            self._output_depth -= 1


@contextmanager
def concrete_patches() -> Iterator[None]:
    """Let ``torch.jit.isinstance`` (MONAI's ``UpCat``) and ``torch.as_tensor`` (``HighResBlock``) see
    through a concrete proxy: the first checks its value, the second returns a tensor proxy unchanged."""
    original_isinstance, original_as_tensor = torch.jit.isinstance, torch.as_tensor

    def patched_isinstance(obj: Any, target_type: Any) -> bool:
        return original_isinstance(obj.value if isinstance(obj, _ConcreteMixin) else obj, target_type)

    def patched_as_tensor(data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, _ConcreteMixin) and isinstance(data.value, torch.Tensor) and not args:
            return data.to(**kwargs) if kwargs else data
        return original_as_tensor(data, *args, **kwargs)

    torch.jit.isinstance, torch.as_tensor = patched_isinstance, patched_as_tensor
    try:
        yield
    finally:
        torch.jit.isinstance, torch.as_tensor = original_isinstance, original_as_tensor


def _fetch(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def shape_of(value: Any) -> Any:
    """A tensor's ``torch.Size``; for a tuple or list, a list of them (``None`` for others); else ``None``."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [v.shape if isinstance(v, torch.Tensor) else None for v in value]
    return None


def first_line(error: Exception) -> str:
    """The first line of an exception's message (empty when it has none)."""
    return (str(error).strip().splitlines() or [""])[0]
