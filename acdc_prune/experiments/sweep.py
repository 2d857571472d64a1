"""Sweeps: baselines, then every ratios setting x mode x seed on an executor, resumable, with a report."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from acdc_prune.config import Config, from_mapping, load_config, read_yaml, spec, validate_ratios
from acdc_prune.engine.progress import LogReporter, Reporter
from acdc_prune.errors import AcdcPruneError, CheckpointError, ConfigError
from acdc_prune.experiments import report
from acdc_prune.experiments.executors import (
    EventCallback,
    Executor,
    ExecutorOptions,
    Job,
    JobEvent,
    JobOutcome,
    make_executor,
)
from acdc_prune.experiments.prune import REINIT_MODES
from acdc_prune.io import atomic_write_json, check_name, read_json, remove_leftovers

LOCK_NAME = ".sweep.lock"
MANIFEST = "sweep.json"


class SweepError(AcdcPruneError):
    """A sweep cannot go on: another sweep holds its folder, or a baseline failed."""


@dataclass
class SweepConfig:
    """What a sweep runs; read from YAML by :func:`load_sweep`."""

    name: str = spec("sweep", doc="sweep folder: <runs_dir>/<experiment>/<name>")
    config: str | None = spec(None, doc="base experiment config, relative to the sweep file; null = defaults")
    overrides: list[str] = spec(factory=list, doc="dotted overrides of the base config")
    baseline: str | None = spec(None, doc="an existing trained run folder to prune instead of training one")
    ratios: dict[str, dict[str, float]] = spec(
        factory=lambda: {"half": {"default": 0.5}}, ge=0.0, lt=1.0, doc="named ratios settings"
    )
    uniform: list[float] = spec(factory=list, ge=0.0, lt=1.0, doc="uniform ratios, added as 'uniform-R'")
    modes: list[str] = spec(
        factory=lambda: list(REINIT_MODES), choices=REINIT_MODES, doc="re-initialisations"
    )
    scratch: bool = spec(False, doc="control arm: the pruned widths trained from scratch for the full budget")
    retrain_epochs: int | None = spec(None, ge=0, doc="retraining epochs; null = pruning.retrain_epochs")
    retrain_lr: float | None = spec(None, gt=0.0, doc="retraining peak learning rate; null = config's")
    rewind_to: str | None = spec(None, doc="rewind checkpoint; null = pruning.rewind_to")
    seeds: list[int] = spec(
        factory=list, ge=0, doc="repeat every arm with each training seed; [] = once, with the config's seed"
    )
    seed_baseline: bool = spec(False, doc="with seeds: one baseline per seed (else one baseline for all)")
    threads_per_arm: int = spec(1, ge=1, doc="CPU threads (and Ray CPUs) of each arm on the ray executor")
    gpus_per_arm: float | None = spec(
        None, ge=0.0, doc="GPUs of each arm on the ray executor; null = 1 where the cluster has GPUs"
    )


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """Read and validate a sweep YAML file; returns it and the folder its relative paths start from.

    Raises:
        ConfigError: unknown keys (with the closest valid key), bad values, unknown modes, no arms.
    """
    path = Path(path)
    raw = read_yaml(path)
    sweep = from_mapping(SweepConfig, raw, "")
    sweep_settings(sweep)
    return sweep, path.parent


def sweep_settings(sweep: SweepConfig) -> dict[str, dict[str, float]]:
    """The named and uniform ratios settings of ``sweep``, checked (names, values, seeds, some arm)."""
    check_name(sweep.name, "sweep name")
    settings = {name: validate_ratios(ratios, f"ratios.{name}") for name, ratios in sweep.ratios.items()}
    for ratio in sweep.uniform:
        settings[f"uniform-{ratio:g}"] = {"default": ratio}
    for name in settings:
        check_name(name, "ratios setting name")
    if not settings or not (sweep.modes or sweep.scratch):
        raise ConfigError("the sweep has no arms: give at least one ratios setting and one mode")
    if len(set(sweep.seeds)) != len(sweep.seeds):
        raise ConfigError(f"seeds {sweep.seeds} repeat a seed; list each seed once")
    if sweep.seed_baseline and (sweep.baseline or not sweep.seeds):
        raise ConfigError("seed_baseline trains one baseline per seed: give seeds and no baseline run")
    return settings


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
    """

    name: str
    seed: int | None
    run_dir: Path
    eval_dir: Path
    config: Config | None
    overrides: list[str]


