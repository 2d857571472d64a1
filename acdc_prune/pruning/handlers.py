"""Layer handlers: how channel analysis and rebuild treat each module type, in an extensible registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from acdc_prune.pruning.channels import Chan
from acdc_prune.pruning.errors import PruningError

if TYPE_CHECKING:
    from acdc_prune.pruning.groups import ChannelAnalysis

Node = torch.fx.Node
#: Sorted kept channel indices, ``None`` for all.
Kept = Sequence[int] | None
#: The LayerNorm axis holding the channels (``None`` for other layers).
Axis = int | None
#: What ``resize`` returns: parameter/buffer name -> new tensor (``None`` when the module has none),
#: and attribute name -> new value.
Resized = tuple[dict[str, "torch.Tensor | None"], dict[str, Any]]


class LayerHandler:
    """How the pruning engine treats one module type. Subclass it and register an instance.

    A handler's :meth:`analyse` tells the channel analysis how the module's output channels relate
    to its input channels. A handler whose module has channel-sized tensors also defines
    ``resize(name, module, kept_out, kept_in, axis) -> (tensors, attributes)`` (see
    :meth:`ConvHandler.resize`); a handler without ``resize`` never has its module listed in a plan.
    The base class is conservative: every operand's channels are kept.

    Attributes:
        opaque: ``True`` for a block traced as one leaf whose input and output channels are all kept
            (nothing inside it is pruned); see :class:`OpaqueBlock`.
    """

    opaque = False

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        """Channel elements of the module's output.

        Args:
            ctx: the running analysis: ``fresh``, ``merge``, ``pin``, ``chan``, ``elementwise``... (see
                :class:`acdc_prune.pruning.groups.ChannelAnalysis`).
            node: the ``call_module`` node; ``ctx.shapes[node]`` is its output's shape.
            module: the called module.
            source: the node (or constant) of its first argument.

        Returns:
            A :class:`Chan` for a tensor whose channels the analysis follows, or ``None``: consumers
            of an unfollowed value keep all of its channels.
        """
        ctx.unknown(node)
        return None

    def input_dim(self, module: nn.Module, ndim: int, axis: int | None) -> int:
        """The dimension of the module's first input (of ``ndim`` dimensions) that holds the channels."""
        return 1


def select(tensor: torch.Tensor | None, dim: int, indices: Kept) -> torch.Tensor | None:
    """``tensor`` restricted to ``indices`` along ``dim`` (unchanged when either is ``None``)."""
    if tensor is None or indices is None:
        return tensor
    index = torch.as_tensor(indices, dtype=torch.long, device=tensor.device)
    return torch.index_select(tensor.detach(), dim, index)


def check_range(name: str, indices: Kept, size: int) -> None:
    """``PruningError`` unless ``indices`` (sorted) is ``None`` or a non-empty subset of ``range(size)``."""
    if indices is not None and (not indices or indices[-1] >= size):
        raise PruningError(
            f"the plan does not match layer '{name}': it keeps channels {indices[:1]}..{indices[-1:]} "
            f"of {size}"
        )


def _kept_size(indices: Kept, size: int) -> int:
    return len(indices) if indices is not None else size


