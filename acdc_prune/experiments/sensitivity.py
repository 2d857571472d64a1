"""Sensitivity analysis: prune one block at a time, recalibrate BatchNorm, score a fixed validation subset."""

from __future__ import annotations

import copy
import datetime as _dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from acdc_prune.config import Config
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.progress import LogReporter, Reporter
from acdc_prune.errors import ConfigError
from acdc_prune.experiments.scoring import Scorer, TrainingSlices, has_batchnorm
from acdc_prune.experiments.sensitivity_ratios import (
    GREEDY,
    check_ratio_list,
    greedy_ratios,
    plot_losses,
    predicted_loss,
    ratios_text,
    row_key,
)
from acdc_prune.io import atomic_write_json, atomic_write_text, read_json, unused_path

COLUMNS = (
    "block",
    "ratio",
    "channels_kept",
    "channels_total",
    "params",
    "macs",
    "macs_saved",
    "dice",
    "dice_loss",
    "dice_RV",
    "dice_MYO",
    "dice_LV",
    "seconds",
)
"""Columns of ``sensitivity.csv``, one row per block and ratio (``macs_saved``: fraction of the network)."""

PROXY = (
    "mean over volumes of the mean 3D Dice of RV, MYO and LV in the original geometry, on a fixed subset "
    "of the run's validation volumes spread evenly over their sorted list (the same subset every time)"
)
"""What the ``dice`` column measures: a fast proxy of the full evaluation."""


def prunable_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The blocks (``block_of``) of the prunable layers, in execution order: ``encoders.0``, ``bottleneck``...

    Args:
        model: the network.
        example: an input ``(1, C_in, H, W)`` it can be traced with.
    """
    from acdc_prune.pruning import ratio_prefixes
    from acdc_prune.pruning.summary import block_of

    prefixes = ratio_prefixes(model, example)
    layers = [p for p in prefixes if not any(q.startswith(p + ".") for q in prefixes)]
    return list(dict.fromkeys(block_of(name, model) for name in layers))


def fast_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """``count_macs`` of ``model`` at input ``shape``, counted on a copy on the meta device (no arithmetic).

    The count is the same as on real tensors; a layer without meta kernels is counted on real ones.
    """
    from acdc_prune.engine.cost import count_macs

    try:
        return count_macs(copy.deepcopy(model).to("meta"), shape)
    except (RuntimeError, NotImplementedError):
        return count_macs(model, shape)


@dataclass
class Job:
    """Everything a sensitivity analysis needs, checked before anything is written.

    Attributes:
        source: the checkpoint analysed.
        config: its config with the overrides and the chosen criterion.
        plan_config: ``config`` with a small example slice: plans depend on channels, not pixels.
        model: the trained network on the CPU (never modified).
        blocks: the blocks pruned one at a time.
        ratios: the ratios tried on each block.
        shape: the input shape MACs are counted at (the example slice of ``data.patch_size``).
        macs: MACs of ``model`` at ``shape``.
        params: parameters of ``model``.
        target: fraction of ``macs`` that ``ratios.yaml`` keeps.
        out_dir: the output folder.
        scorer: the recalibration and scoring.
    """

    source: Checkpoint
    config: Config
    plan_config: Config
    model: nn.Module
    blocks: list[str]
    ratios: list[float]
    shape: tuple[int, ...]
    macs: int
    params: int
    target: float
    out_dir: Path
    scorer: Scorer

    def plan(self, ratios: dict[str, float]) -> Any:
        """The plan of ``ratios`` for ``model`` by the run's criterion (data criteria read training data)."""
        from acdc_prune.experiments.planning import plan_for

        training = self.scorer.training
        return plan_for(self.model, self.plan_config, ratios, lambda: training).plan

    def macs_fraction(self, ratios: dict[str, float]) -> float:
        """Real MACs of the network pruned by ``ratios``, as a fraction of the original's."""
        from acdc_prune.pruning import apply_plan

        return fast_macs(apply_plan(self.model, self.plan(ratios)), self.shape) / self.macs

    def settings(self) -> dict[str, Any]:
        """What the rows depend on; a folder is resumed only with the same settings."""
        pruning = self.config.pruning
        return {
            "source_checkpoint": str(self.source.path),
            "importance": pruning.importance,
            "round_to": pruning.round_to,
            "volumes": self.scorer.volume_names(),
            "calibration_batches": pruning.calibration_batches,
            "calibration_batch_size": self.config.training.batch_size,
            "precision": self.scorer.precision.describe(),
        }


