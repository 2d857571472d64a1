"""Rebuilding a physically smaller network from a model and a pruning plan."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.plan import LayerPlan, PruningPlan

#: Module types whose channel-sized tensors the rebuild knows how to slice.
RESIZABLE = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.PReLU,
)


def _select(tensor: torch.Tensor | None, dim: int, indices: Sequence[int] | None) -> torch.Tensor | None:
    if tensor is None or indices is None:
        return tensor
    index = torch.as_tensor(indices, dtype=torch.long, device=tensor.device)
    return torch.index_select(tensor.detach(), dim, index)


def _whole_groups(name: str, indices: Sequence[int] | None, per_group: int, groups: int) -> list[int]:
    """The groups of a grouped conv that ``indices`` keeps; ``PruningError`` if one is kept partly."""
    if indices is None:
        return list(range(groups))
    kept = sorted({i // per_group for i in indices})
    if len(indices) != len(kept) * per_group:
        raise PruningError(f"layer '{name}' would keep part of a conv group, which a grouped conv cannot do")
    return kept


def _check_range(name: str, indices: Sequence[int] | None, size: int) -> None:
    if indices is not None and (not indices or indices[-1] >= size):
        raise PruningError(
            f"the plan does not match layer '{name}': it keeps channels {indices[:1]}..{indices[-1:]} "
            f"of {size}"
        )


def resize(
    name: str,
    module: nn.Module,
    kept_out: Sequence[int] | None,
    kept_in: Sequence[int] | None,
    axis: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The new tensors and attributes of ``module`` once only the given channels are kept.

    Args:
        name: the module's name, for error messages.
        module: a conv (also transposed, grouped, depthwise), linear, batch/instance norm, group
            norm, layer norm or PReLU.
        kept_out: sorted kept output channels, ``None`` = all (for norms and PReLU: the channels).
        kept_in: sorted kept input channels, ``None`` = all.
        axis: for ``LayerNorm``, the axis of ``normalized_shape`` that holds the channels.

    Returns:
        ``(tensors, attributes)``: parameter/buffer name -> new tensor for each one whose shape
        changes, and attribute name -> new value (``out_channels``, ``groups``, ``num_features``...).
    """
    tensors: dict[str, torch.Tensor | None] = {}
    attrs: dict[str, Any] = {}
    if isinstance(module, nn.modules.conv._ConvNd):
        _check_range(name, kept_out, module.out_channels)
        _check_range(name, kept_in, module.in_channels)
        groups = module.groups
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        if groups == 1:
            weight = _select(_select(module.weight, out_dim, kept_out), in_dim, kept_in)
        else:
            out_groups = _whole_groups(name, kept_out, module.out_channels // groups, groups)
            in_groups = _whole_groups(name, kept_in, module.in_channels // groups, groups)
            if out_groups != in_groups:
                raise PruningError(f"layer '{name}' would keep different groups of its inputs and outputs")
            # Per-group widths stay, so only dimension 0 (which lists the groups) is sliced.
            weight = _select(module.weight, 0, kept_in if module.transposed else kept_out)
            attrs["groups"] = len(out_groups)
        tensors = {"weight": weight, "bias": _select(module.bias, 0, kept_out)}
        attrs["out_channels"] = len(kept_out) if kept_out is not None else module.out_channels
        attrs["in_channels"] = len(kept_in) if kept_in is not None else module.in_channels
    elif isinstance(module, nn.Linear):
        _check_range(name, kept_out, module.out_features)
        _check_range(name, kept_in, module.in_features)
        tensors = {
            "weight": _select(_select(module.weight, 0, kept_out), 1, kept_in),
            "bias": _select(module.bias, 0, kept_out),
        }
        attrs["out_features"] = len(kept_out) if kept_out is not None else module.out_features
        attrs["in_features"] = len(kept_in) if kept_in is not None else module.in_features
    elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.PReLU)):
        if isinstance(module, nn.GroupNorm):
            size_attr = "num_channels"
        elif isinstance(module, nn.PReLU):
            size_attr = "num_parameters"
        else:
            size_attr = "num_features"
        _check_range(name, kept_out, getattr(module, size_attr))
        for tensor_name in ("weight", "bias", "running_mean", "running_var"):
            tensors[tensor_name] = _select(getattr(module, tensor_name, None), 0, kept_out)
        attrs[size_attr] = len(kept_out) if kept_out is not None else getattr(module, size_attr)
        if isinstance(module, nn.GroupNorm) and attrs[size_attr] % module.num_groups:
            raise PruningError(
                f"layer '{name}' would keep {attrs[size_attr]} channels, not a multiple of its "
                f"{module.num_groups} groups"
            )
    elif isinstance(module, nn.LayerNorm):
        axis = axis or 0
        _check_range(name, kept_out, module.normalized_shape[axis])
        for tensor_name in ("weight", "bias"):
            tensors[tensor_name] = _select(getattr(module, tensor_name, None), axis, kept_out)
        shape = list(module.normalized_shape)
        shape[axis] = len(kept_out) if kept_out is not None else shape[axis]
        attrs["normalized_shape"] = tuple(shape)
    else:
        raise PruningError(f"layer '{name}' is a {type(module).__name__}, which acdc-prune cannot resize")
    changed = {
        key: value
        for key, value in tensors.items()
        if value is not None and value.shape != getattr(module, key).shape
    }
    return changed, attrs


