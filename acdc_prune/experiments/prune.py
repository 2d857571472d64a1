"""Prune a trained run by block-wise ratios, re-initialise, retrain and record what it cost and bought."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from acdc_prune.config import REINIT_MODES, Config, read_yaml, validate_ratios
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.progress import Reporter
from acdc_prune.errors import ConfigError, Hint
from acdc_prune.experiments.batches import training_batches
from acdc_prune.experiments.planning import Planned, example_input, plan_for, size_change
from acdc_prune.io import (
    atomic_save_figure,
    atomic_write_json,
    read_json,
    refuse_existing,
    staged_dir,
    unused_path,
)
from acdc_prune.models import build_model
from acdc_prune.pruning import PruningPlan, apply_plan, compose, recalibrate_batchnorm
from acdc_prune.pruning.summary import channel_masks, layer_widths, reinitialise


def read_ratios(path: str | Path) -> dict[str, float]:
    """Read a ratios YAML file: a mapping ``{default: 0.25, encoders.1: 0.5, ...}``.

    A top-level ``ratios:`` key holding that mapping is accepted too. Values must lie in [0, 1); a
    missing ``default`` means blocks not listed are not pruned.

    Raises:
        ConfigError: unreadable YAML, not a mapping, or a value that is not a number in [0, 1).
    """
    raw = read_yaml(path)
    if isinstance(raw, dict) and set(raw) == {"ratios"} and isinstance(raw["ratios"], dict):
        raw = raw["ratios"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of block prefixes to ratios, e.g. 'default: 0.25'")
    return validate_ratios(raw, str(path))


def plot_widths(widths: list[dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars of each layer's output width before and after pruning (PNG)."""
    from acdc_prune.experiments.report import pyplot

    plt = pyplot()
    names = [row["layer"] for row in widths]
    height = max(3.0, 0.22 * len(names) + 1.0)
    fig, ax = plt.subplots(figsize=(8, height))
    positions = range(len(names))
    ax.barh(positions, [row["before"] for row in widths], color="#c9d6e8", label="original")
    ax.barh(positions, [row["after"] for row in widths], color="#2f5d9e", label="pruned")
    ax.set_yticks(list(positions), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


@dataclass
class PruneResult:
    """What :func:`prune_run` produced.

    Attributes:
        out_dir: the child folder of the run.
        meta: the content of ``meta.json`` (widths, params, MACs, ratios, mode).
        before: evaluation summary of the pruned network before retraining.
        after: evaluation summary after retraining (equal to ``before`` without retraining).
    """

    out_dir: Path
    meta: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]


def _initial_weights(
    trained: nn.Module, plan: PruningPlan, reinit: str, rewind_source: Checkpoint | None, seed: int
) -> nn.Module:
    """The pruned network with weights chosen by ``reinit`` (masks always come from ``trained``).

    ``none`` and ``lr_rewind`` keep the surviving weights, ``random`` re-draws them, ``rewind``
    takes them from the early checkpoint.
    """
    if reinit == "rewind":
        return apply_plan(rewind_source.build_model(), plan)
    pruned = apply_plan(trained, plan)
    return reinitialise(pruned, seed) if reinit == "random" else pruned


def _rewind_checkpoint(run_dir: Path, name: str, source: Checkpoint) -> Checkpoint:
    """The early checkpoint ``name`` of ``run_dir``; it must hold the trained model's architecture."""
    if source.plan is not None:
        raise ConfigError(
            f"{source.path} is already pruned and its folder keeps no early checkpoints; "
            "prune it again with reinit none, random or lr_rewind"
        )
    early = Checkpoint.open(run_dir, name)
    if early.config.model != source.config.model or early.plan is not None:
        raise ConfigError(
            f"{early.path} holds another architecture than the trained model; rewind to the same run"
        )
    return early