def _job_config(
    source: Checkpoint, overrides: list[str] | None, importance: str | None
) -> tuple[Config, Config]:
    """The run's config with ``overrides`` and ``importance``, and its copy for tracing at a small size."""
    from acdc_prune.config import apply_overrides, config_from_dict
    from acdc_prune.experiments.planning import criterion
    from acdc_prune.models import total_stride

    config = config_from_dict(apply_overrides(source.config.to_dict(), overrides or []))
    if importance is not None:
        config.pruning.importance = importance
    config.pruning.target, config.pruning.scope = None, "block"
    criterion(config.pruning)  # an unknown criterion fails here, before anything is loaded
    plan_config = copy.deepcopy(config)
    side = 2 * total_stride(config.model)
    plan_config.data.patch_size = [min(side, size) for size in config.data.patch_size]
    return config, plan_config


def _check_reachable(job: Job) -> None:
    """Refuse a MAC target that even every block at the largest ratio does not reach."""
    largest = max(job.ratios)
    reachable = job.macs_fraction({"default": 0.0, **dict.fromkeys(job.blocks, largest)})
    if reachable > job.target:
        raise ConfigError(
            f"MAC target {job.target:g} cannot be reached: every block at ratio {largest:g} keeps "
            f"{reachable:.3f} of the MACs; ask for {math.ceil(reachable * 1000) / 1000:g} or more, "
            "or try a larger ratio"
        )


def _prepare_job(
    model_path: Path,
    ratios: Sequence[float],
    importance: str | None,
    volumes: int,
    target_macs: float,
    checkpoint: str,
    out: Path | None,
    overrides: list[str] | None,
    replay: bool,
) -> Job:
    """Check every input and open the model and validation volumes; nothing is written.

    The arguments are those of :func:`run_sensitivity`, in its order; training batches are read on
    first use.

    Raises:
        ConfigError: bad ratios, volumes, target, overrides or output folder; PruningError: an unknown
            criterion (the message lists the known ones); CheckpointError, DataError: unreadable inputs.
    """
    from acdc_prune.engine.cost import count_parameters
    from acdc_prune.experiments.planning import example_input

    ratios = check_ratio_list(ratios)
    if isinstance(volumes, bool) or not isinstance(volumes, int) or volumes < 1:
        raise ConfigError(f"volumes must be a whole number of at least 1, got {volumes!r}")
    if not 0.0 < target_macs <= 1.0:
        raise ConfigError(
            f"MAC target {target_macs} is not in (0, 1]: it is the fraction of the MACs kept "
            "(0.25 = 4x fewer)"
        )
    source = Checkpoint.open(model_path, checkpoint)
    config, plan_config = _job_config(source, overrides, importance)
    model = source.build_model().eval()
    shape = tuple(example_input(config).shape)
    base = Path(model_path) if Path(model_path).is_dir() else Path(config.logging.runs_dir)
    blocks = prunable_blocks(model, example_input(plan_config))
    job = Job(
        source=source,
        config=config,
        plan_config=plan_config,
        model=model,
        blocks=blocks,
        ratios=ratios,
        shape=shape,
        macs=fast_macs(model, shape),
        params=count_parameters(model),
        target=float(target_macs),
        out_dir=Path(out) if out is not None else unused_path(base / "sensitivity"),
        # Every row prunes one block, so the blocks before it (never the last) can answer from memory.
        scorer=Scorer(config, volumes, TrainingSlices(config), reuse_blocks=blocks[:-1] if replay else ()),
    )
    _check_reachable(job)
    return job


