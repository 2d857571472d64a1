"""Channel dependency analysis of a traced graph: which channels of which layers must go together.

Every channel of every tensor in the graph is an *element*. Elements that must be kept or removed
together are merged in a union-find (a residual add merges its operands' channels pairwise; a
grouped conv merges each group's input and output channels). Elements that must never be removed
(the model's inputs and outputs, operands of operations the analysis does not understand) are
*pinned*. A second union-find, coarser, links the channels created together by one layer: its
components are the *groups* a pruning ratio applies to. Concatenation neither merges nor links: it
lays its operands' elements side by side, so the consumer sees each producer's channels at their
offsets (a tensor concatenated twice appears twice).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate

from acdc_prune.pruning.tracing import TracedModel

Node = torch.fx.Node


class UnionFind:
    """Disjoint sets over the integers 0..n-1, grown with :meth:`add`."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> list[int]:
        """Create ``n`` new singleton elements and return their ids."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        """Representative of ``a``'s set."""
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b`` (the smaller id becomes the representative)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class Chan:
    """The channel elements of a tensor value: ``elems[i]`` is channel ``i`` along dimension ``dim``."""

    elems: tuple[int, ...]
    dim: int


@dataclass
class LayerUse:
    """How a module with channel-sized parameters sees the elements.

    Attributes:
        name: module path in the model.
        kind: ``"conv"`` (also transposed), ``"linear"``, ``"norm"`` (batch/instance norm),
            ``"group_norm"``, ``"layer_norm"`` or ``"prelu"``.
        module: the module itself.
        out_elems: element of each output channel (``None``: the outputs are not analysed).
        in_elems: element of each input channel (``None``: the inputs come from somewhere the
            analysis cannot follow, so they are kept). For norms and PReLU, equal to ``out_elems``.
        axis: for ``layer_norm``, the axis of ``normalized_shape`` that holds the channels.
    """

    name: str
    kind: str
    module: nn.Module
    out_elems: list[int] | None
    in_elems: list[int] | None
    axis: int = 0


@dataclass
class ChannelGraph:
    """Result of the analysis: element sets, pins, the layers that use them, and group constraints.

    Attributes:
        elements: union-find of elements that are kept or removed together.
        groups: union-find linking elements into ratio groups (a superset of ``elements``' merges).
        pinned: elements that must be kept.
        layers: every analysed module by name, in execution order.
        producers: names of the layers whose output channels are created (convs, linears), in
            execution order; their filters' norms give the importance.
        multiples: ``(elements, num_groups)`` of each GroupNorm input: its kept width must stay a
            multiple of ``num_groups``.
    """

    elements: UnionFind
    groups: UnionFind
    pinned: set[int]
    layers: dict[str, LayerUse]
    producers: list[str]
    multiples: list[tuple[list[int], int]] = field(default_factory=list)


_PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
#: Functions and tensor methods that act position-wise on channels (element-wise maths, activations,
#: dropout, pooling, resizing, padding, broadcasting); their tensor operands' channels are merged.
_ELEMENTWISE_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.abs,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.subtract,
        torch.mul,
        torch.multiply,
        torch.div,
        torch.divide,
        torch.true_divide,
        torch.maximum,
        torch.minimum,
        torch.where,
        torch.relu,
        torch.relu_,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.log,
        torch.abs,
        torch.neg,
        torch.sqrt,
        torch.rsqrt,
        torch.square,
        torch.pow,
        torch.clamp,
        torch.clip,
        torch.erf,
        F.relu,
        F.relu_,
        F.relu6,
        F.leaky_relu,
        F.leaky_relu_,
        F.elu,
        F.selu,
        F.celu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.softplus,
        F.softsign,
        F.tanhshrink,
        F.logsigmoid,
        F.sigmoid,
        F.tanh,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        F.interpolate,
        F.upsample,
        F.upsample_nearest,
        F.upsample_bilinear,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.lp_pool1d,
        F.lp_pool2d,
        F.pad,
    }
)
_ELEMENTWISE_METHODS = frozenset(
    {
        "add",
        "add_",
        "sub",
        "sub_",
        "mul",
        "mul_",
        "div",
        "div_",
        "pow",
        "neg",
        "abs",
        "exp",
        "log",
        "sqrt",
        "square",
        "clamp",
        "clamp_",
        "clip",
        "relu",
        "relu_",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "maximum",
        "minimum",
        "contiguous",
        "clone",
        "detach",
        "float",
        "double",
        "half",
        "bfloat16",
        "to",
        "type_as",
        "cpu",
        "requires_grad_",
        "expand",
        "expand_as",
        "repeat",
    }
)
_SOFTMAX_FUNCTIONS = frozenset({F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax})
_SOFTMAX_METHODS = frozenset({"softmax", "log_softmax"})
_CAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})
_SPLIT_FUNCTIONS = frozenset({torch.split, torch.chunk})
_SPLIT_METHODS = frozenset({"split", "chunk"})
_RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze})
_RESHAPE_METHODS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
_PERMUTE_FUNCTIONS = frozenset({torch.permute, torch.transpose, torch.swapaxes, torch.movedim})
_PERMUTE_METHODS = frozenset({"permute", "transpose", "swapaxes", "movedim"})
_REDUCE_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax, torch.amin})
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin"})


