"""The ``ray`` executor: every sweep job as a Ray task, on a local Ray instance or a cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from acdc_prune.engine.progress import Reporter
from acdc_prune.errors import Interrupted
from acdc_prune.experiments.executors import (
    ATTEMPTS,
    EventCallback,
    Executor,
    ExecutorError,
    ExecutorOptions,
    Job,
    JobEvent,
    JobOutcome,
    error_line,
    timed_call,
)

RAY_EXTRA = 'pip install "acdc-prune[ray]"'
CONNECT_TIMEOUT_S = 5.0
CANCEL_GRACE_S = 30.0
POLL_S = 0.5


def import_ray() -> Any:
    """The ``ray`` module, imported on first use only.

    Raises:
        ExecutorError: Ray is not installed (the message names the extra to install).
    """
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"the ray executor needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse quickly a ``host:port`` that nothing answers on (``ray.init`` would wait for minutes).

    Raises:
        ExecutorError: the address has no port, or the connection is refused or times out.
    """
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--ray-address {address} must look like host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); check the address that "
            "'ray start --head' printed and that its port is open from here"
        ) from None


def sees_file(path: str) -> tuple[str, bool]:
    """Run on a worker: its host name and whether ``path`` exists there."""
    return socket.gethostname(), os.path.exists(path)


def ray_job(
    fn: Callable[..., Any], kwargs: dict[str, Any], threads: int, tracker: Any, name: str
) -> dict[str, Any]:
    """The body of a job's Ray task: tell the driver it runs, then :func:`timed_call` it.

    The notice is not waited for: a task blocked in ``ray.get`` lends its CPUs to the next task, and
    both would then run on them. The job reports to the engine's default (the ``acdc_prune`` logger
    of the worker, in Ray's logs).

    ``ray.cancel`` stops a running task by raising ``KeyboardInterrupt`` in it, which Python does only
    while SIGINT has its default handler. Workers inherit the disposition of the process that started
    Ray, and one started in the background of a shell script (``ray start --head --block &`` in a
    Slurm script, or ``nohup acdc-prune sweep ... &``) ignores SIGINT, so the handler is restored here:
    a cancelled job then cleans up its staging folder.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    tracker.started.remote(name, socket.gethostname())
    return timed_call(fn, kwargs, None, threads)


class StartTracker:
    """A Ray actor that collects which jobs have started, for the driver's ``running`` events."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str]] = []

    def started(self, name: str, host: str) -> None:
        """Record that job ``name`` started on ``host``."""
        self.pending.append((name, host))

    def drain(self) -> list[tuple[str, str]]:
        """The jobs started since the last call."""
        pending, self.pending = self.pending, []
        return pending