def _tensor_shapes(module: nn.Module) -> dict[str, list[int]]:
    named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return {name: list(tensor.shape) for name, tensor in named}


def _check_layer(model_class: str, name: str, module: nn.Module | None, layer: LayerPlan) -> None:
    """``PruningError`` unless ``module`` is the module the plan entry was made for."""
    if module is None:
        raise PruningError(f"the plan does not match this {model_class}: it has no module '{name}'")
    if type(module).__name__ != layer.type:
        raise PruningError(
            f"the plan does not match this {model_class}: module '{name}' is a {type(module).__name__}, "
            f"the plan expects a {layer.type}"
        )
    shapes = _tensor_shapes(module)
    for tensor_name, (before, _after) in layer.shapes.items():
        if shapes.get(tensor_name) != before:
            raise PruningError(
                f"the plan does not match this {model_class}: '{name}.{tensor_name}' has shape "
                f"{shapes.get(tensor_name)}, the plan expects {before}"
            )


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Build the pruned network: a copy of ``model`` whose layers keep only the planned channels.

    The copy has the same module classes and names; convs, linears, norms and PReLUs get smaller
    parameters and buffers (``out_channels``, ``groups``, ``num_features``... follow). ``model`` is
    not modified. Applying a plan to a freshly constructed model of the same architecture and then
    calling ``load_state_dict(pruned.state_dict())`` reproduces a pruned network without pickling
    modules.

    Args:
        model: the model the plan was made for (or a fresh instance of the same architecture).
        plan: from :func:`plan_pruning` or :meth:`PruningPlan.load`.

    Returns:
        A new ``nn.Module``; with a plan that removes nothing, an identical copy.

    Raises:
        PruningError: the plan does not match the model (class, a missing module, a type or a
            tensor shape), naming the first mismatching layer.
    """
    model_class = type(model).__name__
    if model_class != plan.model_class:
        raise PruningError(f"the plan is for a {plan.model_class}, not for this {model_class}")
    modules = dict(model.named_modules())
    memo: dict[int, Any] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for name, layer in plan.layers.items():
        module = modules.get(name)
        _check_layer(model_class, name, module, layer)
        tensors, attributes[name] = resize(name, module, layer.kept_out, layer.kept_in, layer.axis)
        expected = {key: after for key, (_before, after) in layer.shapes.items()}
        if {key: list(t.shape) for key, t in tensors.items()} != expected:
            raise PruningError(
                f"the plan is inconsistent at layer '{name}': its kept indices and shapes differ"
            )
        for tensor_name, tensor in tensors.items():
            old = getattr(module, tensor_name)
            new = (
                nn.Parameter(tensor, requires_grad=old.requires_grad)
                if isinstance(old, nn.Parameter)
                else tensor
            )
            if id(old) in memo and memo[id(old)].shape != new.shape:
                raise PruningError(
                    f"'{name}.{tensor_name}' is shared with another layer that is pruned differently"
                )
            memo[id(old)] = new
    pruned = copy.deepcopy(model, memo)
    for name, attrs in attributes.items():
        module = pruned.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, value)
    return pruned
