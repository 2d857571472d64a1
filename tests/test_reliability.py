"""Crashes, Ctrl-C, full disks and GPU memory: what survives, what the user reads, and that resuming
ends exactly where an uninterrupted run ends.

Killed processes are real: ``tests/crash_driver.py`` runs each command line in a child process that
SIGKILLs itself at a chosen point (a training step, half-way through writing a file, right after
writing one).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import load_config
from acdc_prune.engine import trainer
from acdc_prune.engine.checkpoints import read_checkpoint, resolve_checkpoint
from acdc_prune.engine.trainer import train
from acdc_prune.errors import CheckpointError, DiskFullError
from acdc_prune.io import atomic_write_json
from acdc_prune.models import build_model
from acdc_prune.pruning import PruningError, PruningPlan, plan_pruning

DRIVER = Path(__file__).with_name("crash_driver.py")
TIMING_KEYS = ("time_s", "slices_per_s")
EPOCHS = 4


def write_config(path: Path, phantom: Path, runs: Path) -> Path:
    """A YAML config for the tiny phantom run of tests/test_training.py, validated every 2nd epoch,
    without TensorBoard."""
    raw = {
        "data": {
            "root": str(phantom),
            "val_fraction": 0.2,
            "target_spacing": [3.0, 3.0],
            "patch_size": [64, 64],
        },
        "model": {"features": [8, 16]},
        "training": {
            "epochs": EPOCHS,
            "batch_size": 4,
            "iterations_per_epoch": 3,
            "lr": 3e-3,
            "checkpoint_epochs": [1],
            "val_every": 2,
            "num_threads": 1,
        },
        "evaluation": {"batch_size": 8, "overlays": 0, "latency_repeats": 1, "latency_warmup": 0},
        "logging": {"runs_dir": str(runs), "experiment": "t", "progress": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_phantom):
    """The config file and the folder of an uninterrupted run of it."""
    root = tmp_path_factory.mktemp("reference")
    config_file = write_config(root / "config.yaml", tiny_phantom, root / "runs")
    return config_file, train(load_config(config_file)).run_dir


class Children:
    """Runs acdc-prune commands as child processes of ``tests/crash_driver.py`` (see its protocol)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.count = logs, 0
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.driver = subprocess.Popen(
            [sys.executable, str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def start(self, *args: str, kill_at: str | None = None, timeout: int = 300) -> int:
        """Start ``acdc-prune ARGS`` (SIGKILLed at ``kill_at``); returns the child's process id."""
        self.count += 1
        self.log = str(self.logs / f"child{self.count}")
        request = {"args": list(args), "kill_at": kill_at, "log": self.log, "timeout": timeout}
        self.driver.stdin.write(json.dumps(request) + "\n")
        self.driver.stdin.flush()
        return self._reply()["pid"]

    def wait(self) -> subprocess.CompletedProcess:
        """Wait for the child started last; its exit code (-9 when SIGKILLed), stdout and stderr."""
        code = self._reply()["returncode"]
        out, err = (Path(self.log + suffix).read_text() for suffix in (".stdout", ".stderr"))
        return subprocess.CompletedProcess([], code, out, err)

    def run(self, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
        self.start(*args, kill_at=kill_at)
        return self.wait()

    def close(self) -> None:
        self.driver.stdin.close()
        self.driver.wait(timeout=60)

    def _reply(self) -> dict:
        line = self.driver.stdout.readline()
        assert line, "tests/crash_driver.py ended unexpectedly"
        return json.loads(line)


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("the crash driver forks its children")
    driver = Children(tmp_path_factory.mktemp("children"))
    yield driver
    driver.close()


def metrics_without_timing(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["epochs"] = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in metrics["epochs"]]
    return metrics


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_readable(run: Path, last_epoch: int) -> None:
    """Every checkpoint and result file of ``run`` loads; last.pt holds ``last_epoch``; temporary
    files are never taken for checkpoints."""
    checkpoints = sorted(run.glob("*.pt"))
    assert all(not p.name.startswith(".") for p in checkpoints)
    for path in checkpoints:
        read_checkpoint(path)
    assert read_checkpoint(resolve_checkpoint(run, "last"))["epoch"] == last_epoch
    for name in ("metrics.json", "split.json"):
        json.loads((run / name).read_text())
    yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights_and_metrics(reference, children, tmp_path):
    config_file, reference_run = reference
    runs = tmp_path / "runs"
    args = ["train", "-c", str(config_file), "--set", f"logging.runs_dir={runs}"]

    # 1. SIGKILL in the middle of epoch 2 (its second of three steps).
    killed = children.run(*args, kill_at="step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run,) = (runs / "t").iterdir()
    assert_readable(run, last_epoch=1)

    # 2. Resumed, then SIGKILLed half-way through writing last.pt of epoch 3: last.pt keeps epoch 2
    #    and the torn temporary file is not a checkpoint.
    killed = children.run("train", "--resume", str(run), kill_at="torn:last.pt:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_readable(run, last_epoch=2)
    assert [p.name for p in run.glob(".last.pt.*.tmp")], "the torn write should have left its temporary file"

    # 3. Resumed, then SIGKILLed right after last.pt of the final epoch: the run is complete.
    killed = children.run("train", "--resume", str(run), kill_at=f"after:last.pt:{EPOCHS - 2}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_readable(run, last_epoch=EPOCHS)

    for name in ("last", "best", "epoch1"):
        ours, theirs = read_checkpoint(run / f"{name}.pt"), read_checkpoint(reference_run / f"{name}.pt")
        assert ours["epoch"] == theirs["epoch"], name
        assert_same_tensors(ours["model"], theirs["model"])
    assert metrics_without_timing(run) == metrics_without_timing(reference_run)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference_run.iterdir())

    again = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert again.exit_code == 2
    assert again.output.strip() == (
        f"error: run {run} has already trained {EPOCHS} epochs; set training.epochs above that to "
        f"continue it; e.g. --set training.epochs={EPOCHS + 1}"
    )


@pytest.mark.slow
def test_killed_sweep_resumes_skipping_finished_arms(reference, children, tmp_path):
    config_file, reference_run = reference
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "config": str(config_file),
                "overrides": [f"logging.runs_dir={tmp_path / 'runs'}"],
                "baseline": str(reference_run),
                "ratios": {"half": {"default": 0.5}},
                "modes": ["none", "random"],
                "retrain_epochs": 0,
            }
        )
    )
    root = tmp_path / "runs" / "t" / "s"
    killed = children.run("sweep", "-c", str(sweep_file), kill_at="torn:meta.json:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = root / "arms" / "half-none" / "result.json"
    json.loads(finished.read_text())
    assert not (root / "arms" / "half-random").exists()
    assert [p.name for p in (root / "arms").glob(".half-random.*.partial")]
    stamp = finished.stat().st_mtime_ns

    rerun = CliRunner().invoke(app, ["sweep", "-c", str(sweep_file)])
    assert rerun.exit_code == 0, rerun.output
    assert "half-none: finished earlier, skipped" in rerun.output
    assert finished.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (root / "arms").iterdir()) == ["half-none", "half-random"]
    table = (root / "report" / "comparison.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == ["baseline", "half-none", "half-random"]
    manifest = json.loads((root / "report" / "sweep.json").read_text())
    assert [m["name"] for m in manifest["models"] if m["group"] != "baseline"] == ["half-none", "half-random"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "word", "code"),
    [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_keeps_the_last_epoch_and_says_how_to_resume(
    reference, children, tmp_path, signum, word, code
):
    config_file, _ = reference
    runs = tmp_path / "runs"
    pid = children.start(
        "train", "-c", str(config_file), "--set", f"logging.runs_dir={runs}", "--set", "training.epochs=100"
    )
    stdout, deadline = Path(children.log + ".stdout"), time.monotonic() + 240
    while not (stdout.is_file() and "epoch 1/100" in stdout.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the epoch line comes once epoch 1 is complete, last.pt included
    os.kill(pid, signum)
    finished = children.wait()
    stderr = finished.stderr
    assert finished.returncode == code, stderr
    assert "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()
    match = re.fullmatch(
        rf"{word}: stopped in epoch (\d+); (.+)/last\.pt keeps epoch (\d+); "
        r"continue with: acdc-prune train --resume (.+)",
        line,
    )
    assert match, line
    stopped, run, kept, resume = int(match[1]), Path(match[2]), int(match[3]), Path(match[4])
    assert run == resume and stopped == kept + 1 >= 2
    assert_readable(run, last_epoch=kept)

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", f"training.epochs={kept + 1}"])
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(run / "last.pt")["epoch"] == kept + 1


@pytest.fixture
def disk_full_for(monkeypatch):
    """``disk_full_for(name, from_write)``: from its ``from_write``-th atomic write on, every write of
    a file called ``name`` goes to /dev/full, so the kernel answers ENOSPC as on a full disk."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    real_mkstemp = tempfile.mkstemp

    def arm(name: str, from_write: int = 1) -> None:
        calls = [0]

        def mkstemp(*args, **kwargs):
            fd, tmp = real_mkstemp(*args, **kwargs)
            if kwargs.get("prefix") == f".{name}.":
                calls[0] += 1
                if calls[0] >= from_write:
                    full = os.open("/dev/full", os.O_WRONLY)
                    os.dup2(full, fd)
                    os.close(full)
            return fd, tmp

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return arm


def test_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, disk_full_for):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"epoch": 1})
    disk_full_for("metrics.json")
    with pytest.raises(DiskFullError) as info:
        atomic_write_json(path, {"epoch": 2})
    assert str(info.value) == (
        f"no space left on device while writing {path}; free space and run the command again"
    )
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.slow
def test_full_disk_during_training_names_the_file_and_the_resume_command(reference, tmp_path, disk_full_for):
    config_file, _ = reference
    runs = tmp_path / "runs"
    disk_full_for("last.pt", from_write=2)
    args = ["train", "-c", str(config_file), "--set", f"logging.runs_dir={runs}"]
    result = CliRunner().invoke(app, [*args, "--set", "training.epochs=2"])
    assert result.exit_code == 2, result.output
    (run,) = (runs / "t").iterdir()
    assert result.stderr.strip() == (
        f"error: no space left on device while writing {run / 'last.pt'}; free space and resume the run "
        f"({run / 'last.pt'} keeps epoch 1); continue with: acdc-prune train --resume {run}"
    )
    assert read_checkpoint(run / "last.pt")["epoch"] == 1
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_out_of_memory_suggests_smaller_batches_and_keeps_the_checkpoint(reference, tmp_path, monkeypatch):
    config_file, _ = reference
    runs = tmp_path / "runs"
    real_step = trainer.TrainStep.__call__
    calls = [0]

    def step(self, image, label):
        calls[0] += 1
        if calls[0] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, image, label)

    monkeypatch.setattr(trainer.TrainStep, "__call__", step)
    result = CliRunner().invoke(app, ["train", "-c", str(config_file), "--set", f"logging.runs_dir={runs}"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    (run,) = (runs / "t").iterdir()
    assert line == (
        "error: out of memory on cpu in epoch 2 (training.batch_size 4, data.patch_size [64, 64]); "
        "train again with a lower training.batch_size or data.patch_size; "
        f"{run / 'last.pt'} keeps epoch 1; e.g. --set training.batch_size=2"
    )
    assert read_checkpoint(run / "last.pt")["epoch"] == 1


class Payload:
    """Unpickling this calls os.system: a cache file crafted to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_poisoned_disk_cache_is_recomputed_not_run(reference, tmp_path):
    config_file, _ = reference
    overrides = [f"logging.runs_dir={tmp_path / 'runs'}", "training.epochs=1", "data.cache=disk"]
    overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    train(load_config(config_file, overrides))
    entries = sorted((tmp_path / "cache").rglob("*.pt"))
    assert entries
    marker = tmp_path / "pwned"
    for entry in entries:
        torch.save({"image": Payload(marker)}, entry)
    with pytest.warns(UserWarning, match="Corrupt cache file detected"):  # MONAI refuses and redoes it
        train(load_config(config_file, overrides))
    assert not marker.exists()
    for entry in entries:  # recomputed: plain tensors again
        torch.load(entry, weights_only=True)


def test_truncated_checkpoint_of_a_real_run_is_one_line(reference, tmp_path):
    _, run = reference
    data = (run / "last.pt").read_bytes()
    cut = tmp_path / "last.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(cut)
    assert str(info.value) == f"cannot load checkpoint {cut}: it is truncated or not a PyTorch file"


def test_truncated_plan_json_is_one_line(tmp_path):
    model = build_model(load_config(overrides=["model.features=[8, 16]"]).model)
    plan = plan_pruning(model, torch.randn(1, 1, 32, 32), ratios={"default": 0.5})
    path = plan.save(tmp_path / "plan.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(PruningError) as info:
        PruningPlan.load(path)
    message = str(info.value)
    assert message.startswith(f"cannot read the pruning plan {path}: ") and "\n" not in message
