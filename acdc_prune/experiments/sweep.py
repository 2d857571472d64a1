"""Sweeps: baselines, then every setting x mode x seed arm on an executor, resumable, with a report."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from acdc_prune.config import Config
from acdc_prune.errors import AcdcPruneError
from acdc_prune.experiments import report
from acdc_prune.experiments.executors import ExecutorOptions, Job, JobOutcome
from acdc_prune.experiments.sweep_config import Setting, SweepConfig, load_sweep, sweep_settings
from acdc_prune.experiments.sweep_eval import evaluate_sweep
from acdc_prune.experiments.sweep_jobs import (
    Execution,
    Session,
    SweepError,
    arm_job,
    ensure_baseline,
    evaluation_job,
    folder_lock,
    open_session,
)
from acdc_prune.experiments.sweep_plan import MANIFEST, Arm, Baseline, SweepPlan, plan_sweep, report_run
from acdc_prune.io import atomic_write_json, read_json, remove_leftovers

if TYPE_CHECKING:
    from typing_extensions import Unpack

# The sweep file, its plan, the shared job machinery and re-evaluation live in the sweep_* modules; the
# public names a caller needs are importable from here.
__all__ = [
    "MANIFEST",
    "Arm",
    "Baseline",
    "Setting",
    "SweepConfig",
    "SweepError",
    "SweepPlan",
    "evaluate_sweep",
    "executor_options",
    "folder_lock",
    "load_sweep",
    "plan_sweep",
    "run_sweep",
    "sweep_settings",
]


def _train_baselines(session: Session, plan: SweepPlan) -> None:
    """Train (or resume) the baselines the sweep trains itself, concurrently where the executor can;
    a failure stops the sweep."""
    jobs = []
    for baseline in plan.baselines.values():
        if baseline.config is None:  # an existing run
            continue
        config = copy.deepcopy(baseline.config)
        if session.runner.threads is not None:
            config.training.num_threads = session.runner.threads
        kwargs = {"config": config, "run_dir": baseline.run_dir}
        jobs.append((Job(baseline.name, ensure_baseline, kwargs), baseline.eval_dir / "summary.json"))
    for outcome in session.run(jobs).values():
        if outcome.ok:
            continue
        if isinstance(outcome.exception, AcdcPruneError):
            raise outcome.exception
        raise SweepError(f"baseline {outcome.name} failed twice ({outcome.error}); fix it and run again")


def _evaluate_baselines_and_run_arms(session: Session, plan: SweepPlan) -> dict[str, str]:
    """Evaluate the baselines and run every unfinished arm, all as one batch of jobs; the failed arms' errors.

    Raises:
        SweepError: a baseline's evaluation failed twice (the arms that finished are kept).
    """
    threads = session.runner.threads
    threads_override = [f"training.num_threads={threads}"] if threads is not None else []
    jobs = []
    for baseline in plan.baselines.values():
        kwargs = {"model_dir": baseline.run_dir, "out_dir": baseline.eval_dir, "data": None}
        job = Job(baseline.eval_dir.name, evaluation_job, {**kwargs, "overrides": baseline.overrides})
        jobs.append((job, baseline.eval_dir / "summary.json"))
    for arm in plan.arms:
        kwargs = {
            "baseline_dir": arm.baseline.run_dir,
            "arm_dir": arm.dir,
            "prune_kwargs": arm.prune_kwargs,
            "overrides": [*arm.overrides, *threads_override],
        }
        jobs.append((Job(arm.name, arm_job, kwargs), arm.dir / "result.json"))
    outcomes = session.run(jobs)
    _write_timings(plan, session.runner.name, outcomes)
    failed = {name: outcome.error for name, outcome in outcomes.items() if not outcome.ok}
    for baseline in plan.baselines.values():
        if baseline.eval_dir.name in failed:
            raise SweepError(
                f"the evaluation of {baseline.name} failed twice ({failed[baseline.eval_dir.name]}); the "
                "finished arms are kept: fix it and run the sweep again"
            )
    return failed


def _write_timings(plan: SweepPlan, executor: str, outcomes: dict[str, JobOutcome]) -> None:
    """``timing.json`` in the folder of every arm that finished in this run."""
    for arm in plan.arms:
        outcome = outcomes.get(arm.name)
        if outcome is None or not outcome.ok:
            continue
        timing = {
            "executor": executor,
            "host": outcome.host,
            "start": outcome.start,
            "end": outcome.end,
            "seconds": outcome.end - outcome.start,
            "attempts": outcome.attempts,
        }
        atomic_write_json(arm.dir / "timing.json", timing)


def _gpus_wanted(sweep_gpus: float | None, config: Config) -> bool:
    """The sweep asks for GPUs: ``gpus_per_arm`` > 0 or a CUDA training device."""
    return (sweep_gpus or 0) > 0 or config.training.device.startswith("cuda")


def executor_options(sweep: SweepConfig, base: Config, ray_address: str | None = None) -> ExecutorOptions:
    """The executor resources of a sweep: a CPU-only config reserves no GPUs."""
    gpus = sweep.gpus_per_arm
    if gpus is None and base.training.device == "cpu":
        gpus = 0.0
    return ExecutorOptions(sweep.threads_per_arm, gpus, ray_address)


def run_sweep(
    sweep: SweepConfig, base_dir: Path, *, data: Path | None = None, **execution: Unpack[Execution]
) -> Path:
    """Run (or resume) a sweep and write its report; returns the report folder.

    Layout: ``<runs_dir>/<experiment>/<name>/`` with ``baseline/`` (a training run; ``baseline-s<seed>/``
    with ``seed_baseline``), ``baseline_eval/``, ``arms/<setting>-<mode>[-s<seed>]/`` (pruned child
    folders, see ``prune_run``, plus ``timing.json``) and ``report/`` (see
    :func:`acdc_prune.experiments.report.write_report`, plus ``sweep.json``). The baselines the sweep
    trains run first; then their evaluations and every arm, on the executor (``local``: one after the
    other in this process; ``ray``: Ray tasks, in parallel). An arm folder exists only once it is
    complete, so re-running the sweep skips finished arms and redoes the rest. A failed arm is retried
    once, then reported (``failed`` event, and in ``sweep.json``); the others go on. ``.sweep.lock``
    keeps a second sweep out of the folder.

    Args:
        sweep: the validated sweep.
        base_dir: folder that ``sweep.config`` is relative to.
        data: data folder overriding the base config's ``data.root``.
        execution: ``executor``, ``ray_address``, ``reporter``, ``on_event``, ``console`` (see
            :class:`~acdc_prune.experiments.sweep_jobs.Execution`).

    Raises:
        ConfigError: a bad base config or sweep; ExecutorError: Ray missing or unreachable, GPUs asked
            for where there are none, a sweep folder the workers cannot see; SweepError: another sweep
            runs in the folder, or a baseline failed.
    """
    plan = plan_sweep(sweep, base_dir, data)
    resources = executor_options(sweep, plan.base)
    gpus_wanted = _gpus_wanted(resources.gpus_per_job, plan.base)
    with open_session(plan.root, resources, gpus_wanted, **execution) as session:
        # Results of arms finished earlier are read first: a damaged one stops the sweep before new work.
        for arm in plan.arms:
            if (arm.dir / "result.json").is_file():
                _arm_result(arm.dir)
        _train_baselines(session, plan)
        try:
            failed = _evaluate_baselines_and_run_arms(session, plan)
        finally:
            remove_leftovers(plan.root / "arms")  # staging folders of attempts that Ray had to kill
        return _write_sweep_report(plan, _manifest(plan, session, gpus_wanted, failed))


def _arm_result(arm_dir: Path) -> dict[str, Any]:
    """The ``result.json`` of a finished arm (see ``prune_run``)."""
    return read_json(arm_dir / "result.json", f"delete {arm_dir} and run the sweep again")


def _report_runs(plan: SweepPlan) -> list[report.ReportRun]:
    """The baselines and every finished arm, as the report reads them."""
    runs = []
    for baseline in plan.baselines.values():
        summary = read_json(baseline.eval_dir / "summary.json", f"delete {baseline.eval_dir} and run again")
        runs.append(report_run(baseline.entry(), summary, None, baseline.eval_dir / "per_volume.csv"))
    for arm in plan.arms:
        if not (arm.dir / "result.json").is_file():
            continue
        result = _arm_result(arm.dir)
        retrained = arm.dir / "eval_after"
        eval_dir = retrained if retrained.is_dir() else arm.dir / "eval_before"
        runs.append(report_run(arm.entry(), result["after"], result["before"], eval_dir / "per_volume.csv"))
    return runs


def _curves(plan: SweepPlan) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Training curves (``metrics.csv``) of the baselines and of the arms of the first seed, with modes."""
    first_seed = plan.arms[0].seed if plan.arms else None
    folders = [(b.name, "baseline", b.run_dir) for b in plan.baselines.values()]
    folders += [(a.name, a.mode, a.dir) for a in plan.arms if a.seed == first_seed]
    curves, modes = {}, {}
    for name, mode, folder in folders:
        if (folder / "metrics.csv").is_file():
            curves[name] = pd.read_csv(folder / "metrics.csv")
            modes[name] = mode
    return curves, modes


def _manifest(plan: SweepPlan, session: Session, gpus_wanted: bool, failed: dict[str, str]) -> dict[str, Any]:
    """``sweep.json``: where the sweep ran, the models that ``sweep-eval`` evaluates, the failed arms."""
    options = session.runner.options
    return {
        "executor": session.runner.name,
        "threads_per_arm": options.threads_per_job,
        "gpus_per_arm": options.gpus_per_job,
        "gpus_wanted": gpus_wanted,
        "models": [b.entry() for b in plan.baselines.values()] + [a.entry() for a in plan.arms],
        "failed": failed,
    }


def _write_sweep_report(plan: SweepPlan, manifest: dict[str, Any]) -> Path:
    """Write ``report/`` (tables, plots, ``sweep.json``) from the finished runs; returns its path."""
    report_dir = plan.root / "report"
    curves, modes = _curves(plan)
    report.write_report(_report_runs(plan), report_dir, curves, modes)
    atomic_write_json(report_dir / MANIFEST, manifest)
    return report_dir
