"""Sweeps on a local Ray instance (2 CPUs): parallel arms equal to local ones, retries, resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sweep_workspace import trained_baseline
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.cli_common import sigterm_as_ctrl_c
from acdc_prune.errors import Interrupted
from acdc_prune.experiments import ray_executor
from acdc_prune.experiments.executors import ExecutorOptions, Job, make_executor
from acdc_prune.experiments.sweep import load_sweep, run_sweep

ray = pytest.importorskip("ray")

DICE_COLUMNS = ["dice_before", "dice", "RV_ED", "MYO_ED", "LV_ED", "RV_ES", "MYO_ES", "LV_ES"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance with 2 CPUs for the module; test-defined job functions travel by value.

    It starts with SIGINT ignored, as a Ray instance started in the background of a shell script
    (``ray start --head --block &`` in a Slurm script) does: its workers inherit that, and cancelled
    jobs must still clean up."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGINT, previous)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_phantom):
    """A trained tiny baseline and a sweep file pruning it: 2 modes x 2 seeds, 1 retraining epoch each."""
    root = tmp_path_factory.mktemp("sweep-ray")
    training = {"epochs": 2, "iterations_per_epoch": 3, "checkpoint_epochs": [1]}
    pruning = {"retrain_epochs": 1, "rewind_to": "epoch1"}
    baseline = trained_baseline(root, tiny_phantom, training=training, pruning=pruning)
    sweep = {
        "config": "base.yaml",
        "baseline": str(baseline),
        "ratios": {"half": {"default": 0.5}},
        "modes": ["none", "random"],
        "seeds": [0, 1],
        "threads_per_arm": 1,
    }
    for name in ("ray", "local"):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**sweep, "name": name}))
    return root


@pytest.fixture(scope="module")
def ray_sweep(workspace):
    """The sweep run on Ray: (report folder, events)."""
    events = []
    sweep, base_dir = load_sweep(workspace / "ray.yaml")
    report_dir = run_sweep(sweep, base_dir, executor="ray", on_event=events.append)
    return report_dir, events


def test_ray_arms_overlap_and_match_the_local_executor(workspace, ray_sweep):
    report_dir, events = ray_sweep
    arms = ["half-none-s0", "half-none-s1", "half-random-s0", "half-random-s1"]
    timings = {
        arm: json.loads((report_dir.parent / "arms" / arm / "timing.json").read_text()) for arm in arms
    }
    assert all(t["executor"] == "ray" and t["end"] > t["start"] for t in timings.values())
    spans = sorted((t["start"], t["end"]) for t in timings.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    running_at = [sum(start <= t < end for start, end in spans) for t, _ in spans]
    assert max(running_at) == 2  # 2 CPUs, 1 per arm: never more at once
    assert {e.job for e in events if e.state == "done"} == set(arms) | {"baseline_eval"}

    sweep, base_dir = load_sweep(workspace / "local.yaml")
    local_dir = run_sweep(sweep, base_dir, executor="local", on_event=lambda event: None)
    on_ray, local = (pd.read_csv(d / "comparison.csv") for d in (report_dir, local_dir))
    assert list(on_ray["arm"]) == ["baseline", *arms]
    pd.testing.assert_frame_equal(on_ray[DICE_COLUMNS], local[DICE_COLUMNS], rtol=0, atol=1e-6)
    for arm in arms:  # every weight update shows in the loss: a stricter check than Dice
        losses = [
            pd.read_csv(d.parent / "arms" / arm / "metrics.csv")["train_loss"]
            for d in (report_dir, local_dir)
        ]
        pd.testing.assert_series_equal(*losses, rtol=0, atol=1e-6)
    summary = pd.read_csv(report_dir / "summary.csv")
    assert list(summary["arm"]) == ["baseline", "half-none", "half-random"]
    assert list(summary["n_seeds"]) == [1, 2, 2]
    significance = pd.read_csv(report_dir / "significance.csv")
    assert [tuple(r) for r in significance[["a", "b"]].to_numpy()] == [
        ("half-none", "baseline"),
        ("half-random", "baseline"),
        ("half-none", "half-random"),
    ]
    assert (report_dir / "pareto.png").is_file()


def test_rerunning_skips_finished_arms(workspace, ray_sweep):
    report_dir, _ = ray_sweep
    timing = report_dir.parent / "arms" / "half-none-s0" / "timing.json"
    stamp = timing.stat().st_mtime_ns
    events = []
    sweep, base_dir = load_sweep(workspace / "ray.yaml")
    run_sweep(sweep, base_dir, executor="ray", on_event=events.append)
    assert {e.state for e in events} == {"skipped"}
    assert len(events) == 5
    assert timing.stat().st_mtime_ns == stamp


def test_sweep_eval_writes_a_new_report_beside_the_sweep(ray_sweep, make_phantom, tmp_path):
    report_dir, _ = ray_sweep
    sweep_dir = report_dir.parent
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}
    other = make_phantom(tmp_path / "site-b", 3, 7)
    result = CliRunner().invoke(
        app, ["sweep-eval", str(sweep_dir), "--data", str(other), "--executor", "ray"]
    )
    assert result.exit_code == 0, result.output
    eval_report = sweep_dir / "eval-site-b" / "report"
    table = pd.read_csv(eval_report / "comparison.csv")
    assert list(table["arm"]) == [
        "baseline",
        "half-none-s0",
        "half-none-s1",
        "half-random-s0",
        "half-random-s1",
    ]
    per_volume = pd.read_csv(sweep_dir / "eval-site-b" / "arms" / "half-none-s0" / "per_volume.csv")
    assert len(per_volume) == 6
    assert table["dice_before"].isna().all()
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_seeded_baselines_train_in_parallel_and_each_arm_prunes_its_own(workspace):
    sweep_file = workspace / "seeded.yaml"
    sweep = {"name": "seeded", "config": "base.yaml", "ratios": {"half": {"default": 0.5}}, "modes": ["none"]}
    sweep_file.write_text(yaml.safe_dump({**sweep, "seeds": [0, 1], "seed_baseline": True}))
    events = []
    report_dir = run_sweep(*load_sweep(sweep_file), executor="ray", on_event=events.append)
    root = report_dir.parent
    done = [e.job for e in events if e.state == "done"]
    assert set(done[:2]) == {"baseline-s0", "baseline-s1"}
    for seed in (0, 1):
        meta = json.loads((root / "arms" / f"half-none-s{seed}" / "meta.json").read_text())
        assert Path(meta["source_checkpoint"]).parent == root / f"baseline-s{seed}"
    losses = [pd.read_csv(root / f"baseline-s{seed}" / "metrics.csv")["train_loss"] for seed in (0, 1)]
    assert not losses[0].equals(losses[1])
    summary = pd.read_csv(report_dir / "summary.csv")
    assert summary.set_index("arm")["n_seeds"].to_dict() == {"baseline": 2, "half-none": 2}


def flaky(marker: str, reporter=None) -> str:
    """Fails on its first call (no marker file yet), succeeds on the second."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return "second attempt"


