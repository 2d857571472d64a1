"""Rebuilding a physically smaller network from a model and a pruning plan."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from acdc_prune.pruning.channels import ChannelGraph
from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.handlers import handler_for, is_resizable
from acdc_prune.pruning.plan import LayerPlan, PruningPlan


class _ResizableMeta(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, nn.Module) and is_resizable(instance)


class Resizable(metaclass=_ResizableMeta):
    """``isinstance(module, Resizable)``: the layer registry knows how to slice ``module``'s tensors."""


#: For ``isinstance``: modules whose channel-sized tensors the rebuild can slice (follows the registry).
RESIZABLE = (Resizable,)


def resize(
    name: str,
    module: nn.Module,
    kept_out: Sequence[int] | None,
    kept_in: Sequence[int] | None,
    axis: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The new tensors and attributes of ``module`` once only the given channels are kept.

    The module's layer handler (:func:`acdc_prune.pruning.handlers.register_layer_handler`) does the
    slicing: built in for convs (also transposed, grouped, depthwise), linears, batch/instance norms,
    group norms, layer norms and PReLU.

    Args:
        name: the module's name, for error messages.
        module: the module (not modified).
        kept_out: sorted kept output channels, ``None`` = all (for norms and PReLU: the channels).
        kept_in: sorted kept input channels, ``None`` = all.
        axis: for ``LayerNorm``, the axis of ``normalized_shape`` that holds the channels.

    Returns:
        ``(tensors, attributes)``: parameter/buffer name -> new tensor for each one whose shape
        changes, and attribute name -> new value (``out_channels``, ``groups``, ``num_features``...).

    Raises:
        PruningError: no handler can resize the module, or the indices do not fit it.
    """
    handler = handler_for(module)
    if not is_resizable(module):
        raise PruningError(f"layer '{name}' is a {type(module).__name__}, which acdc-prune cannot resize")
    try:
        tensors, attrs = handler.resize(name, module, kept_out, kept_in, axis)
    except PruningError:
        raise
    except Exception as error:  # a handler that does not fit these indices
        raise PruningError(
            f"layer '{name}' ({type(module).__name__}) cannot be resized: {type(error).__name__}: {error}"
        ) from error
    changed = {
        key: value
        for key, value in tensors.items()
        if value is not None and value.shape != getattr(module, key).shape
    }
    return changed, attrs


def keep_applicable(graph: ChannelGraph, removed: set[int], scores: Mapping[int, float]) -> set[int]:
    """The channel sets to remove, less those that would make a plan :func:`apply_plan` rejects.

    Ratios count a group's channel sets, not each layer's, so a layer can lose every channel (VNet's
    up-convolution, concatenated with a wider skip inside a residual add); it gets back its
    best-scoring set. A GroupNorm covering only part of a group can end with a width that its groups
    do not divide; it gets back its best-scoring sets until they do. Sets only come back, so this ends.

    Args:
        graph: the channel analysis the plan is made from.
        removed: representatives (``graph.elements.find``) of the channel sets chosen for removal.
        scores: representative -> importance; the highest-scoring removed set comes back first.

    Returns:
        A subset of ``removed``.
    """
    root_of = graph.elements.roots()
    kept_removed = set(removed)
    sides = [
        roots
        for use in graph.layers.values()
        for elems in (use.out_elems, use.in_elems)
        if (roots := {root_of[e] for e in elems or ()})
    ]
    multiples = [([root_of[e] for e in elems], num_groups) for elems, num_groups in graph.multiples]

    def restore(roots: set[int]) -> None:
        kept_removed.discard(max(roots, key=lambda r: (scores.get(r, 0.0), -r)))

    changed = True
    while changed:
        changed = False
        for roots in sides:
            if roots <= kept_removed:
                restore(roots)
                changed = True
        for roots, num_groups in multiples:
            while sum(r not in kept_removed for r in roots) % num_groups:
                restore(set(roots) & kept_removed)
                changed = True
    return kept_removed


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