def _previous(job: Job) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows and meta of an earlier (interrupted or finished) analysis in the output folder, if any.

    Raises:
        ConfigError: the folder holds something else, or an analysis made with other settings.
    """
    if not job.out_dir.exists() or not any(job.out_dir.iterdir()):
        return [], None
    meta_path, csv_path = job.out_dir / "meta.json", job.out_dir / "sensitivity.csv"
    if not meta_path.is_file():
        raise ConfigError(
            f"{job.out_dir} exists and is not a sensitivity folder; choose another output folder"
        )
    meta = read_json(meta_path, "delete the folder and run again")
    settings = job.settings()
    differ = sorted(key for key in settings if meta.get("settings", {}).get(key) != settings[key])
    if differ:
        raise ConfigError(
            f"{job.out_dir} holds an analysis with other settings ({', '.join(differ)}); "
            "choose another output folder"
        )
    rows = pd.read_csv(csv_path).to_dict("records") if csv_path.is_file() else []
    return rows, meta


def _measure(job: Job, block: str, ratio: float, reference: float) -> dict[str, Any]:
    """One row: prune ``block`` by ``ratio`` only, recalibrate, score, and count what it saved."""
    from acdc_prune.engine.cost import count_parameters
    from acdc_prune.pruning import apply_plan
    from acdc_prune.pruning.summary import layer_widths

    start = time.perf_counter()
    plan = job.plan({"default": 0.0, block: ratio})
    widths = [row for row in layer_widths(job.model, plan) if row["block"] == block]
    pruned = apply_plan(job.model, plan)
    macs = fast_macs(pruned, job.shape)
    params = count_parameters(pruned)
    scores, _ = job.scorer(pruned)
    dice = math.nan if scores["dice_mean"] is None else scores["dice_mean"]
    return {
        "block": block,
        "ratio": ratio,
        "channels_kept": sum(row["after"] for row in widths),
        "channels_total": sum(row["before"] for row in widths),
        "params": params,
        "macs": macs,
        "macs_saved": 1.0 - macs / job.macs,
        "dice": dice,
        "dice_loss": reference - dice,
        **{
            key: math.nan if scores[key] is None else scores[key]
            for key in ("dice_RV", "dice_MYO", "dice_LV")
        },
        "seconds": time.perf_counter() - start,
    }


def _fill(job: Job, rows: list[dict[str, Any]], reference: float, reporter: Reporter) -> list[dict[str, Any]]:
    """Compute the missing rows, rewriting ``sensitivity.csv`` after each (an interruption loses one row)."""
    done = {row_key(row["block"], row["ratio"]) for row in rows}
    todo = [(b, r) for b in job.blocks for r in job.ratios if row_key(b, r) not in done]
    total = len(job.blocks) * len(job.ratios)
    if total > len(todo):
        reporter.note(f"resuming {job.out_dir}: {total - len(todo)} of {total} rows already computed")
    if todo and job.scorer.reuse_blocks:
        job.scorer.reference(job.model)  # recorded once, also when resuming
    reporter.start("sensitivity", total, total - len(todo), "block x ratio")
    for count, (block, ratio) in enumerate(todo, start=total - len(todo) + 1):
        row = _measure(job, block, ratio, reference)
        rows = [*rows, row]
        atomic_write_text(
            job.out_dir / "sensitivity.csv", pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False)
        )
        reporter.update("sensitivity", count, f"{block} at {ratio:g}: Dice loss {row['dice_loss']:+.4f}")
    reporter.finish("sensitivity")
    return rows


@dataclass
class SensitivityResult:
    """What :func:`run_sensitivity` wrote and found.

    Attributes:
        out_dir: the output folder.
        table: one row per block and ratio asked for (:data:`COLUMNS`), blocks in execution order.
        meta: the content of ``meta.json`` (reference Dice, volumes, settings, target, times).
        ratios: the ratios of ``ratios.yaml``.
    """

    out_dir: Path
    table: pd.DataFrame
    meta: dict[str, Any]
    ratios: dict[str, float]


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _finish(job: Job, rows: list[dict[str, Any]], meta: dict[str, Any], started: float) -> SensitivityResult:
    """Choose the ratios for the target, draw the plots, and complete ``meta.json``."""
    asked = {row_key(b, r) for b in job.blocks for r in job.ratios}
    table = pd.DataFrame(
        [row for row in rows if row_key(row["block"], row["ratio"]) in asked], columns=COLUMNS
    )
    order = {block: index for index, block in enumerate(job.blocks)}
    table = table.sort_values(["block", "ratio"], key=lambda c: c.map(order) if c.name == "block" else c)
    table = table.reset_index(drop=True)
    ratios, predicted, real = greedy_ratios(table, job.target, job.macs_fraction)
    out = job.out_dir
    atomic_write_text(out / "ratios.yaml", ratios_text(ratios, job.target, predicted, real))
    reference = meta["reference"]["dice_mean"]
    name = f"{job.source.path.parent.name}/{job.source.path.name}"
    title = f"{name}: Dice {reference:.4f} unpruned, {len(job.scorer.records)} validation volumes"
    plot_losses(table, "ratio", "share of the block's filters removed", out / "sensitivity_ratio.png", title)
    plot_losses(table, "macs_saved", "MACs saved (% of the network)", out / "sensitivity_macs.png", title)
    meta = {
        **meta,
        "ratios": job.ratios,
        "blocks": job.blocks,
        "batchnorm_recalibrated": job.scorer.num_batches > 0 and has_batchnorm(job.model),
        "params": job.params,
        "macs": {"before": job.macs, "input_shape": list(job.shape)},
        "target": {
            "macs_fraction": job.target,
            "predicted_macs_fraction": predicted,
            "real_macs_fraction": real,
            "predicted_dice_loss": predicted_loss(table, ratios),
            "ratios": ratios,
            "method": GREEDY,
        },
        "row_seconds": float(table["seconds"].sum()),
        "seconds": time.perf_counter() - started,
        "finished": _now(),
        "complete": True,
    }
    atomic_write_json(out / "meta.json", meta)
    return SensitivityResult(out, table, meta, ratios)


def _start(job: Job, reporter: Reporter) -> dict[str, Any]:
    """Score the unpruned network (as trained, and recalibrated), then create the folder and ``meta.json``."""
    reporter.note(f"scoring the unpruned network on {len(job.scorer.records)} validation volumes")
    scores, _ = job.scorer(copy.deepcopy(job.model), recalibrate=False)
    if scores["dice_mean"] is None:
        raise ConfigError(
            "the chosen validation volumes have no labelled structure to score; use more --volumes"
        )
    meta = {
        "settings": job.settings(),
        "proxy": PROXY,
        "reference": scores,
        "started": _now(),
        "complete": False,
    }
    if job.scorer.num_batches > 0 and has_batchnorm(job.model):
        # What recalibration alone does to the unpruned network: a part of every row's loss (or gain).
        meta["reference_recalibrated"] = job.scorer.reference(job.model)[0]
    job.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job.out_dir / "meta.json", meta)
    return meta


def run_sensitivity(
    model_path: Path,
    ratios: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
    *,
    importance: str | None = None,
    volumes: int = 8,
    target_macs: float = 0.25,
    checkpoint: str = "best",
    out: Path | None = None,
    overrides: list[str] | None = None,
    replay: bool = True,
    reporter: Reporter | None = None,
) -> SensitivityResult:
    """Prune each block alone at each ratio, recalibrate BatchNorm, score, and pick ratios for a MAC target.

    A row prunes one block (``{"default": 0, block: ratio}``) with the run's criterion, re-estimates
    the BatchNorm statistics on ``pruning.calibration_batches`` training batches (0: none), and
    scores the network on :data:`PROXY`; its Dice loss is the unpruned network's score (as trained,
    not recalibrated) on the same volumes minus its own. Files, in ``out``: ``sensitivity.csv``
    (:data:`COLUMNS`), ``meta.json``, ``sensitivity_ratio.png``, ``sensitivity_macs.png`` and
    ``ratios.yaml`` (:func:`greedy_ratios`). Every input is checked before anything is written.
    The CSV is rewritten after each row; running again with the same ``out`` (and settings) skips
    the rows it holds and finishes.

    Args:
        model_path: a run folder or a checkpoint file (a pruned one too: its own blocks are analysed).
        ratios: shares of a block's filters removed, each in (0, 1).
        importance: criterion (default: the run's ``pruning.importance``).
        volumes: how many validation volumes are scored (spread evenly; all when fewer).
        target_macs: fraction of the original MACs that ``ratios.yaml`` keeps, in (0, 1].
        checkpoint: which checkpoint of a run folder (``best``, ``last``, ``epoch5``...).
        out: output folder (default ``<run>/sensitivity/<timestamp>``, or
            ``<logging.runs_dir>/sensitivity/<timestamp>`` for a file).
        overrides: dotted overrides of the run's config (``data.root=...``,
            ``pruning.calibration_batches=4``).
        replay: record the unpruned network's block outputs on the recalibration batches and the
            scored volumes (in memory), and run each row only from its pruned block on
            (:class:`~acdc_prune.experiments.reuse.BlockOutputs`); the table is the same either way.
        reporter: receives the progress over blocks x ratios.

    Raises:
        ConfigError: bad ratios, volumes or target (a target the ratios cannot reach says what can be),
            or an output folder holding something else; PruningError: an unknown criterion.
    """
    started = time.perf_counter()
    reporter = reporter or LogReporter()
    job = _prepare_job(
        model_path, ratios, importance, volumes, target_macs, checkpoint, out, overrides, replay
    )
    rows, meta = _previous(job)
    if meta is None:
        meta = _start(job, reporter)
    rows = _fill(job, rows, meta["reference"]["dice_mean"], reporter)
    return _finish(job, rows, meta, started)