def dies_once(marker: str, reporter=None) -> str:
    """Kills its worker process on the first call: Ray's own retry runs it again."""
    import os

    path = Path(marker)
    if not path.exists():
        path.write_text("died once")
        os._exit(1)
    return "survived"


def always_fails(reporter=None) -> None:
    """Raises every time."""
    raise ValueError("broken arm")


def test_a_failed_job_is_retried_once_then_reported(tmp_path):
    events = []
    jobs = [
        Job("flaky", flaky, {"marker": str(tmp_path / "flaky")}),
        Job("dies", dies_once, {"marker": str(tmp_path / "dies")}),
        Job("broken", always_fails),
    ]
    with make_executor("ray", ExecutorOptions(threads_per_job=1)) as runner:
        runner.check_resources(gpus_wanted=False)
        outcomes = runner.run(jobs, events.append)
    assert outcomes["flaky"].value == "second attempt" and outcomes["flaky"].attempts == 2
    assert outcomes["dies"].value == "survived"
    assert outcomes["broken"].error == "ValueError: broken arm" and outcomes["broken"].attempts == 2
    assert [e.state for e in events if e.job == "broken"][-1] == "failed"
    assert "retrying" in [e.state for e in events if e.job == "flaky"]


def slow_staged_job(final: str, reporter=None) -> None:
    """Writes into a staging folder, then works for a minute (until cancelled)."""
    from acdc_prune.io import staged_dir

    with staged_dir(Path(final)) as staging:
        (staging / "part.txt").write_text("half-written")
        for _ in range(600):  # Python code between short waits, as in training: Ray's interrupt lands
            time.sleep(0.1)


def raise_ctrl_c() -> None:
    raise KeyboardInterrupt


def send_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stop", [raise_ctrl_c, send_sigterm], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_cancels_running_jobs_and_leaves_no_folder(tmp_path, stop):
    arms = tmp_path / "arms"

    def stop_once_staged(event):
        deadline = time.time() + 20
        while event.state == "running" and not list(arms.glob(".*.partial")) and time.time() < deadline:
            time.sleep(0.1)
        if event.state == "running":
            stop()

    started = time.time()
    runner = make_executor("ray", ExecutorOptions(threads_per_job=1))
    with sigterm_as_ctrl_c(), runner, pytest.raises(Interrupted, match="run the same command to resume"):
        runner.run([Job("slow", slow_staged_job, {"final": str(arms / "slow")})], stop_once_staged)
    assert time.time() - started < 40
    assert list(arms.iterdir()) == []


def test_starting_ray_keeps_the_command_lines_sigterm_handler(monkeypatch):
    """``ray.init`` makes SIGTERM call ``sys.exit``, which would skip cancelling the arms."""

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

        def shutdown(self):
            pass

    monkeypatch.setattr(ray_executor, "import_ray", FakeRay)
    with sigterm_as_ctrl_c():
        ours = signal.getsignal(signal.SIGTERM)
        with make_executor("ray", ExecutorOptions(threads_per_job=1)):
            assert signal.getsignal(signal.SIGTERM) is ours
    default = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with make_executor("ray", ExecutorOptions(threads_per_job=1)):  # no handler of the caller's
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, ours)
    finally:
        signal.signal(signal.SIGTERM, default)


def test_bad_ray_inputs_are_one_line_and_start_nothing(workspace, monkeypatch):
    config = workspace / "ray.yaml"
    gpu = workspace / "gpu.yaml"
    gpu.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "name": "gpu", "gpus_per_arm": 1}))
    hidden = workspace / "hidden.yaml"
    hidden.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "name": "hidden"}))
    monkeypatch.setattr(ray_executor, "sees_file", lambda path: ("node-b", False))
    cases = {
        gpu: "asks for GPUs .* but the Ray cluster has none",
        hidden: "Ray workers on node-b cannot see the sweep folder .*hidden",
    }
    for sweep_file, message in cases.items():
        result = CliRunner().invoke(app, ["sweep", "-c", str(sweep_file), "--executor", "ray"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert re.search(message, lines[0]), lines[0]
        assert not (workspace / "runs" / "t" / sweep_file.stem / "arms").exists()
