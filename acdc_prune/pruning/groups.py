"""Channel dependency analysis of a traced graph: which channels of which layers must go together.

Over 450 lines on purpose: it is one class, ``ChannelAnalysis``, whose channel-set bookkeeping the
layer handlers (``handlers.py``) and function rules (``functions.py``) call back into; splitting the
class would spread one piece of state over several modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from acdc_prune.pruning.channels import Chan, ChannelGraph, LayerUse, UnionFind
from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.functions import arg, nodes_in, rule_for
from acdc_prune.pruning.handlers import handler_for
from acdc_prune.pruning.tracing import TracedModel, innermost_module

__all__ = ["Chan", "ChannelAnalysis", "ChannelGraph", "LayerUse", "UnionFind", "analyse"]

Node = torch.fx.Node


class ChannelAnalysis:
    """Walks a traced graph once, assigning channel elements to every tensor value.

    Every channel of every tensor in the graph is an *element*. Elements that must be kept or
    removed together are merged in a union-find (a residual add merges its operands' channels
    pairwise; a grouped conv merges each group's input and output channels). Elements that must
    never be removed (the model's inputs and outputs, operands of operations the analysis does not
    understand) are *pinned*. A second union-find, coarser, links the channels created together by
    one layer: its components are the *groups* a pruning ratio applies to. Concatenation neither
    merges nor links: it lays its operands' elements side by side, so the consumer sees each
    producer's channels at their offsets (a tensor concatenated twice appears twice).

    Layer handlers (:mod:`acdc_prune.pruning.handlers`) and function rules
    (:mod:`acdc_prune.pruning.functions`) build on its public methods: :meth:`fresh`, :meth:`merge`,
    :meth:`pin`, :meth:`chan`, :meth:`layer`, :meth:`elementwise`... ``shapes`` maps each node to its
    value's ``torch.Size`` (a list of them for tuples).
    """

    def __init__(self, traced: TracedModel, model: nn.Module) -> None:
        self.shapes = traced.shapes
        self.graph = traced.graph_module.graph
        self.opaque = set(traced.opaque)
        self.shape_reads = traced.shape_reads
        self.model = model
        self.modules = dict(model.named_modules())
        self.elements = UnionFind()
        self.groups = UnionFind()
        self.pinned: set[int] = set()
        self.layers: dict[str, LayerUse] = {}
        self.producers: list[str] = []
        self.multiples: list[tuple[list[int], int]] = []
        self.info: dict[Node, Any] = {}

    def run(self) -> ChannelGraph:
        """Visit every node in order and return the resulting graph."""
        for node in self.graph.nodes:
            try:
                self.info[node] = self._visit(node)
            except PruningError:
                raise
            except Exception as error:  # a handler or rule that does not fit this node
                reason = (str(error).strip().splitlines() or [""])[0]
                raise PruningError(
                    f"the channel analysis fails at {innermost_module(self.model, node)}: "
                    f"{type(error).__name__}: {reason}"
                ) from error
        self._pin_unused_values()
        self._pin_channel_counts_read()
        self._pin_parameters_used_directly()
        self._pin_shared_parameters()
        return ChannelGraph(
            self.elements, self.groups, self.pinned, self.layers, self.producers, self.multiples
        )

    def fresh(self, n: int, pinned: bool = False) -> list[int]:
        """``n`` new elements, linked into one group (the channels of one new tensor)."""
        ids = self.elements.add(n)
        self.groups.add(n, joined=True)
        if pinned:
            self.pinned.update(ids)
        return ids

    def merge(self, a: int, b: int) -> None:
        """Elements ``a`` and ``b`` are kept or removed together."""
        self.elements.union(a, b)
        self.groups.union(a, b)

    def merge_all(self, xs: Iterable[int], ys: Iterable[int]) -> None:
        """Merge two equally long element lists pairwise."""
        for a, b in zip(xs, ys, strict=True):
            self.merge(a, b)

    def pin(self, info: Any) -> None:
        """Keep every element of a :class:`Chan` (or a list of them); ``None`` is ignored."""
        if isinstance(info, Chan):
            self.pinned.update(info.elems)
        elif isinstance(info, list):
            for item in info:
                self.pin(item)

    def unknown(self, node: Node) -> None:
        """An operation the analysis does not understand: its operands' channels are all kept."""
        for operand in nodes_in((node.args, node.kwargs)):
            self.pin(self.info.get(operand))

    def chan(self, node: Any) -> Chan | None:
        """The channel elements of a node's tensor value, or ``None`` when not followed."""
        info = self.info.get(node) if isinstance(node, Node) else None
        return info if isinstance(info, Chan) else None

    def _visit(self, node: Node) -> Any:
        shape = self.shapes.get(node)
        if node.op == "output":
            for operand in nodes_in(node.args):
                self.pin(self.info.get(operand))
            return None
        if node.op == "placeholder":
            if isinstance(shape, torch.Size) and len(shape) >= 2:
                return Chan(tuple(self.fresh(shape[1], pinned=True)), 1)
            return None
        if node.op == "get_attr" or shape is None:
            return None
        if node.op == "call_module":
            return self._visit_module(node)
        rule = rule_for(node)
        if rule is None:
            self.unknown(node)
            return None
        return rule(self, node)

    def _visit_module(self, node: Node) -> Any:
        name = str(node.target)
        module = self.modules[name]
        handler = None if name in self.opaque else handler_for(module)
        if handler is None:
            self.unknown(node)
            return None
        source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        return handler.analyse(self, node, module, source)

    def layer(
        self, name: str, kind: str, module: nn.Module, out_elems: list[int] | None, producer: bool = False
    ) -> LayerUse:
        """The :class:`LayerUse` of module ``name``, created on its first call.

        Args:
            name: the module's path; kind: its handler's kind; module: the module.
            out_elems: its output channels' elements (used on the first call only).
            producer: whether the layer creates its output channels (its filter norms score them).
        """
        use = self.layers.get(name)
        if use is None:
            use = LayerUse(name, kind, module, out_elems, None)
            self.layers[name] = use
            if producer:
                self.producers.append(name)
        return use

    def producer(
        self,
        node: Node,
        module: nn.Module,
        source: Any,
        kind: str,
        sizes: tuple[int, int],
        dim: int | None = 1,
    ) -> tuple[LayerUse, bool]:
        """A layer that creates new output channels from its inputs (a conv, a linear).

        On its first call its outputs become fresh elements and it is listed among the producers;
        every call binds its input elements (see :meth:`bind_inputs`).

        Args:
            node: its ``call_module`` node; module: the module; source: the node of its input.
            kind: its :class:`LayerUse` kind (``"conv"``, ``"linear"``...).
            sizes: ``(output channels, input channels)``.
            dim: the axis of the input holding the channels (``None``: the last axis).

        Returns:
            Its :class:`LayerUse` and whether this was its first call.
        """
        name = str(node.target)
        first_call = name not in self.layers
        use = self.layer(name, kind, module, self.fresh(sizes[0]) if first_call else None, producer=True)
        self.bind_inputs(use, self.input_elems(source, sizes[1], dim), first_call)
        return use, first_call

    def bind_inputs(self, use: LayerUse, in_elems: list[int] | None, first_call: bool) -> None:
        """Record a call's input elements; a module called twice must see the same channels."""
        if first_call:
            use.in_elems = in_elems
        elif use.in_elems is None or in_elems is None:
            self.pinned.update(use.in_elems or in_elems or [])
            use.in_elems = None
        else:
            self.merge_all(use.in_elems, in_elems)

    def input_elems(self, source: Any, size: int, dim: int | None = 1) -> list[int] | None:
        """Elements of a layer's ``size`` input channels on axis ``dim`` (``None``: the last axis).

        Returns ``None`` (and pins what it sees) when the input is not a plain channel map.
        """
        chan = self.chan(source)
        shape = self.shapes.get(source)
        if chan is None or not isinstance(shape, torch.Size):
            return None
        expected = len(shape) - 1 if dim is None else dim
        if chan.dim != expected or len(chan.elems) != size:
            self.pin(chan)
            return None
        return list(chan.elems)

    def per_channel(self, node: Node, module: nn.Module, source: Any, kind: str, size: int) -> Chan | None:
        """Norms and per-channel PReLU: parameters follow the input channels, output = input."""
        elems = self.input_elems(source, size)
        if elems is None:
            self.pin(self.chan(source))
            return self.chan(source)
        use = self.layers.get(str(node.target))
        if use is None:
            self.layers[str(node.target)] = LayerUse(str(node.target), kind, module, elems, elems)
        else:
            self.bind_inputs(use, elems, first_call=False)
        return Chan(tuple(elems), 1)

    def elementwise(self, node: Node, operands: list[Any]) -> Chan | None:
        """Position-wise ops with broadcasting: equal-sized channel dims are merged pairwise."""
        out = self.shapes[node]
        if not isinstance(out, torch.Size):
            self.unknown(node)
            return None
        tensors = [(a, self.shapes[a]) for a in operands if isinstance(self.shapes.get(a), torch.Size)]
        primary: Chan | None = None
        for a, shape in tensors:
            chan = self.chan(a)
            if chan is not None:
                dim = chan.dim + len(out) - len(shape)
                if 0 <= dim < len(out) and shape[chan.dim] == out[dim]:
                    primary = Chan(chan.elems, dim)
                    break
        for a, shape in tensors:
            chan = self.chan(a)
            offset = len(out) - len(shape)
            if chan is not None:
                aligned = chan.dim + offset
                same_axis = primary is not None and aligned == primary.dim
                if same_axis and shape[chan.dim] == out[aligned]:
                    if chan.elems is not primary.elems:  # merging the operand that gave it changes nothing
                        self.merge_all(primary.elems, chan.elems)
                else:
                    self.pin(chan)
                    if not (same_axis and shape[chan.dim] == 1):
                        self.pin(primary)
            elif primary is not None:
                k = primary.dim - offset
                if 0 <= k < len(shape) and shape[k] != 1:
                    self.pin(primary)
        return primary

    def softmax(self, node: Node, dim: Any) -> Chan | None:
        """Softmax-like ops over ``dim``: over the channel axis (or an unknown axis), channels are pinned."""
        source = node.args[0]
        chan, shape = self.chan(source), self.shapes.get(source)
        if chan is None or not isinstance(shape, torch.Size):
            return None
        if not isinstance(dim, int) or dim % len(shape) == chan.dim:
            self.pin(chan)
        return chan

    def cat(self, node: Node, tensors: list[Any], dim: int) -> Chan | None:
        """``torch.cat``: on the channel axis the operands' elements are laid side by side."""
        out = self.shapes[node]
        dim = dim % len(out)
        chans = [self.chan(t) for t in tensors]
        dims = {c.dim for c in chans if c is not None}
        if len(dims) != 1:
            for c in chans:
                self.pin(c)
            return None
        channel_dim = dims.pop()
        if dim != channel_dim:
            return self.elementwise(node, tensors)
        elems: list[int] = []
        for t, c in zip(tensors, chans, strict=True):
            elems.extend(c.elems if c is not None else self.fresh(self.shapes[t][dim], pinned=True))
        return Chan(tuple(elems), channel_dim)

    def stack(self, node: Node, tensors: list[Any], dim: int) -> Chan | None:
        """``torch.stack``: the operands' channels are merged pairwise; a new axis may shift them."""
        out = self.shapes[node]
        chans = [self.chan(t) for t in tensors]
        if any(c is None for c in chans) or len({(c.dim, len(c.elems)) for c in chans}) != 1:
            for c in chans:
                self.pin(c)
            return None
        for c in chans[1:]:
            self.merge_all(chans[0].elems, c.elems)
        channel_dim = chans[0].dim
        return Chan(chans[0].elems, channel_dim + (1 if dim % len(out) <= channel_dim else 0))

    def split(self, node: Node, dim: int) -> list[Chan | None] | None:
        """``split``/``chunk``: on the channel axis each piece gets its slice of the elements."""
        chan, pieces = self.chan(node.args[0]), self.shapes[node]
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

    def getitem(self, node: Node) -> Any:
        """``x[i]`` of a tuple/list of values, or indexing of a tensor."""
        source, index = node.args[0], node.args[1]
        info = self.info.get(source) if isinstance(source, Node) else None
        if isinstance(info, list):
            return info[index] if isinstance(index, (int, slice)) else None
        if not isinstance(info, Chan):
            if nodes_in(index):
                self.unknown(node)
            return None
        return self._index_tensor(node, info, index)

    def _index_tensor(self, node: Node, chan: Chan, index: Any) -> Chan | None:
        """``x[...]`` with ints, slices, ``None`` and ``...``; other indices keep all channels."""
        items = index if isinstance(index, tuple) else (index,)
        ndim = len(self.shapes[node.args[0]])
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items) or any(
            isinstance(i, slice) and nodes_in((i.start, i.stop, i.step)) for i in items
        ):
            self.unknown(node)
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

    def reshape(self, node: Node, source: Any) -> Chan | None:
        """Views and reshapes that keep the channel axis whole, or merge it with trailing axes."""
        chan, before, after = self.chan(source), self.shapes.get(source), self.shapes[node]
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
        self.pin(chan)
        return None

    def permute(self, node: Node, name: str) -> Chan | None:
        """``permute``/``transpose``/``swapaxes``/``movedim`` (``name``): the channel axis moves."""
        chan, shape = self.chan(node.args[0]), self.shapes.get(node.args[0])
        if chan is None or not isinstance(shape, torch.Size):
            return None
        ndim, args = len(shape), node.args[1:]
        order = list(range(ndim))
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            dims = dims or arg(node, 1, "dims")
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

    def reduce(self, node: Node, dim: Any, keepdim: bool) -> Chan | None:
        """``mean``/``sum``/``amax``/``amin`` over ``dim``: over the channel axis, the channels are pinned."""
        chan, shape = self.chan(node.args[0]), self.shapes.get(node.args[0])
        if chan is None or not isinstance(shape, torch.Size):
            return None
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
        if dims is None or chan.dim in {d % len(shape) for d in dims}:
            self.pin(chan)
            return None
        if keepdim:
            return chan
        return Chan(chan.elems, chan.dim - sum(1 for d in dims if d % len(shape) < chan.dim))

    def pixel_shuffle(self, node: Node, factor: int, shuffle: bool) -> Chan | None:
        """Pixel shuffle merges each block of ``factor**2`` channels; unshuffle repeats each channel."""
        chan = self.chan(node.args[0])
        if chan is None or chan.dim != 1:
            self.pin(chan)
            return None
        block = factor * factor
        if not shuffle:
            return Chan(tuple(e for e in chan.elems for _ in range(block)), 1)
        elems = []
        for start in range(0, len(chan.elems), block):
            for e in chan.elems[start + 1 : start + block]:
                self.merge(chan.elems[start], e)
            elems.append(chan.elems[start])
        return Chan(tuple(elems), 1)

    def _pin_unused_values(self) -> None:
        """Values computed but never used keep their channels: in training mode they may be returned
        (UNet++'s deep-supervision heads run in eval mode too, where only the last one is returned)."""
        for node in self.graph.nodes:
            if not node.users and node.op != "output":
                self.pin(self.info.get(node))

    def _pin_channel_counts_read(self) -> None:
        """A value whose channel count the traced code read (and a concrete trace baked in) keeps it."""
        for node, dims in self.shape_reads.items():
            chan = self.chan(node)
            if chan is not None and chan.dim in dims:
                self.pin(chan)

    def _pin_parameters_used_directly(self) -> None:
        """A layer whose parameters the graph reads directly (``get_attr``) is kept whole."""
        for node in self.graph.nodes:
            if node.op != "get_attr":
                continue
            owner = str(node.target).rpartition(".")[0]
            use = self.layers.get(owner)
            if use is not None:
                self._pin_layer(use)

    def _pin_shared_parameters(self) -> None:
        """Layers sharing a parameter or buffer (tied weights) are kept whole: one slicing fits both."""
        owners: dict[int, list[LayerUse]] = {}
        for use in self.layers.values():
            tensors = [*use.module.parameters(recurse=False), *use.module.buffers(recurse=False)]
            for tensor_id in {id(t) for t in tensors}:
                owners.setdefault(tensor_id, []).append(use)
        for uses in owners.values():
            if len({id(use.module) for use in uses}) > 1:
                for use in uses:
                    self._pin_layer(use)

    def _pin_layer(self, use: LayerUse) -> None:
        """Keep every input and output channel of a layer."""
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
    return ChannelAnalysis(traced, model).run()
