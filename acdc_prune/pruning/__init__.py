"""Structured channel pruning of any PyTorch model: torch.fx graph -> channel groups -> L1 plan -> rebuild.

Typical use::

    plan = plan_pruning(model, torch.randn(1, 1, 64, 64), ratios={"default": 0.25, "encoders.1": 0.5})
    pruned = apply_plan(model, plan)          # a new, physically smaller nn.Module
    plan.save("plan.json")

The package depends on torch alone.
"""

from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.importance import IMPORTANCES, filter_norms
from acdc_prune.pruning.plan import GroupPlan, LayerPlan, PruningPlan
from acdc_prune.pruning.planner import plan_pruning, ratio_prefixes
from acdc_prune.pruning.rebuild import apply_plan
from acdc_prune.pruning.verify import max_deviation, randomise_norm_statistics, zeroed_reference

__all__ = [
    "IMPORTANCES",
    "GroupPlan",
    "LayerPlan",
    "PruningError",
    "PruningPlan",
    "apply_plan",
    "filter_norms",
    "max_deviation",
    "plan_pruning",
    "randomise_norm_statistics",
    "ratio_prefixes",
    "zeroed_reference",
]
