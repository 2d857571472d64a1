"""Channel rules of the functions and tensor methods a traced graph calls, in an extensible registry."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from acdc_prune.pruning.errors import PruningError

if TYPE_CHECKING:
    from acdc_prune.pruning.groups import ChannelAnalysis

Node = torch.fx.Node
#: A rule: given the running analysis and a ``call_function``/``call_method`` node, the channel
#: elements of the node's value (a ``Chan``, a list of them, or ``None`` when not followed).
FunctionRule = Callable[["ChannelAnalysis", Node], Any]

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


def nodes_in(value: Any) -> list[Node]:
    """All graph nodes inside a (nested) argument."""
    found: list[Node] = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return found


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _elementwise(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.elementwise(node, nodes_in((node.args, node.kwargs)))


def _softmax(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.softmax(node, arg(node, 1, "dim"))


def _cat(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.cat(node, list(arg(node, 0, "tensors")), arg(node, 1, "dim", 0))


def _stack(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.stack(node, list(arg(node, 0, "tensors")), arg(node, 1, "dim", 0))


def _split(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.split(node, arg(node, 2, "dim", 0))


def _reshape(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.reshape(node, node.args[0])


def _permute(ctx: ChannelAnalysis, node: Node) -> Any:
    target = node.target
    return ctx.permute(node, target if isinstance(target, str) else target.__name__)


def _reduce(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.reduce(node, arg(node, 1, "dim"), bool(arg(node, 2, "keepdim", False)))


def _pixel_shuffle(ctx: ChannelAnalysis, node: Node) -> Any:
    shuffle = node.target is F.pixel_shuffle
    factor = arg(node, 1, "upscale_factor" if shuffle else "downscale_factor")
    return ctx.pixel_shuffle(node, int(factor), shuffle)


def _getitem(ctx: ChannelAnalysis, node: Node) -> Any:
    return ctx.getitem(node)


#: ``call_function`` target -> rule. Anything absent is an unknown operation: its operands are kept.
FUNCTION_RULES: dict[Any, FunctionRule] = {
    operator.getitem: _getitem,
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, _elementwise),
    **dict.fromkeys(_SOFTMAX_FUNCTIONS, _softmax),
    **dict.fromkeys(_CAT_FUNCTIONS, _cat),
    torch.stack: _stack,
    **dict.fromkeys(_SPLIT_FUNCTIONS, _split),
    **dict.fromkeys(_RESHAPE_FUNCTIONS, _reshape),
    **dict.fromkeys(_PERMUTE_FUNCTIONS, _permute),
    **dict.fromkeys(_REDUCE_FUNCTIONS, _reduce),
    F.pixel_shuffle: _pixel_shuffle,
    F.pixel_unshuffle: _pixel_shuffle,
}
#: ``call_method`` name -> rule.
METHOD_RULES: dict[str, FunctionRule] = {
    **dict.fromkeys(_ELEMENTWISE_METHODS, _elementwise),
    **dict.fromkeys(_SOFTMAX_METHODS, _softmax),
    **dict.fromkeys(_SPLIT_METHODS, _split),
    **dict.fromkeys(_RESHAPE_METHODS, _reshape),
    **dict.fromkeys(_PERMUTE_METHODS, _permute),
    **dict.fromkeys(_REDUCE_METHODS, _reduce),
}


def register_function_rule(target: Callable[..., Any] | str, rule: FunctionRule) -> None:
    """Tell the channel analysis what a function or tensor method does to channels.

    Args:
        target: the called function (a ``call_function`` target such as ``torch.add``), or a tensor
            method's name (``"add"``) for ``call_method`` nodes.
        rule: ``rule(ctx, node)`` returning the node value's channel elements, built with the
            analysis's operations, e.g. ``lambda ctx, node: ctx.elementwise(node, [node.args[0]])``.
    """
    if not callable(rule):
        raise PruningError(f"a function rule must be callable, got {type(rule).__name__}")
    (METHOD_RULES if isinstance(target, str) else FUNCTION_RULES)[target] = rule


def rule_for(node: Node) -> FunctionRule | None:
    """The rule of a ``call_function`` or ``call_method`` node, or ``None`` for an unknown operation."""
    rules: dict[Any, FunctionRule] = METHOD_RULES if node.op == "call_method" else FUNCTION_RULES
    try:
        return rules.get(node.target)
    except TypeError:  # an unhashable target
        return None
