"""Where sweep jobs run: an executor registry (this process, Ray tasks) with retries and progress events."""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from acdc_prune.engine.progress import Reporter
from acdc_prune.errors import AcdcPruneError, ConfigError

ATTEMPTS = 2
"""Tries of a job that raises: the first, then one retry (Ray also re-runs a job whose worker died)."""
STATE_TEXT = {"skipped": "finished earlier, skipped", "retrying": "failed, retrying"}


class ExecutorError(AcdcPruneError):
    """An executor cannot run the sweep: Ray missing, cluster unreachable, no GPUs, a folder workers miss."""


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(**kwargs, reporter=reporter)``.

    ``fn`` must be a module-level function and ``kwargs`` plain picklable data, so that a Ray worker on
    another machine can import and run it. Jobs exchange results through files in the sweep folder;
    what ``fn`` returns comes back in :attr:`JobOutcome.value`.
    """

    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobEvent:
    """A change of a job's state, for progress displays.

    Attributes:
        job: the job's name.
        state: ``skipped`` (finished earlier), ``queued``, ``running``, ``retrying``, ``done`` or ``failed``.
        message: detail for the user (the error of a failed attempt, the host an attempt runs on).
    """

    job: str
    state: str
    message: str = ""

    def describe(self) -> str:
        """One line for a log: ``half-none: done``, ``half-none: failed (ResourceError: ...)``."""
        text = STATE_TEXT.get(self.state, self.state)
        return f"{self.job}: {text}" + (f" ({self.message})" if self.message else "")


@dataclass
class JobOutcome:
    """How a job ended.

    Attributes:
        name: the job's name.
        value: what the job returned (``None`` when it failed).
        error: one line naming the error of the last attempt, ``None`` on success.
        exception: that error itself (the cause, for an error raised inside a Ray task).
        attempts: tries made.
        start: wall-clock start of the successful attempt (seconds since the epoch).
        end: its end.
        host: the machine it ran on.
    """

    name: str
    value: Any = None
    error: str | None = None
    exception: BaseException | None = None
    attempts: int = 0
    start: float | None = None
    end: float | None = None
    host: str | None = None

    @property
    def ok(self) -> bool:
        """The job succeeded."""
        return self.error is None


@dataclass(frozen=True)
class ExecutorOptions:
    """Resources of each job and where the executor runs them.

    Attributes:
        threads_per_job: CPU threads of each job (Ray reserves that many CPUs and the job sets
            ``torch.set_num_threads``); the local executor leaves threads to the config.
        gpus_per_job: GPUs of each job on Ray; ``None`` = one where the cluster has GPUs, else none.
        address: Ray cluster to join (``host:port``, ``ray://host:port`` or ``auto``); ``None`` starts
            a local Ray instance.
    """

    threads_per_job: int = 1
    gpus_per_job: float | None = None
    address: str | None = None


EventCallback = Callable[[JobEvent], None]


def timed_call(
    fn: Callable[..., Any], kwargs: dict[str, Any], reporter: Reporter | None, threads: int | None
) -> dict[str, Any]:
    """Run ``fn(**kwargs, reporter=reporter)`` on ``threads`` torch threads; its value, when and where."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    start = time.time()
    value = fn(**kwargs, reporter=reporter)
    return {"value": value, "start": start, "end": time.time(), "host": socket.gethostname()}


def error_line(err: BaseException) -> str:
    """``ClassName: first line of the message`` of an error (the cause of a Ray task error)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{cause.__class__.__name__}: {text[0]}" if text else cause.__class__.__name__


class Executor(ABC):
    """Runs a list of jobs, each retried once after an error, reporting :class:`JobEvent` s.

    Subclasses register under a name with :func:`register_executor`; ``--executor NAME`` picks them.
    Use as a context manager: entering connects to the resources (and fails with one line when it
    cannot), leaving releases what entering started.
    """

    name: ClassVar[str] = ""

    def __init__(self, options: ExecutorOptions, reporter: Reporter | None = None) -> None:
        self.options = options
        self.reporter = reporter

    @property
    def threads(self) -> int | None:
        """torch threads each job runs with; ``None`` leaves them to the job's config."""
        return None

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:  # noqa: B027 (optional hook)
        """Connect to the resources; raise :class:`ExecutorError` if that is impossible."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what :meth:`start` started."""

    @abstractmethod
    def check_resources(self, gpus_wanted: bool) -> None:
        """Raise :class:`ExecutorError` when jobs need GPUs (``gpus_wanted``) and there are none, or when
        no worker can hold one job."""

    @abstractmethod
    def check_folder(self, folder: Path) -> None:
        """Raise :class:`ExecutorError` when the workers cannot see ``folder`` (the shared results)."""

    @abstractmethod
    def run(self, jobs: Sequence[Job], on_event: EventCallback) -> dict[str, JobOutcome]:
        """Run every job (concurrently where the executor can); outcomes by job name.

        A job that raises is retried once; a job that fails twice is reported (``failed`` event, outcome
        with ``error``) and the others go on. Ctrl-C cancels what runs and raises
        :class:`acdc_prune.errors.Interrupted`.
        """


ExecutorFactory = Callable[[ExecutorOptions, Reporter | None], Executor]
"""An :class:`Executor` subclass, or a function building one from the same arguments."""
EXECUTORS: dict[str, ExecutorFactory] = {}
"""Executors by name: ``local`` and ``ray`` (whose module, :mod:`acdc_prune.experiments.ray_executor`,
is imported only when it is used), then those users register."""


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    """Class decorator: make an :class:`Executor` subclass available as ``--executor name``."""

    def add(cls: type[Executor]) -> type[Executor]:
        cls.name = name
        EXECUTORS[name] = cls
        return cls

    return add


def make_executor(name: str, options: ExecutorOptions, reporter: Reporter | None = None) -> Executor:
    """The registered executor ``name`` (not started yet; use it as a context manager).

    Raises:
        ConfigError: no executor has that name (the message lists those that exist).
    """
    if name not in EXECUTORS:
        raise ConfigError(f"executor '{name}' is not one of {', '.join(EXECUTORS)}; pick one of those")
    return EXECUTORS[name](options, reporter)


@register_executor("local")
class LocalExecutor(Executor):
    """Runs the jobs one after the other in this process (no extra dependency), reporting to its reporter."""

    def check_resources(self, gpus_wanted: bool) -> None:
        """Refuse a sweep that asks for GPUs on a machine where torch sees none."""
        import torch

        if gpus_wanted and not torch.cuda.is_available():
            raise ExecutorError(
                "the sweep asks for GPUs (training.device cuda or gpus_per_arm > 0) but torch sees none "
                "on this machine; set training.device=auto and gpus_per_arm: 0, or run where GPUs are"
            )

    def check_folder(self, folder: Path) -> None:
        """This process writes the folder itself: nothing to check."""

    def run(self, jobs: Sequence[Job], on_event: EventCallback) -> dict[str, JobOutcome]:
        """Run the jobs in order, each retried once after an error."""
        for job in jobs:
            on_event(JobEvent(job.name, "queued"))
        return {job.name: self._run_one(job, on_event) for job in jobs}

    def _run_one(self, job: Job, on_event: EventCallback) -> JobOutcome:
        """One job with its retry."""
        failure: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            if failure is not None:
                on_event(JobEvent(job.name, "retrying", error_line(failure)))
            on_event(JobEvent(job.name, "running"))
            try:
                record = timed_call(job.fn, job.kwargs, self.reporter, self.threads)
            except Exception as err:
                failure = err
                continue
            on_event(JobEvent(job.name, "done"))
            return JobOutcome(job.name, attempts=attempt, **record)
        on_event(JobEvent(job.name, "failed", error_line(failure)))
        return JobOutcome(job.name, error=error_line(failure), exception=failure, attempts=ATTEMPTS)


def _ray_executor(options: ExecutorOptions, reporter: Reporter | None = None) -> Executor:
    """The ``ray`` executor, its module imported on first use."""
    from acdc_prune.experiments.ray_executor import RayExecutor

    return RayExecutor(options, reporter)


EXECUTORS["ray"] = _ray_executor