def _pruning_config(
    source: Checkpoint, overrides: list[str] | None, ratios: dict[str, float] | None, settings: dict[str, Any]
) -> Config:
    """The run's config with ``overrides`` and this pruning's settings (``None`` values keep the config's).

    Raises:
        ConfigError: bad overrides, an unknown re-initialisation, or ``steps`` above 1 without a target.
    """
    from acdc_prune.config import apply_overrides, config_from_dict

    config = config_from_dict(apply_overrides(source.config.to_dict(), overrides or []))
    if ratios is not None:
        config.pruning.ratios = ratios
    for key, value in settings.items():
        if value is not None:
            setattr(config.pruning, key, value)
    if config.pruning.reinit not in REINIT_MODES:
        raise ConfigError(
            f"re-initialisation '{config.pruning.reinit}' is not one of {', '.join(REINIT_MODES)}"
        )
    if config.pruning.steps > 1 and config.pruning.target is None:
        raise ConfigError(
            "pruning.steps needs a target (pruning.target, the fraction of the original to keep)",
            Hint("pruning.target", 0.1),
        )
    return config


def _retraining_config(config: Config, trained_epochs: int) -> Config:
    """The config of retraining: ``pruning.retrain_epochs`` epochs at ``retrain_lr``, or, for learning-rate
    rewinding, the last ``retrain_epochs`` epochs of the original schedule replayed at its own rates."""
    retrain = copy.deepcopy(config)
    retrain.training.epochs = config.pruning.retrain_epochs
    if config.pruning.reinit == "lr_rewind":
        retrain.training.schedule_offset = max(0, trained_epochs - config.pruning.retrain_epochs)
    else:
        retrain.training.lr = config.pruning.retrain_lr or config.training.lr
    return retrain


def _resolved_postprocessing(config: Config, checkpoint: Checkpoint) -> Config:
    """A copy of ``config`` whose ``evaluation.largest_component`` is resolved for ``checkpoint``."""
    resolved = copy.deepcopy(config)
    resolved.evaluation.largest_component = checkpoint.largest_component(config.evaluation.largest_component)
    return resolved


def _retrain(
    pruned: nn.Module,
    plan: PruningPlan,
    config: Config,
    trained_epochs: int,
    staging: Path,
    reporter: Reporter | None,
) -> nn.Module:
    """Retrain ``pruned`` as ``config.pruning`` says into ``staging`` (or only save it, for 0 epochs);
    the network of its ``best.pt``."""
    from acdc_prune.config import save_config
    from acdc_prune.engine.trainer import train

    if config.pruning.retrain_epochs == 0:
        save_config(config, staging / "config.yaml")
        Checkpoint.of(pruned, config, epoch=0, plan=plan).save(staging / "best.pt")
        return pruned
    retrain = _retraining_config(config, trained_epochs)
    result = train(
        retrain, model=pruned, run_dir=staging, plan=plan, init_checkpoint_epochs=False, reporter=reporter
    )
    return result.model


def _recalibrate(pruned: nn.Module, config: Config, batches: Any) -> int:
    """Re-estimate BatchNorm statistics on ``pruning.calibration_batches`` training batches (0 = off)."""
    count = config.pruning.calibration_batches
    return recalibrate_batchnorm(pruned, batches(), num_batches=count) if count else 0


def _budget_meta(planned: Planned, original_macs: int, pruned_macs: int) -> dict[str, Any]:
    """What was asked and what was reached, as fractions of the original network."""
    pruning_target = planned.budget
    return {
        "target": None if pruning_target is None else pruning_target.target,
        "target_metric": None if pruning_target is None else pruning_target.metric,
        "reached_fraction_of_step": None if pruning_target is None else pruning_target.reached_fraction,
        "macs_fraction_of_original": pruned_macs / original_macs,
    }