class RayExecutor(Executor):
    """Runs every job as a Ray task: a local Ray instance by default, or a cluster by address.

    Each task reserves ``threads_per_job`` CPUs and, where the cluster has GPUs, ``gpus_per_job``
    GPUs (default one). Ray re-runs a task whose worker died (``max_retries=1``); a task that raises is
    submitted once more. A Ray instance this executor started is shut down on exit; one that was
    already running in this process (``ray.init`` called by the user) is left running. Registered as
    ``ray`` in :data:`~acdc_prune.experiments.executors.EXECUTORS` (imported on first use).
    """

    name = "ray"

    def __init__(self, options: ExecutorOptions, reporter: Reporter | None = None) -> None:
        super().__init__(options, reporter)
        self._ray: Any = None
        self._owned = False
        self._gpus = 0.0

    @property
    def threads(self) -> int | None:
        """``threads_per_job``: each task runs on the CPUs it reserved."""
        return self.options.threads_per_job

    def start(self) -> None:
        """Import Ray and start a local instance or join ``options.address``."""
        ray = self._ray = import_ray()
        address = self.options.address
        if address is not None:
            check_reachable(address)
        if ray.is_initialized():
            return
        extra = {} if address else {"include_dashboard": False}
        main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **extra)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ExecutorError(f"cannot start or join {where}: {error_line(err)}") from None
        finally:
            # ray.init makes SIGTERM call sys.exit; a handler the caller set (the command line's, which
            # stops a sweep as Ctrl-C does, cancelling its arms) stays in charge.
            if callable(sigterm):
                signal.signal(signal.SIGTERM, sigterm)
        self._owned = True

    def close(self) -> None:
        """Shut down the Ray instance if this executor started it."""
        if self._owned:
            self._ray.shutdown()
            self._owned = False

    def _nodes(self) -> list[dict[str, Any]]:
        """The live nodes that can run jobs (with CPUs)."""
        return [n for n in self._ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]

    def check_resources(self, gpus_wanted: bool) -> None:
        """Fix the GPUs of each task; refuse GPUs the cluster lacks and tasks no node can hold."""
        gpus = max((n["Resources"].get("GPU", 0.0) for n in self._nodes()), default=0.0)
        asked = self.options.gpus_per_job
        if gpus_wanted and gpus == 0:
            raise ExecutorError(
                "the sweep asks for GPUs (training.device cuda or gpus_per_arm > 0) but the Ray cluster "
                "has none; set training.device=auto and gpus_per_arm: 0, or add GPU nodes"
            )
        self._gpus = (1.0 if gpus else 0.0) if asked is None else float(asked)
        cpus = max((n["Resources"]["CPU"] for n in self._nodes()), default=0.0)
        if self.options.threads_per_job > cpus or self._gpus > gpus:
            raise ExecutorError(
                f"no Ray node can hold one arm ({self.options.threads_per_job} CPUs, {self._gpus:g} GPUs; "
                f"the largest node has {cpus:g} CPUs, {gpus:g} GPUs); lower threads_per_arm or gpus_per_arm"
            )

    def check_folder(self, folder: Path) -> None:
        """Ask one task on every node whether it sees a marker file written into ``folder``."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._ray
        marker = Path(folder) / f".worker-check-{uuid.uuid4().hex}"
        marker.write_text("written by the sweep driver to check that workers see this folder\n")
        probe = ray.remote(sees_file)
        try:
            refs = [
                probe.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(marker))
                for n in self._nodes()
            ]
            answers = ray.get(refs, timeout=120)
        except ray.exceptions.GetTimeoutError:
            raise ExecutorError("Ray workers did not answer within 2 minutes; check the cluster") from None
        finally:
            marker.unlink(missing_ok=True)
        blind = sorted({host for host, seen in answers if not seen})
        if blind:
            raise ExecutorError(
                f"Ray workers on {', '.join(blind)} cannot see the sweep folder {folder}; put "
                "logging.runs_dir on storage that every node mounts at the same path (see docs/scaling.md)"
            )

    def run(self, jobs: Sequence[Job], on_event: EventCallback) -> dict[str, JobOutcome]:
        """Submit every job as a task, follow them to the end, resubmit once those that raise."""
        ray = self._ray
        tracker = ray.remote(num_cpus=0)(StartTracker).remote()
        task = ray.remote(ray_job).options(
            num_cpus=self.options.threads_per_job, num_gpus=self._gpus, max_retries=1, retry_exceptions=False
        )
        pending: dict[Any, tuple[Job, int]] = {}

        def submit(job: Job, attempt: int) -> None:
            ref = task.remote(job.fn, job.kwargs, self.options.threads_per_job, tracker, job.name)
            pending[ref] = (job, attempt)

        for job in jobs:
            submit(job, 1)
            on_event(JobEvent(job.name, "queued"))
        outcomes: dict[str, JobOutcome] = {}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for name, host in ray.get(tracker.drain.remote()):
                    if name not in outcomes:  # a late notice of a job that has already ended
                        on_event(JobEvent(name, "running", host))
                for ref in ready:
                    job, attempt = pending.pop(ref)
                    outcome = self._collect(ref, job, attempt, on_event)
                    if outcome is None:
                        submit(job, attempt + 1)
                    else:
                        outcomes[job.name] = outcome
        except KeyboardInterrupt:
            self._cancel(list(pending))
            raise Interrupted(
                "sweep stopped: running jobs were cancelled, finished ones are kept; run the same command "
                "to resume"
            ) from None
        finally:
            ray.kill(tracker)
        return outcomes

    def _collect(self, ref: Any, job: Job, attempt: int, on_event: EventCallback) -> JobOutcome | None:
        """The outcome of a finished task, or ``None`` when it failed and gets another attempt."""
        try:
            record = self._ray.get(ref)
        except Exception as err:
            if attempt < ATTEMPTS:
                on_event(JobEvent(job.name, "retrying", error_line(err)))
                return None
            on_event(JobEvent(job.name, "failed", error_line(err)))
            cause = getattr(err, "cause", None) or err
            return JobOutcome(job.name, error=error_line(err), exception=cause, attempts=attempt)
        on_event(JobEvent(job.name, "done", record["host"]))
        return JobOutcome(job.name, attempts=attempt, **record)

    def _cancel(self, refs: list[Any]) -> None:
        """Interrupt running tasks (their staging folders are removed), then kill those that linger."""
        ray = self._ray
        if not refs:
            return
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        _, lingering = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        for ref in lingering:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