def _nodes_in(value: Any) -> list[Node]:
    """All graph nodes inside a (nested) argument."""
    found: list[Node] = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return found


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Analyzer:
    """Walks a traced graph once, assigning channel elements to every tensor value."""

    def __init__(self, traced: TracedModel, model: nn.Module) -> None:
        self.shapes = traced.shapes
        self.graph = traced.graph_module.graph
        self.modules = dict(model.named_modules())
        self.elements = UnionFind()
        self.groups = UnionFind()
        self.pinned: set[int] = set()
        self.layers: dict[str, LayerUse] = {}
        self.producers: list[str] = []
        self.multiples: list[tuple[list[int], int]] = []
        self.info: dict[Node, Any] = {}

    def run(self) -> ChannelGraph:
        for node in self.graph.nodes:
            self.info[node] = self._visit(node)
        self._pin_parameters_used_directly()
        return ChannelGraph(
            self.elements, self.groups, self.pinned, self.layers, self.producers, self.multiples
        )

    def _fresh(self, n: int, pinned: bool = False) -> list[int]:
        ids = self.elements.add(n)
        self.groups.add(n)
        for a, b in zip(ids, ids[1:], strict=False):
            self.groups.union(a, b)
        if pinned:
            self.pinned.update(ids)
        return ids

    def _merge(self, a: int, b: int) -> None:
        self.elements.union(a, b)
        self.groups.union(a, b)

    def _merge_all(self, xs: Iterable[int], ys: Iterable[int]) -> None:
        for a, b in zip(xs, ys, strict=True):
            self._merge(a, b)

    def _pin(self, info: Any) -> None:
        if isinstance(info, Chan):
            self.pinned.update(info.elems)
        elif isinstance(info, list):
            for item in info:
                self._pin(item)

    def _unknown(self, node: Node) -> None:
        """An operation the analysis does not understand: its operands' channels are all kept."""
        for arg in _nodes_in((node.args, node.kwargs)):
            self._pin(self.info.get(arg))

    def _chan(self, node: Any) -> Chan | None:
        info = self.info.get(node) if isinstance(node, Node) else None
        return info if isinstance(info, Chan) else None

    def _visit(self, node: Node) -> Any:
        shape = self.shapes.get(node)
        if node.op == "output":
            for arg in _nodes_in(node.args):
                self._pin(self.info.get(arg))
            return None
        if node.op == "placeholder":
            if isinstance(shape, torch.Size) and len(shape) >= 2:
                return Chan(tuple(self._fresh(shape[1], pinned=True)), 1)
            return None
        if node.op == "get_attr" or shape is None:
            return None
        if node.op == "call_module":
            return self._visit_module(node, self.modules[str(node.target)])
        return self._visit_call(node, node.target if node.op == "call_function" else str(node.target))

    def _visit_call(self, node: Node, target: Any) -> Any:
        is_method = node.op == "call_method"
        if target is operator.getitem:
            return self._getitem(node)
        if target in (_ELEMENTWISE_METHODS if is_method else _ELEMENTWISE_FUNCTIONS):
            return self._elementwise(node, _nodes_in((node.args, node.kwargs)))
        if target in (_SOFTMAX_METHODS if is_method else _SOFTMAX_FUNCTIONS):
            return self._softmax(node, _arg(node, 1, "dim"))
        if not is_method and target in _CAT_FUNCTIONS:
            return self._cat(node, list(_arg(node, 0, "tensors")), _arg(node, 1, "dim", 0))
        if not is_method and target is torch.stack:
            return self._stack(node, list(_arg(node, 0, "tensors")), _arg(node, 1, "dim", 0))
        if target in (_SPLIT_METHODS if is_method else _SPLIT_FUNCTIONS):
            return self._split(node, _arg(node, 2, "dim", 0))
        if target in (_RESHAPE_METHODS if is_method else _RESHAPE_FUNCTIONS):
            return self._reshape(node, node.args[0])
        if target in (_PERMUTE_METHODS if is_method else _PERMUTE_FUNCTIONS):
            return self._permute(node, str(target) if is_method else target.__name__)
        if target in (_REDUCE_METHODS if is_method else _REDUCE_FUNCTIONS):
            return self._reduce(node, _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)))
        if target in (F.pixel_shuffle, F.pixel_unshuffle):
            factor = _arg(node, 1, "upscale_factor" if target is F.pixel_shuffle else "downscale_factor")
            return self._pixel_shuffle(node, int(factor), target is F.pixel_shuffle)
        self._unknown(node)
        return None

    def _visit_module(self, node: Node, module: nn.Module) -> Any:
        source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if isinstance(module, nn.modules.conv._ConvNd):
            return self._conv(node, module, source)
        if isinstance(module, nn.Linear):
            return self._linear(node, module, source)
        if isinstance(module, nn.modules.batchnorm._NormBase):
            return self._per_channel(node, module, source, "norm", module.num_features)
        if isinstance(module, nn.GroupNorm):
            chan = self._per_channel(node, module, source, "group_norm", module.num_channels)
            if chan is not None:
                self.multiples.append((list(chan.elems), module.num_groups))
            return chan
        if isinstance(module, nn.PReLU):
            if module.num_parameters == 1:
                return self._elementwise(node, [source])
            return self._per_channel(node, module, source, "prelu", module.num_parameters)
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, module, source)
        if isinstance(module, _PASS_THROUGH_MODULES):
            return self._elementwise(node, [source])
        if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self._softmax(node, module.dim)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self._reshape(node, source)
        if isinstance(module, nn.PixelShuffle):
            return self._pixel_shuffle(node, module.upscale_factor, True)
        if isinstance(module, nn.PixelUnshuffle):
            return self._pixel_shuffle(node, module.downscale_factor, False)
        self._unknown(node)
        return None

    def _layer(self, name: str, kind: str, module: nn.Module, out_elems: list[int] | None) -> LayerUse:
        use = self.layers.get(name)
        if use is None:
            use = LayerUse(name, kind, module, out_elems, None)
            self.layers[name] = use
            if kind in ("conv", "linear"):
                self.producers.append(name)
        return use

    def _bind_inputs(self, use: LayerUse, in_elems: list[int] | None, first_call: bool) -> None:
        """Record a call's input elements; a module called twice must see the same channels."""
        if first_call:
            use.in_elems = in_elems
        elif use.in_elems is None or in_elems is None:
            self.pinned.update(use.in_elems or in_elems or [])
            use.in_elems = None
        else:
            self._merge_all(use.in_elems, in_elems)

    def _input_elems(self, source: Any, size: int, dim: int | None = 1) -> list[int] | None:
        """Elements of a layer's input channels, or ``None`` when the input is not a plain channel map."""
        chan = self._chan(source)
        shape = self.shapes.get(source)
        if chan is None or not isinstance(shape, torch.Size):
            return None
        expected = len(shape) - 1 if dim is None else dim
        if chan.dim != expected or len(chan.elems) != size:
            self._pin(chan)
            return None
        return list(chan.elems)

    def _conv(self, node: Node, module: nn.modules.conv._ConvNd, source: Any) -> Chan:
        first_call = str(node.target) not in self.layers
        out = self._fresh(module.out_channels) if first_call else None
        use = self._layer(str(node.target), "conv", module, out)
        in_elems = self._input_elems(source, module.in_channels)
        self._bind_inputs(use, in_elems, first_call)
        groups = module.groups
        if first_call and groups > 1:
            in_per_group = module.in_channels // groups
            out_per_group = module.out_channels // groups
            for g in range(groups):
                outs = use.out_elems[g * out_per_group : (g + 1) * out_per_group]
                for e in outs[1:]:
                    self._merge(outs[0], e)
                if in_elems is None:
                    self.pinned.update(outs)
                else:
                    for e in in_elems[g * in_per_group : (g + 1) * in_per_group]:
                        self._merge(outs[0], e)
        return Chan(tuple(use.out_elems), 1)

    def _linear(self, node: Node, module: nn.Linear, source: Any) -> Chan | None:
        shape = self.shapes[node]
        first_call = str(node.target) not in self.layers
        out = self._fresh(module.out_features) if first_call else None
        use = self._layer(str(node.target), "linear", module, out)
        self._bind_inputs(use, self._input_elems(source, module.in_features, dim=None), first_call)
        return Chan(tuple(use.out_elems), len(shape) - 1)

    def _per_channel(self, node: Node, module: nn.Module, source: Any, kind: str, size: int) -> Chan | None:
        """Norms and per-channel PReLU: parameters follow the input channels, output = input."""
        elems = self._input_elems(source, size)
        if elems is None:
            self._pin(self._chan(source))
            return self._chan(source)
        use = self.layers.get(str(node.target))
        if use is None:
            self.layers[str(node.target)] = LayerUse(str(node.target), kind, module, elems, elems)
        else:
            self._bind_inputs(use, elems, first_call=False)
        return Chan(tuple(elems), 1)

    def _layer_norm(self, node: Node, module: nn.LayerNorm, source: Any) -> Chan | None:
        chan, shape = self._chan(source), self.shapes.get(source)
        if chan is None or not isinstance(shape, torch.Size):
            return chan
        first_normalized = len(shape) - len(module.normalized_shape)
        if chan.dim < first_normalized:
            return chan
        name = str(node.target)
        if name in self.layers:
            self._bind_inputs(self.layers[name], list(chan.elems), first_call=False)
        else:
            elems = list(chan.elems)
            self.layers[name] = LayerUse(
                name, "layer_norm", module, elems, elems, chan.dim - first_normalized
            )
        return chan

    def _elementwise(self, node: Node, operands: list[Any]) -> Chan | None:
        """Position-wise ops with broadcasting: equal-sized channel dims are merged pairwise."""
        out = self.shapes[node]
        if not isinstance(out, torch.Size):
            self._unknown(node)
            return None
        tensors = [(a, self.shapes[a]) for a in operands if isinstance(self.shapes.get(a), torch.Size)]
        primary: Chan | None = None
        for a, shape in tensors:
            chan = self._chan(a)
            if chan is not None:
                dim = chan.dim + len(out) - len(shape)
                if 0 <= dim < len(out) and shape[chan.dim] == out[dim]:
                    primary = Chan(chan.elems, dim)
                    break
        for a, shape in tensors:
            chan = self._chan(a)
            offset = len(out) - len(shape)
            if chan is not None:
                aligned = chan.dim + offset
                same_axis = primary is not None and aligned == primary.dim
                if same_axis and shape[chan.dim] == out[aligned]:
                    self._merge_all(primary.elems, chan.elems)
                else:
                    self._pin(chan)
                    if not (same_axis and shape[chan.dim] == 1):
                        self._pin(primary)
            elif primary is not None:
                k = primary.dim - offset
                if 0 <= k < len(shape) and shape[k] != 1:
                    self._pin(primary)
        return primary

    def _softmax(self, node: Node, dim: Any) -> Chan | None:
        source = node.args[0]
        chan, shape = self._chan(source), self.shapes.get(source)
        if chan is None or not isinstance(shape, torch.Size):
            return None
        if not isinstance(dim, int) or dim % len(shape) == chan.dim:
            self._pin(chan)
        return chan

    def _cat(self, node: Node, tensors: list[Any], dim: int) -> Chan | None:
        out = self.shapes[node]
        dim = dim % len(out)
        chans = [self._chan(t) for t in tensors]
        dims = {c.dim for c in chans if c is not None}
        if len(dims) != 1:
            for c in chans:
                self._pin(c)
            return None
        channel_dim = dims.pop()
        if dim != channel_dim:
            return self._elementwise(node, tensors)
        elems: list[int] = []
        for t, c in zip(tensors, chans, strict=True):
            elems.extend(c.elems if c is not None else self._fresh(self.shapes[t][dim], pinned=True))
        return Chan(tuple(elems), channel_dim)

    def _stack(self, node: Node, tensors: list[Any], dim: int) -> Chan | None:
        out = self.shapes[node]
        chans = [self._chan(t) for t in tensors]
        if any(c is None for c in chans) or len({(c.dim, len(c.elems)) for c in chans}) != 1:
            for c in chans:
                self._pin(c)
            return None
        for c in chans[1:]:
            self._merge_all(chans[0].elems, c.elems)
        channel_dim = chans[0].dim
        return Chan(chans[0].elems, channel_dim + (1 if dim % len(out) <= channel_dim else 0))

    def _split(self, node: Node, dim: int) -> list[Chan | None] | None:
        chan, pieces = self._chan(node.args[0]), self.shapes[node]
        if chan is None or not isinstance(pieces, list) or any(p is None for p in pieces):
            return None
        if dim % len(pieces[0]) != chan.dim:
            return [chan] * len(pieces)
        result, start = [], 0
        for piece in pieces:
            size = piece[chan.dim]
            result.append(Chan(chan.elems[start : start + size], chan.dim))
            start += size
        return result

    def _getitem(self, node: Node) -> Any:
        source, index = node.args[0], node.args[1]
        info = self.info.get(source) if isinstance(source, Node) else None
        if isinstance(info, list):
            return info[index] if isinstance(index, (int, slice)) else None
        if not isinstance(info, Chan):
            if _nodes_in(index):
                self._unknown(node)
            return None
        return self._index_tensor(node, info, index)

    def _index_tensor(self, node: Node, chan: Chan, index: Any) -> Chan | None:
        """``x[...]`` with ints, slices, ``None`` and ``...``; other indices keep all channels."""
        items = index if isinstance(index, tuple) else (index,)
        ndim = len(self.shapes[node.args[0]])
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items) or any(
            isinstance(i, slice) and _nodes_in((i.start, i.stop, i.step)) for i in items
        ):
            self._unknown(node)
            return None
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        in_dim = out_dim = 0
        for item in items:
            if item is Ellipsis:
                skipped = ndim - consumed
                if in_dim <= chan.dim < in_dim + skipped:
                    return Chan(chan.elems, out_dim + chan.dim - in_dim)
                in_dim, out_dim = in_dim + skipped, out_dim + skipped
            elif item is None:
                out_dim += 1
            elif isinstance(item, int):
                if in_dim == chan.dim:
                    self.pinned.add(chan.elems[item])
                    return None
                in_dim += 1
            else:
                if in_dim == chan.dim:
                    return Chan(chan.elems[item], out_dim)
                in_dim, out_dim = in_dim + 1, out_dim + 1
        return Chan(chan.elems, out_dim + chan.dim - in_dim)

    def _reshape(self, node: Node, source: Any) -> Chan | None:
        """Views and reshapes that keep the channel axis whole, or merge it with trailing axes."""
        chan, before, after = self._chan(source), self.shapes.get(source), self.shapes[node]
        if chan is None or not isinstance(before, torch.Size) or not isinstance(after, torch.Size):
            return None
        size, leading = before[chan.dim], math.prod(before[: chan.dim])
        trailing = [math.prod(before[chan.dim + 1 : chan.dim + 1 + j]) for j in range(len(before) - chan.dim)]
        if size > 1:
            for k in range(len(after)):
                if math.prod(after[:k]) != leading or after[k] % size:
                    continue
                repeat = after[k] // size
                if repeat in trailing:
                    elems = tuple(e for e in chan.elems for _ in range(repeat))
                    return Chan(elems, k)
        self._pin(chan)
        return None

    def _permute(self, node: Node, name: str) -> Chan | None:
        chan, shape = self._chan(node.args[0]), self.shapes.get(node.args[0])
        if chan is None or not isinstance(shape, torch.Size):
            return None
        ndim, args = len(shape), node.args[1:]
        order = list(range(ndim))
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            dims = dims or _arg(node, 1, "dims")
            order = [int(d) % ndim for d in dims]
        elif name in ("transpose", "swapaxes"):
            a, b = (int(d) % ndim for d in args[:2])
            order[a], order[b] = order[b], order[a]
        else:
            sources, targets = args[0], args[1]
            sources = [sources] if isinstance(sources, int) else list(sources)
            targets = [targets] if isinstance(targets, int) else list(targets)
            sources = [s % ndim for s in sources]
            rest = [d for d in range(ndim) if d not in sources]
            order = [-1] * ndim
            for s, t in zip(sources, targets, strict=True):
                order[t % ndim] = s
            fill = iter(rest)
            order = [o if o != -1 else next(fill) for o in order]
        return Chan(chan.elems, order.index(chan.dim))

    def _reduce(self, node: Node, dim: Any, keepdim: bool) -> Chan | None:
        chan, shape = self._chan(node.args[0]), self.shapes.get(node.args[0])
        if chan is None or not isinstance(shape, torch.Size):
            return None
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
        if dims is None or chan.dim in {d % len(shape) for d in dims}:
            self._pin(chan)
            return None
        if keepdim:
            return chan
        return Chan(chan.elems, chan.dim - sum(1 for d in dims if d % len(shape) < chan.dim))

    def _pixel_shuffle(self, node: Node, factor: int, shuffle: bool) -> Chan | None:
        chan = self._chan(node.args[0])
        if chan is None or chan.dim != 1:
            self._pin(chan)
            return None
        block = factor * factor
        if not shuffle:
            return Chan(tuple(e for e in chan.elems for _ in range(block)), 1)
        elems = []
        for start in range(0, len(chan.elems), block):
            for e in chan.elems[start + 1 : start + block]:
                self._merge(chan.elems[start], e)
            elems.append(chan.elems[start])
        return Chan(tuple(elems), 1)

    def _pin_parameters_used_directly(self) -> None:
        """A layer whose parameters the graph reads directly (``get_attr``) is kept whole."""
        for node in self.graph.nodes:
            if node.op != "get_attr":
                continue
            owner = str(node.target).rpartition(".")[0]
            use = self.layers.get(owner)
            if use is not None:
                self.pinned.update(use.out_elems or [])
                self.pinned.update(use.in_elems or [])


def analyse(traced: TracedModel, model: nn.Module) -> ChannelGraph:
    """Build the channel dependency graph of a traced model.

    Args:
        traced: the verified trace of ``model`` (see :func:`acdc_prune.pruning.tracing.trace_model`).
        model: the traced model; its ``named_modules()`` names the layers.

    Returns:
        The element sets, pins, groups and the layers that use them.
    """
    return _Analyzer(traced, model).run()