def prune_run(
    run_dir: Path,
    ratios: dict[str, float] | None = None,
    *,
    reinit: str | None = None,
    rewind_to: str | None = None,
    retrain_epochs: int | None = None,
    retrain_lr: float | None = None,
    checkpoint: Path | None = None,
    out_dir: Path | None = None,
    overrides: list[str] | None = None,
    reporter: Reporter | None = None,
) -> PruneResult:
    """Prune the model of ``run_dir``, re-initialise, recalibrate, evaluate, retrain, evaluate again.

    The plan follows ``config.pruning`` (criterion, scope, ratios or a budget ``target``; pass them
    as ``overrides`` such as ``pruning.target=0.1``). An already pruned run prunes further: the child
    records one plan against the original architecture (the parent's plan composed with the new
    one). With ``pruning.steps`` above 1 the target is reached in that many geometric steps, each a
    child of the previous with its own retraining; the last one is returned. Every input is checked
    before anything is written; a child folder only appears, complete, when its job succeeded.

    Args:
        run_dir: a training run folder (``best.pt``, ``config.yaml``, early ``epochN.pt``) or a pruned one.
        ratios: share of filters to remove per module-path prefix plus ``default`` (default
            ``pruning.ratios``); unused when a target is set.
        reinit: ``none`` keeps surviving weights, ``random`` re-draws them, ``rewind`` loads the
            surviving channels of the early checkpoint ``rewind_to`` of the same run, ``lr_rewind``
            keeps them and replays the end of the original learning-rate schedule (default:
            ``pruning.reinit``).
        rewind_to: checkpoint name for ``rewind`` (default: the config's ``pruning.rewind_to``).
        retrain_epochs: retraining epochs (default ``pruning.retrain_epochs``); 0 skips retraining.
        retrain_lr: peak retraining learning rate (default ``pruning.retrain_lr`` or ``training.lr``).
        checkpoint: prune this checkpoint instead of ``run_dir/best.pt``.
        out_dir: the child folder to create (default ``run_dir/pruned/<mode>-<timestamp>``); with
            steps, the intermediate children go beside it as ``<out_dir>-step<i>`` (reused by a
            re-run once finished), else each under its parent's ``pruned/``.
        overrides: dotted overrides applied to the run's config for planning, retraining and evaluation.
        reporter: receives progress of evaluation and retraining.

    Returns:
        :class:`PruneResult` of the (last) child.

    Raises:
        PruningError: bad ratio keys or values, an unknown criterion, or an unreachable target;
            CheckpointError: missing or foreign checkpoints; ConfigError: bad mode or settings, an
            existing ``out_dir``, or a ``<out_dir>-step<i>`` toward another target.
    """
    settings = {
        "reinit": reinit,
        "rewind_to": rewind_to,
        "retrain_epochs": retrain_epochs,
        "retrain_lr": retrain_lr,
    }
    source = Checkpoint.open(checkpoint or run_dir)
    config = _pruning_config(source, overrides, ratios, settings)
    steps, target = config.pruning.steps, config.pruning.target
    run_dir, out_dir = Path(run_dir), None if out_dir is None else refuse_existing(Path(out_dir))
    for step in range(1, steps + 1):
        step_config = copy.deepcopy(config)
        if steps > 1:  # geometric: after step i the network keeps target ** (i / steps) of the original
            step_config.pruning.target = target ** (step / steps)
        step_dir = out_dir
        if out_dir is not None and step < steps:
            step_dir = _step_dir(out_dir, step, step_config)
            if step_dir.exists():  # finished by an earlier attempt, toward this step's target
                run_dir, source = step_dir, Checkpoint.open(step_dir)
                continue
        result = _prune_once(run_dir, source, step_config, step_dir, reporter)
        run_dir, source = result.out_dir, Checkpoint.open(result.out_dir)
    return result


def _step_dir(out_dir: Path, step: int, config: Config) -> Path:
    """``<out_dir>-step<i>``, the folder of an intermediate step beside the final child; one that an
    earlier attempt finished is reused, so an interrupted ``--steps`` run (or sweep arm) resumes.

    Raises:
        ConfigError: the folder holds a step toward another target.
    """
    step_dir = out_dir.with_name(f"{out_dir.name}-step{step}")
    if step_dir.exists():
        recorded = read_json(step_dir / "meta.json", f"delete {step_dir} and run again").get("target")
        if recorded is None or not math.isclose(recorded, config.pruning.target):
            raise ConfigError(
                f"{step_dir} holds a step toward another target ({recorded}, not "
                f"{config.pruning.target:g}); delete it or choose another output folder"
            )
    return step_dir


