"""Channel importance: the L1 or L2 norm of each output filter, summed over a coupled channel set."""

from __future__ import annotations

import math

import torch
from torch import nn

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.groups import ChannelGraph

IMPORTANCES = ("l1", "l2")


def check_importance(importance: str) -> None:
    """Raise ``PruningError`` unless ``importance`` names a supported criterion."""
    if importance not in IMPORTANCES:
        raise PruningError(f"importance '{importance}' is not one of {', '.join(IMPORTANCES)}")


def filter_weights(module: nn.Module) -> torch.Tensor:
    """The weights of each output filter of a conv, transposed conv or linear layer, one row each.

    Returns:
        Tensor of shape (out_channels, fan): row ``j`` holds every weight that produces output
        channel ``j`` (for a transposed conv, ``weight[:, j]`` within its group).
    """
    weight = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        grouped = weight.reshape(groups, in_per_group, out_per_group, -1).transpose(1, 2)
        return grouped.reshape(groups * out_per_group, -1)
    return weight.reshape(weight.shape[0], -1)


def filter_norm(module: nn.Module, importance: str = "l1") -> torch.Tensor:
    """Per-output-filter norm of a conv, transposed conv or linear layer.

    Args:
        module: a ``nn.Conv*d``, ``nn.ConvTranspose*d`` or ``nn.Linear``.
        importance: ``"l1"`` (sum of absolute weights) or ``"l2"`` (Euclidean norm).

    Returns:
        Tensor of shape (out_channels,).
    """
    check_importance(importance)
    return torch.linalg.vector_norm(filter_weights(module).float(), ord=1 if importance == "l1" else 2, dim=1)


def filter_norms(model: nn.Module, importance: str = "l1") -> dict[str, torch.Tensor]:
    """Per-filter norms of every conv, transposed conv and linear layer of a model, for inspection.

    Args:
        model: any ``nn.Module``; it is not traced.
        importance: ``"l1"`` or ``"l2"``.

    Returns:
        Module name -> tensor of shape (out_channels,), in ``named_modules()`` order.
    """
    check_importance(importance)
    return {
        name: filter_norm(module, importance)
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
    }


def channel_scores(graph: ChannelGraph, importance: str = "l1") -> dict[int, float]:
    """Importance of every prunable channel set (union-find representative -> score).

    A set's score reduces the norms of all filters that produce it, over every layer of the coupled
    group: the sum of L1 norms for ``"l1"``; for ``"l2"``, the Euclidean norm of all those filters
    together (square root of the summed squared L2 norms). Lower scores are removed first.
    """
    check_importance(importance)
    power = 1 if importance == "l1" else 2
    totals: dict[int, float] = {}
    for name in graph.producers:
        use = graph.layers[name]
        norms = filter_norm(use.module, importance).tolist()
        for element, norm in zip(use.out_elems, norms, strict=True):
            root = graph.elements.find(element)
            totals[root] = totals.get(root, 0.0) + norm**power
    return totals if power == 1 else {root: math.sqrt(total) for root, total in totals.items()}
