"""Plans for a run's network from its config: criterion with its options, block or global scope, budgets."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from acdc_prune.config import Config, PruningConfig
from acdc_prune.pruning import BudgetResult, Importance, PruningPlan, plan_pruning, plan_to_budget
from acdc_prune.pruning.importance import resolve_importance


@dataclass
class Planned:
    """A plan made for a network, and what it was made with.

    Attributes:
        plan: the plan (against the network it was made for).
        shape: the example input's shape, at which MACs are counted.
        criterion: the criterion as it describes itself (``l1``, ``redundancy(similarity=cosine)``).
        budget: the budget search's result when ``pruning.target`` was set, else ``None``.
    """

    plan: PruningPlan
    shape: tuple[int, ...]
    criterion: str
    budget: BudgetResult | None = None


def example_input(config: Config) -> torch.Tensor:
    """A deterministic example slice ``(1, in_channels, *patch_size)`` for tracing the network."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, config.model.in_channels, *config.data.patch_size, generator=generator)


def criterion(pruning: PruningConfig) -> Importance:
    """The configured criterion, given the options of ``pruning`` that its class takes.

    ``similarity``, ``redundancy_threshold`` (as ``threshold``) and ``data_batches`` (as
    ``num_batches``) reach a criterion whose constructor has a parameter of that name, built-in
    (``redundancy``, ``taylor``) or registered from Python.

    Raises:
        PruningError: an unknown criterion (the message lists the known ones).
    """
    chosen = resolve_importance(pruning.importance)
    options = {
        "similarity": pruning.similarity,
        "threshold": pruning.redundancy_threshold,
        "num_batches": pruning.data_batches,
    }
    accepted = inspect.signature(type(chosen)).parameters
    taken = {key: value for key, value in options.items() if key in accepted}
    return type(chosen)(**taken) if taken else chosen


def plan_for(
    model: nn.Module,
    config: Config,
    ratios: dict[str, float] | None = None,
    batches: Callable[[], Any] | None = None,
    measure: Callable[[nn.Module], float] | None = None,
) -> Planned:
    """Plan pruning ``model`` as ``config.pruning`` says: to ``target`` when it is set, else by ratios.

    Args:
        model: the network to prune (the trained one, or an already pruned one).
        config: gives the pruning settings and the example input's shape.
        ratios: block-wise ratios (default ``pruning.ratios``); ignored when a target is set.
        batches: ``batches()`` yields ``(image, label)`` training batches (data criteria, Taylor's loss).
        measure: ``measure(model) -> seconds`` for a latency target.

    Raises:
        PruningError: bad ratios, an unknown criterion, a data criterion without batches, or a target
            that is out of range or cannot be reached (the message says what can).
    """
    from acdc_prune.engine.steps import make_loss

    pruning = config.pruning
    chosen = criterion(pruning)
    example = example_input(config)
    options = {
        "round_to": pruning.round_to,
        "max_ratio": pruning.max_ratio,
        "min_channels": pruning.min_channels,
        "batches": batches() if batches is not None else None,
        "loss_fn": make_loss(config.training),
    }
    if pruning.target is None:
        chosen_ratios = ratios if ratios is not None else pruning.ratios
        plan = plan_pruning(model, example, chosen_ratios, chosen, scope=pruning.scope, **options)
        return Planned(plan, tuple(example.shape), chosen.describe())
    budget = plan_to_budget(
        model, example, pruning.target, pruning.target_metric, chosen, measure=measure, **options
    )
    return Planned(budget.plan, tuple(example.shape), chosen.describe(), budget)


def size_change(original: nn.Module, pruned: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """Parameters and MACs (at input ``shape``) before and after pruning."""
    from acdc_prune.engine.cost import count_macs, count_parameters

    return {
        "params": {"before": count_parameters(original), "after": count_parameters(pruned)},
        "macs": {
            "before": count_macs(original, shape),
            "after": count_macs(pruned, shape),
            "input_shape": list(shape),
        },
    }
