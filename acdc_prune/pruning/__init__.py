"""Structured channel pruning of any PyTorch model: fx graph -> channel groups -> scores -> plan -> rebuild.

Typical use::

    plan = plan_pruning(model, torch.randn(1, 1, 64, 64), ratios={"default": 0.25, "encoders.1": 0.5})
    pruned = apply_plan(model, plan)          # a new, physically smaller nn.Module
    plan.save("plan.json")

    result = plan_to_budget(model, x, 0.5, metric="macs", importance="taylor", batches=..., loss_fn=...)
    recalibrate_batchnorm(apply_plan(model, result.plan), batches)

The package depends on torch alone.
"""

from acdc_prune.pruning.budget import BudgetResult, plan_to_budget
from acdc_prune.pruning.calibration import recalibrate_batchnorm
from acdc_prune.pruning.criteria import Redundancy, Taylor
from acdc_prune.pruning.errors import PruningError
from acdc_prune.pruning.functions import register_function_rule
from acdc_prune.pruning.handlers import (
    LayerHandler,
    OpaqueBlock,
    PerChannelHandler,
    register_layer_handler,
    unregister_layer_handler,
)
from acdc_prune.pruning.importance import (
    BNScaleImportance,
    FunctionImportance,
    Importance,
    NormImportance,
    check_importance,
    filter_norms,
    importance_names,
    reduce_to_sets,
    register_importance,
    resolve_importance,
)
from acdc_prune.pruning.plan import GroupPlan, LayerPlan, PruningPlan, compose
from acdc_prune.pruning.planner import plan_pruning, ratio_prefixes
from acdc_prune.pruning.rebuild import apply_plan
from acdc_prune.pruning.verify import max_deviation, randomise_norm_statistics, zeroed_reference

#: The built-in criteria; ``importance_names()`` also lists those registered later.
IMPORTANCES: tuple[str, ...] = importance_names()

__all__ = [
    "IMPORTANCES",
    "BNScaleImportance",
    "BudgetResult",
    "FunctionImportance",
    "GroupPlan",
    "Importance",
    "LayerHandler",
    "LayerPlan",
    "OpaqueBlock",
    "PerChannelHandler",
    "NormImportance",
    "PruningError",
    "PruningPlan",
    "Redundancy",
    "Taylor",
    "apply_plan",
    "check_importance",
    "compose",
    "filter_norms",
    "importance_names",
    "max_deviation",
    "plan_pruning",
    "plan_to_budget",
    "randomise_norm_statistics",
    "ratio_prefixes",
    "recalibrate_batchnorm",
    "reduce_to_sets",
    "register_function_rule",
    "register_importance",
    "register_layer_handler",
    "unregister_layer_handler",
    "resolve_importance",
    "zeroed_reference",
]
