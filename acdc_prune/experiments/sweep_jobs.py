"""What sweeps and their re-evaluations share: jobs, the folder lock, progress, an executor session."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from rich.console import Console

from acdc_prune.config import Config
from acdc_prune.engine.progress import LogReporter, Reporter
from acdc_prune.errors import AcdcPruneError
from acdc_prune.experiments.executors import (
    EventCallback,
    Executor,
    ExecutorOptions,
    Job,
    JobEvent,
    JobOutcome,
    make_executor,
)
from acdc_prune.io import read_json, remove_leftovers

LOCK_NAME = ".sweep.lock"


class SweepError(AcdcPruneError):
    """A sweep cannot go on: another sweep holds its folder, or a baseline failed."""


def _trained_epochs(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir/last.pt`` (0 when there is none)."""
    from acdc_prune.engine.checkpoints import Checkpoint

    return Checkpoint.open(run_dir, "last").epoch if (run_dir / "last.pt").is_file() else 0


def ensure_baseline(config: Config, run_dir: Path, reporter: Reporter | None = None) -> None:
    """Job: train the baseline into ``run_dir``, resuming an interrupted one, skipping a finished one."""
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
    model_dir: Path, out_dir: Path, data: Path | None, overrides: list[str], reporter: Reporter | None
) -> None:
    """Job: evaluate the model in ``model_dir`` on ``data`` (``None``: its validation patients), once."""
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


class Execution(TypedDict, total=False):
    """Keyword arguments of ``run_sweep`` and ``evaluate_sweep``: where jobs run, who hears of them.

    Keys (defaults in :func:`open_session`):
        executor: a registered executor name (``local``, the default, or ``ray``).
        ray_address: Ray cluster to join (``ray`` executor); ``None`` starts a local instance.
        reporter: receives the progress (bar ``jobs`` and a note per job event) and, on the local
            executor, the jobs' own progress.
        on_event: also called with every :class:`JobEvent`.
        console: without ``reporter``, where the notes are printed as plain lines (default: stdout).
    """

    executor: str
    ray_address: str | None
    reporter: Reporter | None
    on_event: EventCallback | None
    console: Console | None


@dataclass
class Session:
    """A started executor that holds a locked folder, and the progress display of its jobs.

    Attributes:
        runner: the executor.
        on_event: receives every job event (:class:`SweepProgress`).
    """

    runner: Executor
    on_event: EventCallback

    def run(self, jobs: list[tuple[Job, Path]]) -> dict[str, JobOutcome]:
        """Run the jobs whose done marker (the ``Path``) does not exist yet; the others are reported
        skipped. A torn marker (unreadable JSON) stops everything before any job is reported or run."""
        for _, marker in jobs:
            if marker.is_file():
                read_json(marker, f"delete {marker.parent} and run the sweep again")
        todo = []
        for job, marker in jobs:
            if marker.is_file():
                self.on_event(JobEvent(job.name, "skipped"))
            else:
                todo.append(job)
        return self.runner.run(todo, self.on_event) if todo else {}


@contextlib.contextmanager
def open_session(
    folder: Path,
    resources: ExecutorOptions,
    gpus_wanted: bool,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    reporter: Reporter | None = None,
    on_event: EventCallback | None = None,
    console: Console | None = None,
) -> Iterator[Session]:
    """Start the executor, lock ``folder``, check the resources and that workers see the folder, and
    clear what killed runs left there; the executor is closed and the lock released on exit.

    Args:
        folder: the folder the jobs write into (created).
        resources: threads and GPUs of each job (its ``address`` is replaced by ``ray_address``).
        gpus_wanted: the jobs need GPUs.
        executor, ray_address, reporter, on_event, console: see :class:`Execution`.

    Raises:
        ExecutorError: see the executor's ``start``, ``check_resources`` and ``check_folder``;
            SweepError: another sweep holds the folder.
    """
    reporter = reporter or ConsoleNotes(console or Console())
    options = ExecutorOptions(resources.threads_per_job, resources.gpus_per_job, ray_address)
    with make_executor(executor, options, reporter) as runner, folder_lock(folder):
        runner.check_resources(gpus_wanted)
        runner.check_folder(folder)
        for path in (folder, folder / "arms"):
            remove_leftovers(path)  # staging folders of jobs that a killed earlier attempt left unfinished
        yield Session(runner, SweepProgress(reporter, on_event))
