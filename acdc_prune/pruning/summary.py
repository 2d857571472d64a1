"""What a plan does to a network, layer by layer: blocks, widths, channel masks; and re-initialisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from acdc_prune.pruning.plan import PruningPlan


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every weight of ``model`` in place with each layer's own initialiser; reset norm statistics.

    Args:
        model: the (pruned) network; layers without ``reset_parameters`` keep their tensors.
        seed: seed of the new weights.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def block_of(name: str, model: nn.Module) -> str:
    """The block a layer belongs to: ``encoders.1`` for ``encoders.1.conv1.conv``, ``head`` for ``head``.

    The first path component names the block, or the first two where the first is a container of
    numbered blocks (``encoders``, ``decoders``, MONAI's ``model``).
    """
    parts = name.split(".")
    first = model.get_submodule(parts[0])
    numbered = isinstance(first, (nn.ModuleList, nn.Sequential)) and len(parts) > 1 and parts[1].isdigit()
    return ".".join(parts[:2]) if numbered else parts[0]


def layer_widths(model: nn.Module, plan: PruningPlan) -> list[dict[str, Any]]:
    """Output widths before and after pruning of every conv/linear layer, in module order.

    Returns:
        Rows ``{"layer", "block", "type", "before", "after"}``.
    """
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or weight is None:
            continue
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        before = int(weight.shape[1] * module.groups if transposed else weight.shape[0])
        entry = plan.layers.get(name)
        after = before if entry is None or entry.kept_out is None else len(entry.kept_out)
        rows.append(
            {
                "layer": name,
                "block": block_of(name, model),
                "type": type(module).__name__,
                "before": before,
                "after": after,
            }
        )
    return rows


def channel_masks(widths: list[dict[str, Any]], plan: PruningPlan) -> dict[str, list[bool]]:
    """Per layer, True/False per original output channel (True = kept), as the original work stored."""
    masks = {}
    for row in widths:
        entry = plan.layers.get(row["layer"])
        kept = set(range(row["before"])) if entry is None or entry.kept_out is None else set(entry.kept_out)
        masks[row["layer"]] = [index in kept for index in range(row["before"])]
    return masks
