"""The data of the channel analysis: channel elements, their union-finds, and the layers that use them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


class UnionFind:
    """Disjoint sets over the integers 0..n-1, grown with :meth:`add`."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int, joined: bool = False) -> list[int]:
        """Create ``n`` new elements and return their ids: singletons, or one set when ``joined``."""
        start = len(self.parent)
        ids = list(range(start, start + n))
        self.parent.extend([start] * n if joined else ids)
        return ids

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

    def roots(self) -> list[int]:
        """The representative of every element (``roots()[a] == find(a)``), in one pass.

        No element's parent has a larger id than itself (``union`` and ``find`` only link to smaller
        ids), so the representatives of an element's ancestors are known when the element is reached.
        """
        roots: list[int] = []
        for a, parent in enumerate(self.parent):
            roots.append(a if parent == a else roots[parent])
        return roots


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
        kind: the handler's kind: ``"conv"`` (also transposed), ``"linear"``, ``"norm"`` (batch/instance
            norm), ``"group_norm"``, ``"layer_norm"``, ``"prelu"``, or one a user handler chose.
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
