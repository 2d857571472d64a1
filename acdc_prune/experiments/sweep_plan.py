"""Sweep plans: the baselines and every setting x mode x seed arm of a sweep file, with their folders."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acdc_prune.config import Config, PruningConfig, load_config
from acdc_prune.errors import CheckpointError, ConfigError
from acdc_prune.experiments import report
from acdc_prune.experiments.sweep_config import Setting, SweepConfig, sweep_settings

MANIFEST = "sweep.json"
"""The sweep's record in ``report/``: where it ran, every model (:meth:`Baseline.entry`,
:meth:`Arm.entry`) and the failed arms; ``sweep-eval`` reads it."""


@dataclass(frozen=True)
class Baseline:
    """A baseline of the sweep: the run that arms prune, and its evaluation on its validation patients.

    Attributes:
        name: ``baseline`` or ``baseline-s<seed>``.
        seed: its training seed when the sweep trains one baseline per seed, else ``None``.
        run_dir: the training run folder.
        eval_dir: its evaluation folder.
        config: the config to train it with; ``None`` for an existing run given in the sweep file.
        overrides: dotted overrides of its stored config, for its own jobs and for its arms: the
            sweep's overrides, then absolute folders (workers may start in another folder).
        pruning: the pruning settings its arms start from (criterion and scope a grid leaves out).
    """

    name: str
    seed: int | None
    run_dir: Path
    eval_dir: Path
    config: Config | None
    overrides: list[str]
    pruning: PruningConfig

    def entry(self) -> dict[str, Any]:
        """Its model in ``sweep.json`` (see :func:`report_run`)."""
        labels = {"setting": "-", **dict.fromkeys(report.PRUNING_COLUMNS)}
        return _entry(self.name, "baseline", "baseline", self.seed, labels, self.run_dir, self.overrides)


@dataclass(frozen=True)
class Arm:
    """One arm: a setting pruned from a baseline under one mode, retrained with one seed.

    Attributes:
        name: its folder under ``arms/``: ``<setting>-<mode>`` or ``<setting>-<mode>-s<seed>``.
        group: ``<setting>-<mode>``: the arm over its seeds, as the report aggregates it.
        setting: what it prunes (criterion, scope, ratios or target).
        mode: its re-initialisation (or ``scratch``).
        seed: its training seed (``None`` without ``seeds``).
        baseline: the baseline it prunes.
        prune_kwargs: keyword arguments of ``prune_run``.
        dir: its folder.
    """

    name: str
    group: str
    setting: Setting
    mode: str
    seed: int | None
    baseline: Baseline
    prune_kwargs: dict[str, Any]
    dir: Path

    @property
    def overrides(self) -> list[str]:
        """Overrides of the baseline's config for this arm (the baseline's, the setting's, then the seed)."""
        seed = [f"training.seed={self.seed}"] if self.seed is not None else []
        return [*self.baseline.overrides, *self.setting.overrides, *seed]

    def entry(self) -> dict[str, Any]:
        """Its model in ``sweep.json`` (see :func:`report_run`)."""
        labels = self.setting.labels()
        return _entry(self.name, self.group, self.mode, self.seed, labels, self.dir, self.overrides)


def _entry(
    name: str,
    group: str,
    mode: str,
    seed: int | None,
    labels: dict[str, Any],
    folder: Path,
    overrides: list[str],
) -> dict[str, Any]:
    """One model of ``sweep.json``: names, the setting's labels, folder and overrides."""
    return {
        "name": name,
        "group": group,
        "mode": mode,
        "seed": seed,
        **labels,
        "dir": str(folder),
        "overrides": overrides,
    }


def report_run(
    model: dict[str, Any], after: dict[str, Any], before: dict[str, Any] | None, per_volume: Path
) -> report.ReportRun:
    """A model of ``sweep.json`` (:meth:`Baseline.entry`, :meth:`Arm.entry`) as the report reads it.

    Args:
        model: the entry; one written before sweeps recorded criteria has no labels (empty columns).
        after: its evaluation summary (after retraining for an arm).
        before: an arm's summary before retraining; ``None`` for a baseline or when not measured.
        per_volume: ``per_volume.csv`` of the evaluation ``after`` comes from.
    """
    labels = {column: model.get(column) for column in report.PRUNING_COLUMNS}
    return report.ReportRun(
        arm=model["name"],
        group=model["group"],
        setting=model["setting"],
        mode=model["mode"],
        seed=model["seed"],
        after=after,
        before=before,
        per_volume=per_volume,
        **labels,
    )


@dataclass
class SweepPlan:
    """Where a sweep writes and what it runs (see :func:`plan_sweep`)."""

    root: Path
    base: Config
    baselines: dict[int | None, Baseline]
    arms: list[Arm] = field(default_factory=list)


def absolute_paths(config: Config) -> list[str]:
    """Overrides that make the folders of ``config`` absolute (Ray workers may start in another folder)."""
    folders = {
        "logging.runs_dir": config.logging.runs_dir,
        "data.root": config.data.root,
        "data.cache_dir": config.data.cache_dir,
    }
    return [
        f"{key}={json.dumps(str(Path(value).expanduser().resolve()))}"
        for key, value in folders.items()
        if value is not None
    ]