@dataclass(frozen=True)
class Arm:
    """One arm: a ratios setting pruned from a baseline under one mode, retrained with one seed.

    Attributes:
        name: its folder under ``arms/``: ``<setting>-<mode>`` or ``<setting>-<mode>-s<seed>``.
        group: ``<setting>-<mode>``: the arm over its seeds, as the report aggregates it.
        setting, mode, seed: what it varies (``seed`` is ``None`` without ``seeds``).
        baseline: the baseline it prunes.
        prune_kwargs: keyword arguments of ``prune_run``.
        dir: its folder.
    """

    name: str
    group: str
    setting: str
    mode: str
    seed: int | None
    baseline: Baseline
    prune_kwargs: dict[str, Any]
    dir: Path

    @property
    def overrides(self) -> list[str]:
        """Overrides of the baseline's config for this arm (the baseline's, then the seed)."""
        seed = [f"training.seed={self.seed}"] if self.seed is not None else []
        return [*self.baseline.overrides, *seed]


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
        paths = [*overrides, *absolute_paths(stored)]
        return {None: Baseline("baseline", None, run_dir, root / "baseline_eval", None, paths)}
    paths = [*overrides, *absolute_paths(base)]
    if not sweep.seed_baseline:
        return {None: Baseline("baseline", None, root / "baseline", root / "baseline_eval", base, paths)}
    baselines = {}
    for seed in sweep.seeds:
        config = copy.deepcopy(base)
        config.training.seed = seed
        run_dir, eval_dir = root / f"baseline-s{seed}", root / f"baseline_eval-s{seed}"
        baselines[seed] = Baseline(f"baseline-s{seed}", seed, run_dir, eval_dir, config, paths)
    return baselines


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

    Raises:
        ConfigError: a bad base config or sweep; CheckpointError: a given baseline run without best.pt.
    """
    overrides = [*sweep.overrides, *([f"data.root={json.dumps(str(data))}"] if data is not None else [])]
    config_path = base_dir / sweep.config if sweep.config else None
    base = load_config(config_path, overrides)
    base = load_config(config_path, [*overrides, *absolute_paths(base)])
    root = Path(base.logging.runs_dir) / base.logging.experiment / sweep.name
    plan = SweepPlan(root, base, _baselines(sweep, base, root, overrides))
    seeds: list[int | None] = list(sweep.seeds) or [None]
    for setting, ratios in sweep_settings(sweep).items():
        for mode, kwargs in _arm_modes(sweep, base):
            for seed in seeds:
                group = f"{setting}-{mode}"
                name = group if seed is None else f"{group}-s{seed}"
                baseline = plan.baselines.get(seed, plan.baselines.get(None))
                arm_kwargs = {**kwargs, "ratios": ratios}
                plan.arms.append(
                    Arm(name, group, setting, mode, seed, baseline, arm_kwargs, root / "arms" / name)
                )
    return plan


def _trained_epochs(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir/last.pt`` (0 when there is none)."""
    from acdc_prune.engine.checkpoints import Checkpoint

    return Checkpoint.open(run_dir, "last").epoch if (run_dir / "last.pt").is_file() else 0


