"""Checking a pruned network against the correctness contract (the original with dropped inputs zeroed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from acdc_prune.pruning.handlers import LayerHandler, handler_for
from acdc_prune.pruning.plan import PruningPlan
from acdc_prune.pruning.tracing import eval_mode

#: Norms whose statistics are taken over channels: removing channels changes the surviving outputs.
CHANNEL_STATISTICS_NORMS = (nn.GroupNorm, nn.LayerNorm)


def randomise_norm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm random affine parameters and running statistics, in place, before a check.

    Freshly built norms (weight 1, bias 0, mean 0, variance 1) hide slicing mistakes: a wrongly
    indexed parameter still holds the right value. Weights are drawn from U(0.5, 1.5), biases and
    running means from N(0, 0.2), running variances from U(0.5, 1.5). Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.modules.batchnorm._NormBase, *CHANNEL_STATISTICS_NORMS)):
                continue
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=generator))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.empty_like(module.bias).normal_(0.0, 0.2, generator=generator))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def mixes_channel_statistics(model: nn.Module) -> bool:
    """Whether a model has GroupNorm/LayerNorm, for which only shapes can be compared after pruning."""
    return any(isinstance(m, CHANNEL_STATISTICS_NORMS) for m in model.modules())


def changes_channel_statistics(model: nn.Module, plan: PruningPlan) -> bool:
    """Whether the plan prunes a GroupNorm/LayerNorm of ``model``, so that only shapes can be compared.

    A channel-statistics norm the plan leaves whole (a transformer's LayerNorm, a pinned GroupNorm)
    sees exactly the same input as in :func:`zeroed_reference`, so the exact contract still holds.
    """
    return any(isinstance(model.get_submodule(name), CHANNEL_STATISTICS_NORMS) for name in plan.layers)


def zeroed_reference(model: nn.Module, plan: PruningPlan, *inputs: torch.Tensor) -> Any:
    """The original model's eval-mode output with every input channel a planned layer drops set to zero.

    Forward pre-hooks multiply the first input of each layer that has ``kept_in`` by a 0/1 channel
    mask along the dimension its layer handler names (1 for convs and norms, the last one for
    ``nn.Linear``, the normalised axis for ``nn.LayerNorm``). By the correctness contract the pruned
    network's output equals this.

    Args:
        model: the original (unpruned) model.
        plan: the plan applied to it.
        inputs: the forward arguments, e.g. a tensor (N, C, H, W).
    """
    hooks = []
    for name, layer in plan.layers.items():
        if layer.kept_in is None:
            continue
        module = model.get_submodule(name)
        handler = handler_for(module) or LayerHandler()

        def zero_dropped(module: nn.Module, args: tuple, layer: Any = layer, handler: Any = handler) -> tuple:
            first = args[0]
            dim = handler.input_dim(module, first.ndim, layer.axis)
            mask = torch.zeros(first.shape[dim], dtype=first.dtype, device=first.device)
            mask[layer.kept_in] = 1
            shape = [1] * first.ndim
            shape[dim] = -1
            return (first * mask.view(shape), *args[1:])

        hooks.append(module.register_forward_pre_hook(zero_dropped))
    try:
        with eval_mode(model), torch.no_grad():
            return model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()


def max_deviation(model: nn.Module, pruned: nn.Module, plan: PruningPlan, *inputs: torch.Tensor) -> float:
    """Largest absolute difference between ``pruned(*inputs)`` and :func:`zeroed_reference` (eval mode).

    Outputs may be tensors or (nested) lists, tuples and dicts of them, compared leaf by leaf; ``inf``
    when their structure or shapes differ, 0.0 when bit-identical.
    """
    with eval_mode(pruned), torch.no_grad():
        out = pruned(*inputs)
    leaves, spec = pytree.tree_flatten(out)
    expected, expected_spec = pytree.tree_flatten(zeroed_reference(model, plan, *inputs))
    if spec != expected_spec:
        return float("inf")
    worst = 0.0
    for a, b in zip(leaves, expected, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, (a - b).abs().max().item() if a.numel() else 0.0)
    return worst