def _baselines(
    sweep: SweepConfig, base: Config, root: Path, overrides: list[str]
) -> dict[int | None, Baseline]:
    """The sweep's baselines by seed: an existing run, one trained run, or one per seed.

    The sweep's ``overrides`` (and ``--data``) hold for every job: they come first in each baseline's
    overrides, which its arms inherit, followed by the absolute folders.
    """
    if sweep.baseline:
        run_dir = Path(sweep.baseline).expanduser().resolve()
        if not (run_dir / "best.pt").is_file():
            raise CheckpointError(f"baseline run {run_dir} has no best.pt; train it or fix the baseline path")
        stored = (
            load_config(run_dir / "config.yaml", overrides) if (run_dir / "config.yaml").is_file() else base
        )
        _check_postprocessing_rule(run_dir, stored)
        paths = [*overrides, *absolute_paths(stored)]
        baseline = Baseline("baseline", None, run_dir, root / "baseline_eval", None, paths, stored.pruning)
        return {None: baseline}
    paths = [*overrides, *absolute_paths(base)]
    if not sweep.seed_baseline:
        run_dir, eval_dir = root / "baseline", root / "baseline_eval"
        return {None: Baseline("baseline", None, run_dir, eval_dir, base, paths, base.pruning)}
    baselines = {}
    for seed in sweep.seeds:
        config = copy.deepcopy(base)
        config.training.seed = seed
        run_dir, eval_dir = root / f"baseline-s{seed}", root / f"baseline_eval-s{seed}"
        baselines[seed] = Baseline(f"baseline-s{seed}", seed, run_dir, eval_dir, config, paths, base.pruning)
    return baselines


def _check_postprocessing_rule(run_dir: Path, config: Config) -> None:
    """Refuse ``evaluation.largest_component: auto`` for a baseline run that records no choice: it would
    be scored raw and its retrained arms by their own choices, two rules in one comparison.

    Raises:
        ConfigError: ``auto`` with a baseline whose best.pt predates the recorded choice.
    """
    from acdc_prune.engine.checkpoints import Checkpoint

    if config.evaluation.largest_component != "auto":
        return
    if Checkpoint.open(run_dir).state.get("postprocessing") is None:
        raise ConfigError(
            f"baseline run {run_dir} records no post-processing choice, so 'auto' would score it raw and "
            "its arms by their own; add evaluation.largest_component=true (or false) to the sweep's overrides"
        )


def _arm_modes(sweep: SweepConfig, base: Config) -> list[tuple[str, dict[str, Any]]]:
    """``(mode, prune_run keyword arguments except ratios)`` of every mode, the scratch control included."""
    modes = [
        (
            mode,
            {
                "reinit": mode,
                "retrain_epochs": sweep.retrain_epochs,
                "retrain_lr": sweep.retrain_lr,
                "rewind_to": sweep.rewind_to if mode == "rewind" else None,
            },
        )
        for mode in sweep.modes
    ]
    if sweep.scratch:
        scratch = {"reinit": "random", "retrain_epochs": base.training.epochs, "retrain_lr": base.training.lr}
        modes.append(("scratch", {**scratch, "rewind_to": None}))
    return modes


def plan_sweep(sweep: SweepConfig, base_dir: Path, data: Path | None = None) -> SweepPlan:
    """Resolve the base config, the sweep folder, the baselines and every arm; nothing is written.

    Arms are ordered setting by setting (as :func:`~acdc_prune.experiments.sweep_config.sweep_settings`
    lists them), then mode, then seed.

    Raises:
        ConfigError: a bad base config or sweep (an unknown criterion of the base config too), or
            ``evaluation.largest_component: auto`` with a baseline run that records no choice;
            CheckpointError: a given baseline run without best.pt.
    """
    overrides = [*sweep.overrides, *([f"data.root={json.dumps(str(data))}"] if data is not None else [])]
    config_path = base_dir / sweep.config if sweep.config else None
    base = load_config(config_path, overrides)
    base = load_config(config_path, [*overrides, *absolute_paths(base)])
    root = Path(base.logging.runs_dir) / base.logging.experiment / sweep.name
    plan = SweepPlan(root, base, _baselines(sweep, base, root, overrides))
    seeds: list[int | None] = list(sweep.seeds) or [None]
    defaults = next(iter(plan.baselines.values())).pruning
    for setting in sweep_settings(sweep, defaults):
        for mode, kwargs in _arm_modes(sweep, base):
            for seed in seeds:
                group = f"{setting.name}-{mode}"
                name = group if seed is None else f"{group}-s{seed}"
                baseline = plan.baselines.get(seed, plan.baselines.get(None))
                arm_kwargs = {**kwargs, "ratios": setting.ratios}
                plan.arms.append(
                    Arm(name, group, setting, mode, seed, baseline, arm_kwargs, root / "arms" / name)
                )
    return plan
