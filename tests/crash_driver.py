"""Run acdc-prune commands in child processes that die at a chosen point, for tests/test_reliability.py.

The driver imports the command line once and forks one child per command; the child runs
``acdc-prune ARGS`` exactly as ``python -m acdc_prune ARGS`` would, but skips the seconds that
importing torch, MONAI and matplotlib costs every new process. Protocol, one JSON object per line:
the test writes ``{"args": [...], "kill_at": POINT or null, "log": PATH, "timeout": SECONDS}``; the
driver answers ``{"pid": PID}`` once the child runs and ``{"returncode": CODE}`` when it has ended (``-9``
when SIGKILLed, as ``subprocess`` reports it). The child writes its stdout and stderr to
``PATH.stdout`` and ``PATH.stderr``.

POINT is one of

    step:N          SIGKILL just before the N-th training step (in the middle of an epoch)
    torn:NAME:N     SIGKILL half-way through the N-th atomic write of a file called NAME: the temporary
                    file holds half the bytes, as when the process dies inside ``write``
    after:NAME:N    SIGKILL right after the N-th atomic write of NAME is complete (between two files)

The hooks live here, not in the library: a child is the real command line with one function wrapped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import torch._dynamo

import acdc_prune.engine.evaluate
import acdc_prune.experiments.evaluation
import acdc_prune.experiments.sweep
from acdc_prune import cli, io
from acdc_prune.engine import trainer
from acdc_prune.experiments.report import pyplot

# The commands import these lazily; loaded here once, every forked child starts with them.
WARM = (
    torch._dynamo,
    acdc_prune.engine.evaluate,
    acdc_prune.experiments.evaluation,
    acdc_prune.experiments.sweep,
    pyplot(),
)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_step(n: int) -> None:
    """SIGKILL this process just before its ``n``-th training step."""
    real_step = trainer.TrainStep.__call__
    calls = [0]

    def step(self, image, label):
        calls[0] += 1
        if calls[0] == n:
            _die()
        return real_step(self, image, label)

    trainer.TrainStep.__call__ = step


def kill_in_write(name: str, n: int, torn: bool) -> None:
    """SIGKILL this process half-way through (``torn``) or right after the ``n``-th write of ``name``."""
    real_write = io.atomic_write_bytes
    calls = [0]

    def write(path, data):
        path = Path(path)
        if path.name == name:
            calls[0] += 1
        if path.name != name or calls[0] != n:
            real_write(path, data)
        elif torn:
            fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.write(fd, bytes(data[: len(data) // 2]))
            os.fsync(fd)
            _die()
        else:
            real_write(path, data)
            _die()

    io.atomic_write_bytes = write


def install(point: str) -> None:
    kind, *rest = point.split(":")
    if kind == "step":
        kill_before_step(int(rest[0]))
    elif kind in ("torn", "after"):
        kill_in_write(rest[0], int(rest[1]), torn=kind == "torn")
    else:
        raise ValueError(f"unknown kill point {point!r}")


def run_child(request: dict) -> None:
    """In the forked child: redirect the output, install the kill point, run the command; never returns."""
    code = 1
    try:
        signal.alarm(request["timeout"])  # a hung child ends with SIGALRM instead of hanging the tests
        # Ctrl-C as at a terminal, even when the tests run in the background of a script, which starts
        # every process with SIGINT ignored (and Python then leaves it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
            log = os.open(request["log"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, fd)
            os.close(log)
        if request["kill_at"]:
            install(request["kill_at"])
        sys.argv = ["acdc-prune", *request["args"]]
        cli.run()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