def _whole_groups(name: str, indices: Kept, per_group: int, groups: int) -> list[int]:
    """The groups of a grouped conv that ``indices`` keeps; ``PruningError`` if one is kept partly."""
    if indices is None:
        return list(range(groups))
    kept = sorted({i // per_group for i in indices})
    if len(indices) != len(kept) * per_group:
        raise PruningError(f"layer '{name}' would keep part of a conv group, which a grouped conv cannot do")
    return kept


class ConvHandler(LayerHandler):
    """Convs, transposed convs, grouped and depthwise convs: new output channels from their inputs."""

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Chan:
        sizes = (module.out_channels, module.in_channels)
        use, first_call = ctx.producer(node, module, source, "conv", sizes)
        if first_call and module.groups > 1:
            self._merge_groups(ctx, module, use.out_elems, use.in_elems)
        return Chan(tuple(use.out_elems), 1)

    @staticmethod
    def _merge_groups(
        ctx: ChannelAnalysis, module: nn.Module, out_elems: list[int], in_elems: list[int] | None
    ) -> None:
        """A conv group's inputs and outputs go together (whole groups are kept or removed)."""
        groups = module.groups
        in_per_group, out_per_group = module.in_channels // groups, module.out_channels // groups
        for g in range(groups):
            outs = out_elems[g * out_per_group : (g + 1) * out_per_group]
            for e in outs[1:]:
                ctx.merge(outs[0], e)
            if in_elems is None:
                ctx.pinned.update(outs)
            else:
                for e in in_elems[g * in_per_group : (g + 1) * in_per_group]:
                    ctx.merge(outs[0], e)

    def resize(
        self, name: str, module: nn.Module, kept_out: Kept, kept_in: Kept, axis: int | None
    ) -> Resized:
        """New tensors and attributes once only the kept channels remain.

        Args:
            name: the module's name, for error messages.
            module: the module to resize (not modified).
            kept_out: sorted kept output channels, ``None`` = all.
            kept_in: sorted kept input channels, ``None`` = all.
            axis: for a LayerNorm, the axis of ``normalized_shape`` holding the channels; else unused.

        Returns:
            ``(tensors, attributes)``: parameter/buffer name -> new tensor, attribute -> new value.
        """
        check_range(name, kept_out, module.out_channels)
        check_range(name, kept_in, module.in_channels)
        groups = module.groups
        attrs: dict[str, Any] = {}
        if groups == 1:
            out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
            weight = select(select(module.weight, out_dim, kept_out), in_dim, kept_in)
        else:
            out_groups = _whole_groups(name, kept_out, module.out_channels // groups, groups)
            in_groups = _whole_groups(name, kept_in, module.in_channels // groups, groups)
            if out_groups != in_groups:
                raise PruningError(f"layer '{name}' would keep different groups of its inputs and outputs")
            # Per-group widths stay, so only dimension 0 (which lists the groups) is sliced.
            weight = select(module.weight, 0, kept_in if module.transposed else kept_out)
            attrs["groups"] = len(out_groups)
        attrs["out_channels"] = _kept_size(kept_out, module.out_channels)
        attrs["in_channels"] = _kept_size(kept_in, module.in_channels)
        return {"weight": weight, "bias": select(module.bias, 0, kept_out)}, attrs


class LinearHandler(LayerHandler):
    """Linear layers: new output features (the last axis) from their input features."""

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Chan:
        sizes = (module.out_features, module.in_features)
        use, _ = ctx.producer(node, module, source, "linear", sizes, dim=None)
        return Chan(tuple(use.out_elems), len(ctx.shapes[node]) - 1)

    def resize(
        self, name: str, module: nn.Module, kept_out: Kept, kept_in: Kept, axis: int | None
    ) -> Resized:
        """Slice ``weight`` (out, in) and ``bias``; see :meth:`ConvHandler.resize`."""
        check_range(name, kept_out, module.out_features)
        check_range(name, kept_in, module.in_features)
        tensors = {
            "weight": select(select(module.weight, 0, kept_out), 1, kept_in),
            "bias": select(module.bias, 0, kept_out),
        }
        attrs = {
            "out_features": _kept_size(kept_out, module.out_features),
            "in_features": _kept_size(kept_in, module.in_features),
        }
        return tensors, attrs

    def input_dim(self, module: nn.Module, ndim: int, axis: int | None) -> int:
        return ndim - 1


class PerChannelHandler(LayerHandler):
    """Norms and per-channel activations: one parameter per channel, output channels = input channels.

    Args:
        kind: the :class:`~acdc_prune.pruning.channels.LayerUse` kind (``"norm"``, ``"prelu"``...).
        size_attr: the attribute holding the channel count (``"num_features"``...).
    """

    def __init__(self, kind: str, size_attr: str) -> None:
        self.kind = kind
        self.size_attr = size_attr

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        return ctx.per_channel(node, module, source, self.kind, getattr(module, self.size_attr))

    def resize(
        self, name: str, module: nn.Module, kept_out: Kept, kept_in: Kept, axis: int | None
    ) -> Resized:
        """Slice ``weight``, ``bias`` and running statistics along the channels (``kept_out``)."""
        size = getattr(module, self.size_attr)
        check_range(name, kept_out, size)
        tensors = {
            key: select(getattr(module, key, None), 0, kept_out)
            for key in ("weight", "bias", "running_mean", "running_var")
        }
        return tensors, {self.size_attr: _kept_size(kept_out, size)}


class GroupNormHandler(PerChannelHandler):
    """GroupNorm: per-channel affine parameters, and a kept width that stays a multiple of the groups."""

    def __init__(self) -> None:
        super().__init__("group_norm", "num_channels")

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        chan = super().analyse(ctx, node, module, source)
        if chan is not None:
            ctx.multiples.append((list(chan.elems), module.num_groups))
        return chan

    def resize(
        self, name: str, module: nn.Module, kept_out: Kept, kept_in: Kept, axis: int | None
    ) -> Resized:
        """As :meth:`PerChannelHandler.resize`; ``PruningError`` when the groups no longer divide."""
        tensors, attrs = super().resize(name, module, kept_out, kept_in, axis)
        if attrs["num_channels"] % module.num_groups:
            raise PruningError(
                f"layer '{name}' would keep {attrs['num_channels']} channels, not a multiple of its "
                f"{module.num_groups} groups"
            )
        return tensors, attrs


class PReLUHandler(PerChannelHandler):
    """PReLU: per-channel slopes follow their input; a single shared slope is element-wise."""

    def __init__(self) -> None:
        super().__init__("prelu", "num_parameters")

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        if module.num_parameters == 1:
            return ctx.elementwise(node, [source])
        return super().analyse(ctx, node, module, source)


class LayerNormHandler(LayerHandler):
    """LayerNorm: when its ``normalized_shape`` covers the channel axis, its parameters follow it."""

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        chan, shape = ctx.chan(source), ctx.shapes.get(source)
        if chan is None or not isinstance(shape, torch.Size):
            return chan
        first_normalized = len(shape) - len(module.normalized_shape)
        if chan.dim < first_normalized:
            return chan
        name = str(node.target)
        elems = list(chan.elems)
        if name in ctx.layers:
            ctx.bind_inputs(ctx.layers[name], elems, first_call=False)
        else:
            use = ctx.layer(name, "layer_norm", module, elems)
            use.in_elems, use.axis = elems, chan.dim - first_normalized
        return chan

    def resize(
        self, name: str, module: nn.Module, kept_out: Kept, kept_in: Kept, axis: int | None
    ) -> Resized:
        """Slice ``weight`` and ``bias`` along ``axis`` of ``normalized_shape``."""
        axis = axis or 0
        check_range(name, kept_out, module.normalized_shape[axis])
        tensors = {key: select(getattr(module, key, None), axis, kept_out) for key in ("weight", "bias")}
        shape = list(module.normalized_shape)
        shape[axis] = _kept_size(kept_out, shape[axis])
        return tensors, {"normalized_shape": tuple(shape)}

    def input_dim(self, module: nn.Module, ndim: int, axis: int | None) -> int:
        return ndim - len(module.normalized_shape) + (axis or 0)


class ElementwiseHandler(LayerHandler):
    """Activations, dropout, pooling, up-sampling and padding: channels pass through position-wise."""

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        return ctx.elementwise(node, [source])


class SoftmaxHandler(LayerHandler):
    """Softmax-like modules: the channels are pinned when normalised over the channel axis."""

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        return ctx.softmax(node, module.dim)


class ReshapeHandler(LayerHandler):
    """``nn.Flatten`` and ``nn.Unflatten``: the channel axis is followed through the view."""

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        return ctx.reshape(node, source)


class PixelShuffleHandler(LayerHandler):
    """Pixel shuffle (``shuffle=True``) and unshuffle: channel blocks move to and from space."""

    def __init__(self, shuffle: bool) -> None:
        self.shuffle = shuffle

    def analyse(self, ctx: ChannelAnalysis, node: Node, module: nn.Module, source: Any) -> Any:
        factor = module.upscale_factor if self.shuffle else module.downscale_factor
        return ctx.pixel_shuffle(node, factor, self.shuffle)


class OpaqueBlock(LayerHandler):
    """A block traced as one leaf: its input and output channels are kept, nothing inside is pruned.

    Registered for attention and transformer blocks (their attention and MLP widths stay), and used
    for any module whose forward torch.fx cannot trace.
    """

    opaque = True


_REGISTRY: dict[type | str, LayerHandler] = {}
_CACHE: dict[type, LayerHandler | None] = {}


def _key_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_handler(module_type: type[nn.Module] | str, handler: Any) -> LayerHandler:
    """Tell the pruning engine how to analyse (and resize) modules of a type; replaces any previous one.

    Subclasses are covered too, unless they have a handler of their own (the nearest class in the
    method resolution order wins). A module whose own class is registered is traced as one leaf.

    Args:
        module_type: the module class, or its dotted name (``"monai.networks.blocks.mlp.MLPBlock"``)
            so that a handler can be registered without importing the library that defines it.
        handler: a :class:`LayerHandler` instance, or a class with ``analyse`` (and, if it has
            channel-sized tensors, ``resize``) methods, instantiated with no arguments.

    Returns:
        The registered handler instance.
    """
    if isinstance(handler, type):
        handler = handler()
    if not callable(getattr(handler, "analyse", None)):
        raise PruningError(f"a layer handler needs an analyse method, got {type(handler).__name__}")
    if module_type is nn.Module or not isinstance(module_type, (type, str)):
        raise PruningError(f"layer handlers are registered per module class, not for {module_type!r}")
    _REGISTRY[module_type] = handler
    _CACHE.clear()
    return handler


def unregister_layer_handler(module_type: type[nn.Module] | str) -> None:
    """Remove the handler registered for ``module_type`` (a class or its dotted name), if any."""
    _REGISTRY.pop(module_type, None)
    _CACHE.clear()


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the nearest registered class in ``type(module).__mro__``, or ``None``."""
    cls = type(module)
    if cls not in _CACHE:
        _CACHE[cls] = next(
            (
                _REGISTRY.get(base) or _REGISTRY.get(_key_name(base))
                for base in cls.__mro__
                if base in _REGISTRY or _key_name(base) in _REGISTRY
            ),
            None,
        )
    return _CACHE[cls]


def is_resizable(module: nn.Module) -> bool:
    """Whether the registry knows how to slice ``module``'s channel-sized tensors."""
    return callable(getattr(handler_for(module), "resize", None))


def is_opaque(module: nn.Module) -> bool:
    """Whether ``module`` is an opaque block (traced as a leaf, its channels kept)."""
    return bool(getattr(handler_for(module), "opaque", False))


def is_registered_leaf(module: nn.Module) -> bool:
    """Whether tracing must stop at ``module``: it is opaque, or its own class has a handler."""
    cls = type(module)
    return is_opaque(module) or cls in _REGISTRY or _key_name(cls) in _REGISTRY


#: Activations, dropout, pooling, up-sampling and padding modules of ``torch.nn``: channels pass through.
_ELEMENTWISE_NAMES = (
    "Identity ReLU ReLU6 LeakyReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardswish Hardsigmoid "
    "Hardtanh Softplus Softsign Tanhshrink LogSigmoid Threshold Hardshrink Softshrink "
    "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout "
    "MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d "
    "AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d LPPool1d LPPool2d "
    "Upsample UpsamplingNearest2d UpsamplingBilinear2d ZeroPad1d ZeroPad2d ZeroPad3d "
    "CircularPad1d CircularPad2d CircularPad3d"
)
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, name) for name in _ELEMENTWISE_NAMES.split()
) + (
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)
#: Transformer blocks kept whole: their attention and MLP widths are not pruned. Dotted names, so that
#: the package needs no MONAI import.
TRANSFORMER_BLOCKS: tuple[type[nn.Module] | str, ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    "monai.networks.blocks.transformerblock.TransformerBlock",
    "monai.networks.blocks.selfattention.SABlock",
    "monai.networks.blocks.crossattention.CrossAttentionBlock",
    "monai.networks.nets.swin_unetr.SwinTransformer",
)


def _register_builtins() -> None:
    register_layer_handler(nn.modules.conv._ConvNd, ConvHandler())
    register_layer_handler(nn.Linear, LinearHandler())
    register_layer_handler(nn.modules.batchnorm._NormBase, PerChannelHandler("norm", "num_features"))
    register_layer_handler(nn.GroupNorm, GroupNormHandler())
    register_layer_handler(nn.PReLU, PReLUHandler())
    register_layer_handler(nn.LayerNorm, LayerNormHandler())
    for module_type in _ELEMENTWISE_MODULES:
        register_layer_handler(module_type, ElementwiseHandler())
    for module_type in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
        register_layer_handler(module_type, SoftmaxHandler())
    for module_type in (nn.Flatten, nn.Unflatten):
        register_layer_handler(module_type, ReshapeHandler())
    register_layer_handler(nn.PixelShuffle, PixelShuffleHandler(shuffle=True))
    register_layer_handler(nn.PixelUnshuffle, PixelShuffleHandler(shuffle=False))
    for block in TRANSFORMER_BLOCKS:
        register_layer_handler(block, OpaqueBlock())


_register_builtins()