def ensure_baseline(config: Config, run_dir: Path, reporter: Reporter | None = None) -> None:
    """Train the baseline into ``run_dir``, resuming an interrupted one, skipping a finished one."""
    from acdc_prune.engine.trainer import train

    reporter = reporter or LogReporter()
    done = _trained_epochs(run_dir)
    if done >= config.training.epochs:
        reporter.note(f"baseline in {run_dir} already trained ({done} epochs): skipped")
    elif done > 0:
        reporter.note(f"resuming baseline in {run_dir} from epoch {done}")
        train(config, resume=run_dir, reporter=reporter)
    else:
        train(config, run_dir=run_dir, reporter=reporter)


def evaluate_once(
    model_dir: Path,
    out_dir: Path,
    *,
    data: Path | None = None,
    overrides: list[str] | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """The evaluation summary of the model in ``model_dir``, computed once into ``out_dir``.

    Args:
        model_dir: a run or pruned folder.
        out_dir: the evaluation folder; when it holds ``summary.json`` nothing is recomputed.
        data: a labelled data folder; ``None`` = the validation patients of the model's own split.
        overrides: dotted overrides of the model's stored config (absolute folders).
        reporter: receives the progress.
    """
    from acdc_prune.experiments.evaluation import evaluate_folder

    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        evaluate_folder(model_dir, data, out=out_dir, overrides=overrides, reporter=reporter)
    return read_json(summary_path, f"delete {out_dir} and run the sweep again")


def baseline_job(
    config: Config | None, run_dir: Path, eval_dir: Path, overrides: list[str], reporter: Reporter | None
) -> None:
    """Job: train (or resume) a baseline unless it is an existing run, then evaluate it once."""
    if config is not None:
        ensure_baseline(config, run_dir, reporter)
    evaluate_once(run_dir, eval_dir, overrides=overrides, reporter=reporter)


def arm_job(
    baseline_dir: Path,
    arm_dir: Path,
    prune_kwargs: dict[str, Any],
    overrides: list[str],
    reporter: Reporter | None,
) -> None:
    """Job: prune, retrain and evaluate one arm into ``arm_dir`` (which appears only once complete)."""
    from acdc_prune.experiments.prune import prune_run

    prune_run(baseline_dir, out_dir=arm_dir, overrides=overrides, reporter=reporter, **prune_kwargs)


def evaluation_job(
    model_dir: Path, out_dir: Path, data: Path, overrides: list[str], reporter: Reporter | None
) -> None:
    """Job: evaluate the model in ``model_dir`` on every labelled volume of ``data``, once."""
    evaluate_once(model_dir, out_dir, data=data, overrides=overrides, reporter=reporter)


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """Who holds ``lock`` (``pid``, ``host``); ``None`` when the lock vanished meanwhile."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        holder = None
    return holder if isinstance(holder, dict) else {"pid": "?", "host": "?"}


def _is_stale(holder: dict[str, Any], host: str) -> bool:
    """The lock's process ran on this machine and is gone."""
    pid = holder.get("pid")
    return holder.get("host") == host and isinstance(pid, int) and pid > 0 and not _process_alive(pid)


def _take_stale_lock(lock: Path, holder: dict[str, Any]) -> bool:
    """Remove ``lock`` if it still is ``holder``'s; False when another process took it meanwhile."""
    moved = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.replace(lock, moved)
    except FileNotFoundError:
        return True
    try:
        if json.loads(moved.read_text()) == holder:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(moved, lock)  # a fresh lock of another sweep: put it back
        return False
    finally:
        moved.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.sweep.lock`` (this process's PID and host) while the body runs.

    A lock left by a process that no longer runs on this machine is taken over.

    Raises:
        SweepError: another live process (or one on another machine) holds the lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    draft = folder / f".{LOCK_NAME}.{os.getpid()}.tmp"
    draft.write_text(json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(draft, lock)  # atomic and never half-written: the lock appears with its content
                break
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder is None:  # released meanwhile: try again
                    continue
                if not (_is_stale(holder, me["host"]) and _take_stale_lock(lock, holder)):
                    raise SweepError(
                        f"another sweep (PID {holder.get('pid')} on {holder.get('host')}) is running in "
                        f"{folder}; wait for it to end, or delete {lock} if that process is gone"
                    ) from None
        else:
            raise SweepError(f"could not take {lock}; delete it if no sweep runs in {folder}")
    finally:
        draft.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


class ConsoleNotes(LogReporter):
    """A reporter for library callers that pass a console: notes are printed as plain lines, no bars."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def note(self, text: str) -> None:
        """Print ``text``."""
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


class SweepProgress:
    """Shows job events on a reporter: bar ``jobs`` (finished of known jobs, with the running, waiting
    and failed counts) and one note per change of state other than queueing.

    Args:
        reporter: where the bar and notes go.
        on_event: also called with every event.
    """

    def __init__(self, reporter: Reporter, on_event: EventCallback | None = None) -> None:
        self.reporter, self.on_event = reporter, on_event
        self.states: dict[str, str] = {}

    def __call__(self, event: JobEvent) -> None:
        new = event.job not in self.states
        self.states[event.job] = event.state
        counts = Counter(self.states.values())
        finished = counts["done"] + counts["failed"] + counts["skipped"]
        if new:
            self.reporter.start("jobs", len(self.states), finished, description="sweep jobs")
        waiting = counts["queued"] + counts["retrying"]
        info = f"{counts['running']} running, {waiting} queued, {counts['failed']} failed"
        self.reporter.update("jobs", finished, info)
        if event.state != "queued":
            self.reporter.note(event.describe())
        if self.on_event is not None:
            self.on_event(event)


def _prepare(runner: Executor, folder: Path, gpus_wanted: bool) -> None:
    """Check the executor's resources and that workers see ``folder``; clear what killed runs left there."""
    runner.check_resources(gpus_wanted)
    runner.check_folder(folder)
    for path in (folder, folder / "arms"):
        remove_leftovers(path)  # staging folders of jobs that a killed earlier attempt left unfinished


def _run_jobs(
    runner: Executor, jobs: list[tuple[Job, Path]], on_event: EventCallback
) -> dict[str, JobOutcome]:
    """Run the jobs whose output folder (``Path``) is not finished yet; the others are reported skipped."""
    finished = [marker for _, marker in jobs if marker.is_file()]
    for marker in finished:  # a torn result stops the sweep here, before anything is reported or run
        read_json(marker, f"delete {marker.parent} and run the sweep again")
    todo = []
    for job, done_marker in jobs:
        if done_marker.is_file():
            on_event(JobEvent(job.name, "skipped"))
        else:
            todo.append(job)
    return runner.run(todo, on_event) if todo else {}


def _run_baselines(runner: Executor, plan: SweepPlan, on_event: EventCallback) -> None:
    """Train and evaluate every baseline (concurrently where the executor can); a failure stops the sweep."""
    jobs = []
    for baseline in plan.baselines.values():
        config = baseline.config
        if config is not None and runner.threads is not None:
            config = copy.deepcopy(config)
            config.training.num_threads = runner.threads
        kwargs = {
            "config": config,
            "run_dir": baseline.run_dir,
            "eval_dir": baseline.eval_dir,
            "overrides": baseline.overrides,
        }
        jobs.append((Job(baseline.name, baseline_job, kwargs), baseline.eval_dir / "summary.json"))
    for outcome in _run_jobs(runner, jobs, on_event).values():
        if outcome.ok:
            continue
        if isinstance(outcome.exception, AcdcPruneError):
            raise outcome.exception
        raise SweepError(f"baseline {outcome.name} failed twice ({outcome.error}); fix it and run again")


def _run_arms(runner: Executor, plan: SweepPlan, on_event: EventCallback) -> dict[str, str]:
    """Run every unfinished arm; write each finished arm's ``timing.json``; the failed arms' errors."""
    threads = [f"training.num_threads={runner.threads}"] if runner.threads is not None else []
    jobs = []
    for arm in plan.arms:
        kwargs = {
            "baseline_dir": arm.baseline.run_dir,
            "arm_dir": arm.dir,
            "prune_kwargs": arm.prune_kwargs,
            "overrides": [*arm.overrides, *threads],
        }
        jobs.append((Job(arm.name, arm_job, kwargs), arm.dir / "result.json"))
    outcomes = _run_jobs(runner, jobs, on_event)
    for name, outcome in outcomes.items():
        if outcome.ok:
            timing = {
                "executor": runner.name,
                "host": outcome.host,
                "start": outcome.start,
                "end": outcome.end,
                "seconds": outcome.end - outcome.start,
                "attempts": outcome.attempts,
            }
            atomic_write_json(plan.root / "arms" / name / "timing.json", timing)
    return {name: outcome.error for name, outcome in outcomes.items() if not outcome.ok}


def _gpus_wanted(sweep_gpus: float | None, config: Config) -> bool:
    """The sweep asks for GPUs: ``gpus_per_arm`` > 0 or a CUDA training device."""
    return (sweep_gpus or 0) > 0 or config.training.device.startswith("cuda")


def executor_options(sweep: SweepConfig, base: Config, ray_address: str | None) -> ExecutorOptions:
    """The executor resources of a sweep: a CPU-only config reserves no GPUs."""
    gpus = sweep.gpus_per_arm
    if gpus is None and base.training.device == "cpu":
        gpus = 0.0
    return ExecutorOptions(sweep.threads_per_arm, gpus, ray_address)


def run_sweep(
    sweep: SweepConfig,
    base_dir: Path,
    *,
    data: Path | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    reporter: Reporter | None = None,
    on_event: EventCallback | None = None,
    console: Console | None = None,
) -> Path:
    """Run (or resume) a sweep and write its report; returns the report folder.

    Layout: ``<runs_dir>/<experiment>/<name>/`` with ``baseline/`` (a training run; ``baseline-s<seed>/``
    with ``seed_baseline``), ``baseline_eval/``, ``arms/<setting>-<mode>[-s<seed>]/`` (pruned child
    folders, see ``prune_run``, plus ``timing.json``) and ``report/`` (see
    :func:`acdc_prune.experiments.report.write_report`, plus ``sweep.json``). The baselines run first,
    then every arm, on the executor (``local``: one after the other in this process; ``ray``: Ray
    tasks). An arm folder exists only once it is complete, so re-running the sweep skips finished
    arms and redoes the rest. A failed arm is retried once, then reported (``failed`` event, and in
    ``sweep.json``); the others go on. ``.sweep.lock`` keeps a second sweep out of the folder.

    Args:
        sweep: the validated sweep.
        base_dir: folder that ``sweep.config`` is relative to.
        data: data folder overriding the base config's ``data.root``.
        executor: a registered executor name (``local`` or ``ray``).
        ray_address: Ray cluster to join (``ray`` executor); ``None`` starts a local instance.
        reporter: receives the sweep's progress (bar ``jobs`` and a note per job event) and, on the
            local executor, the jobs' own progress.
        on_event: also called with every :class:`JobEvent`.
        console: without ``reporter``, where the notes are printed as plain lines (default: stdout).

    Raises:
        ExecutorError: Ray missing or unreachable, GPUs asked for where there are none, a sweep folder
            the workers cannot see; SweepError: another sweep runs in the folder, or a baseline failed.
    """
    reporter = reporter or ConsoleNotes(console or Console())
    on_event = SweepProgress(reporter, on_event)
    plan = plan_sweep(sweep, base_dir, data)
    options = executor_options(sweep, plan.base, ray_address)
    with make_executor(executor, options, reporter) as runner, folder_lock(plan.root):
        gpus_wanted = _gpus_wanted(options.gpus_per_job, plan.base)
        _prepare(runner, plan.root, gpus_wanted)
        # Results of arms finished earlier are read first: a damaged one stops the sweep before new work.
        for arm in plan.arms:
            if (arm.dir / "result.json").is_file():
                _arm_result(arm.dir)
        _run_baselines(runner, plan, on_event)
        try:
            failed = _run_arms(runner, plan, on_event)
        finally:
            remove_leftovers(plan.root / "arms")  # staging folders of attempts that Ray had to kill
        return _write_sweep_report(plan, _manifest(plan, runner, gpus_wanted, failed))


def _arm_result(arm_dir: Path) -> dict[str, Any]:
    """The ``result.json`` of a finished arm (see ``prune_run``)."""
    return read_json(arm_dir / "result.json", f"delete {arm_dir} and run the sweep again")


def _report_runs(plan: SweepPlan) -> list[report.ReportRun]:
    """The baselines and every finished arm, as the report reads them."""
    runs = []
    for baseline in plan.baselines.values():
        summary = read_json(baseline.eval_dir / "summary.json", f"delete {baseline.eval_dir} and run again")
        runs.append(
            report.ReportRun(
                arm=baseline.name,
                group="baseline",
                setting="-",
                mode="baseline",
                seed=baseline.seed,
                after=summary,
                before=None,
                per_volume=baseline.eval_dir / "per_volume.csv",
            )
        )
    for arm in plan.arms:
        if not (arm.dir / "result.json").is_file():
            continue
        result = _arm_result(arm.dir)
        retrained = arm.dir / "eval_after"
        eval_dir = retrained if retrained.is_dir() else arm.dir / "eval_before"
        runs.append(
            report.ReportRun(
                arm=arm.name,
                group=arm.group,
                setting=arm.setting,
                mode=arm.mode,
                seed=arm.seed,
                after=result["after"],
                before=result["before"],
                per_volume=eval_dir / "per_volume.csv",
            )
        )
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


def _model_entry(
    name: str, group: str, setting: str, mode: str, seed: int | None, folder: Path, overrides: list[str]
) -> dict[str, Any]:
    """One model of ``sweep.json``."""
    return {
        "name": name,
        "group": group,
        "setting": setting,
        "mode": mode,
        "seed": seed,
        "dir": str(folder),
        "overrides": overrides,
    }


def _manifest(plan: SweepPlan, runner: Executor, gpus_wanted: bool, failed: dict[str, str]) -> dict[str, Any]:
    """``sweep.json``: where the sweep ran, the models that ``sweep-eval`` evaluates, the failed arms."""
    models = [
        _model_entry(b.name, "baseline", "-", "baseline", b.seed, b.run_dir, b.overrides)
        for b in plan.baselines.values()
    ]
    models += [
        _model_entry(a.name, a.group, a.setting, a.mode, a.seed, a.dir, a.overrides) for a in plan.arms
    ]
    return {
        "executor": runner.name,
        "threads_per_arm": runner.options.threads_per_job,
        "gpus_per_arm": runner.options.gpus_per_job,
        "gpus_wanted": gpus_wanted,
        "models": models,
        "failed": failed,
    }


def _write_sweep_report(plan: SweepPlan, manifest: dict[str, Any]) -> Path:
    """Write ``report/`` (tables, plots, ``sweep.json``) from the finished runs; returns its path."""
    report_dir = plan.root / "report"
    curves, modes = _curves(plan)
    report.write_report(_report_runs(plan), report_dir, curves, modes)
    atomic_write_json(report_dir / MANIFEST, manifest)
    return report_dir


def _evaluation_runs(models: list[dict[str, Any]], out: Path) -> list[report.ReportRun]:
    """The models of ``sweep.json`` evaluated into ``out``, as the report reads them."""
    runs = []
    for model in models:
        eval_dir = _evaluation_dir(out, model)
        if (eval_dir / "summary.json").is_file():
            summary = read_json(eval_dir / "summary.json", f"delete {eval_dir} and run sweep-eval again")
            runs.append(
                report.ReportRun(
                    arm=model["name"],
                    group=model["group"],
                    setting=model["setting"],
                    mode=model["mode"],
                    seed=model["seed"],
                    after=summary,
                    before=None,
                    per_volume=eval_dir / "per_volume.csv",
                )
            )
    return runs


def _evaluation_dir(out: Path, model: dict[str, Any]) -> Path:
    """Where ``sweep-eval`` writes the evaluation of one model of ``sweep.json``."""
    return out / model["name"] if model["group"] == "baseline" else out / "arms" / model["name"]


def _evaluation_jobs(models: list[dict[str, Any]], out: Path, data: Path) -> list[tuple[Job, Path]]:
    """A job evaluating each model of ``sweep.json`` on ``data`` into ``out``, with its done marker."""
    jobs = []
    for model in models:
        eval_dir = _evaluation_dir(out, model)
        kwargs = {
            "model_dir": Path(model["dir"]),
            "out_dir": eval_dir,
            "data": data,
            "overrides": model["overrides"],
        }
        jobs.append((Job(model["name"], evaluation_job, kwargs), eval_dir / "summary.json"))
    return jobs


def evaluate_sweep(
    sweep_dir: Path,
    data: Path,
    *,
    name: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    reporter: Reporter | None = None,
    on_event: EventCallback | None = None,
    console: Console | None = None,
) -> Path:
    """Evaluate the baselines and every finished arm of a sweep on another labelled data folder.

    Writes ``SWEEP/eval-<name>/``: ``<baseline>/`` and ``arms/<arm>/`` (evaluation folders: per-volume
    CSV, summary, overlays) and ``report/`` (the tables and Pareto plot of
    :func:`acdc_prune.experiments.report.write_report`, Dice before retraining left empty, and
    ``sweep_eval.json``). Nothing of the sweep itself is written; re-running skips finished
    evaluations. Jobs run on the executor with the sweep's resources (``sweep.json``).

    Args:
        sweep_dir: a sweep folder whose ``report/sweep.json`` exists (the sweep ran to its end).
        data: a labelled ACDC or nnU-Net raw folder.
        name: the evaluation's name (default: the data folder's name).
        executor: a registered executor name (``local`` or ``ray``).
        ray_address: Ray cluster to join (``ray`` executor); ``None`` starts a local instance.
        reporter: receives the progress (see :func:`run_sweep`).
        on_event: also called with every :class:`JobEvent`.
        console: without ``reporter``, where the notes are printed as plain lines (default: stdout).

    Returns:
        The new report folder.

    Raises:
        CheckpointError: no ``sweep.json``; DataError: ``data`` is not a labelled data set; and the
            executor and lock errors of :func:`run_sweep`.
    """
    from acdc_prune.data import discover

    reporter = reporter or ConsoleNotes(console or Console())
    on_event = SweepProgress(reporter, on_event)
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    manifest = read_json(sweep_dir / "report" / MANIFEST, "run the sweep to its end first (acdc-prune sweep)")
    data = Path(data).expanduser().resolve()
    discover(data, layout="auto", require_labels=True)  # a bad folder is refused before any worker starts
    out = sweep_dir / f"eval-{check_name(name or data.name, 'evaluation name')}"
    models = [model for model in manifest["models"] if (Path(model["dir"]) / "best.pt").is_file()]
    options = ExecutorOptions(manifest["threads_per_arm"], manifest["gpus_per_arm"], ray_address)
    with make_executor(executor, options, reporter) as runner, folder_lock(out):
        _prepare(runner, out, manifest["gpus_wanted"])
        outcomes = _run_jobs(runner, _evaluation_jobs(models, out, data), on_event)
        failed = {job: outcome.error for job, outcome in outcomes.items() if not outcome.ok}
        report_dir = out / "report"
        report.write_report(_evaluation_runs(models, out), report_dir)
        details = {"sweep": str(sweep_dir), "data": str(data), "executor": runner.name, "failed": failed}
        atomic_write_json(report_dir / "sweep_eval.json", details)
    return report_dir