def _cost_function(config: Config, shape: tuple[int, ...]) -> Any:
    """``cost(model)`` in ``pruning.target_metric``: MACs at ``shape``, parameters, or seconds per slice."""
    from acdc_prune.engine.cost import count_macs, count_parameters, measure_latency

    evaluation = config.evaluation
    latency_shape = (1, config.model.in_channels, *evaluation.latency_size)
    costs = {
        "macs": lambda model: count_macs(model, shape),
        "params": count_parameters,
        "latency": lambda model: (
            measure_latency(model, latency_shape, evaluation.latency_repeats, evaluation.latency_warmup)[
                "median_ms"
            ]
            / 1000
        ),
    }
    return costs[config.pruning.target_metric]


def _plan_step(trained: nn.Module, source: Checkpoint, config: Config, batches: Any) -> Planned:
    """Plan for ``trained``; a target is a fraction of the ORIGINAL network, so for an already pruned
    source it is divided by the fraction the source keeps already."""
    planning = copy.deepcopy(config)
    cost = _cost_function(config, tuple(example_input(config).shape))
    if config.pruning.target is not None and source.plan is not None:
        kept = cost(trained) / cost(build_model(config.model))
        planning.pruning.target = min(1.0, config.pruning.target / kept)
    measure = cost if config.pruning.target_metric == "latency" else None
    return plan_for(trained, planning, batches=batches, measure=measure)


def _prune_once(
    run_dir: Path, source: Checkpoint, config: Config, out_dir: Path | None, reporter: Reporter | None
) -> PruneResult:
    """One pruning of ``source`` (a trained or already pruned checkpoint) into a child of ``run_dir``."""
    from acdc_prune.experiments.evaluation import evaluate_records, validation_records

    reinit = config.pruning.reinit
    rewind_source = (
        _rewind_checkpoint(run_dir, config.pruning.rewind_to, source) if reinit == "rewind" else None
    )
    batches = training_batches(config)
    trained = source.build_model()
    planned = _plan_step(trained, source, config, batches)
    plan = planned.plan if source.plan is None else compose(source.plan, planned.plan)
    pruned = _initial_weights(trained, planned.plan, reinit, rewind_source, config.training.seed)
    original = build_model(config.model)
    widths = layer_widths(original, plan)
    sizes = size_change(original, pruned, planned.shape)
    meta = {
        "source_checkpoint": str(source.path),
        "reinit": reinit,
        "rewind_to": config.pruning.rewind_to if reinit == "rewind" else None,
        "ratios": None if config.pruning.target is not None else config.pruning.ratios,
        "importance": planned.criterion,
        "scope": "global" if config.pruning.target is not None else config.pruning.scope,
        **_budget_meta(planned, sizes["macs"]["before"], sizes["macs"]["after"]),
        **sizes,
        "widths": widths,
    }
    out_dir = Path(out_dir) if out_dir is not None else unused_path(run_dir / "pruned", prefix=f"{reinit}-")
    val_records = validation_records(config)
    with staged_dir(out_dir) as staging:
        plan.save(staging / "plan.json")
        atomic_write_json(staging / "masks.json", channel_masks(widths, plan))
        plot_widths(
            widths, staging / "widths.png", f"{run_dir.name}: {reinit}, {sizes['params']['after']:,} params"
        )
        meta["batchnorm_recalibrated"] = _recalibrate(pruned, config, batches)
        atomic_write_json(staging / "meta.json", meta)
        # Post-processing as the baseline's evaluation applies it: ``auto`` takes the choice recorded
        # with the source before retraining, and the retrained child's own choice after it.
        scoring = _resolved_postprocessing(config, source)
        before = evaluate_records(pruned, scoring, val_records, staging / "eval_before", reporter).summary
        final = _retrain(pruned, plan, config, source.config.training.epochs, staging, reporter)
        after = before
        if config.pruning.retrain_epochs > 0:
            scoring = _resolved_postprocessing(config, Checkpoint.open(staging))
            after = evaluate_records(final, scoring, val_records, staging / "eval_after", reporter).summary
        summary = {k: v for k, v in meta.items() if k != "widths"}
        atomic_write_json(staging / "result.json", {"meta": summary, "before": before, "after": after})
    return PruneResult(out_dir=out_dir, meta=meta, before=before, after=after)
