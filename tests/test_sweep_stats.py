"""Sweeps without training: bootstrap intervals, seed report, plan, lock, executors, one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import from_mapping
from acdc_prune.errors import ConfigError
from acdc_prune.experiments import executors, report
from acdc_prune.experiments.executors import EXECUTORS, Executor, ExecutorOptions, Job, make_executor
from acdc_prune.experiments.stats import paired_bootstrap
from acdc_prune.experiments.sweep import SweepConfig, SweepError, folder_lock, plan_sweep, sweep_settings


def test_bootstrap_interval_matches_a_hand_computed_case():
    a, b = np.array([0.90, 0.80, 0.70]), np.array([0.85, 0.80, 0.60])
    diff = a - b  # 0.05, 0.00, 0.10
    result = paired_bootstrap(a, b, resamples=5, confidence=0.8, seed=3)
    indices = np.random.default_rng(3).integers(0, 3, size=(5, 3))
    means = sorted(diff[row].sum() / 3 for row in indices)
    # percentiles 10 and 90 of 5 sorted values, linear interpolation: positions 0.4 and 3.6
    low = means[0] + 0.4 * (means[1] - means[0])
    high = means[3] + 0.6 * (means[4] - means[3])
    assert result.n == 3
    assert result.mean == pytest.approx(0.05)
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))
    assert paired_bootstrap(a, b, resamples=5, confidence=0.8, seed=3) == result


def test_bootstrap_constant_difference_and_degenerate_inputs():
    shifted = paired_bootstrap(np.full(4, 0.8), np.full(4, 0.9))
    assert (shifted.mean, shifted.low, shifted.high) == pytest.approx((-0.1, -0.1, -0.1))
    assert shifted.significant
    noisy = paired_bootstrap(np.array([0.1, -0.1, 0.2, -0.2]), np.zeros(4))
    assert noisy.low < 0 < noisy.high and not noisy.significant
    with_nan = paired_bootstrap(np.array([0.5, np.nan, 0.7]), np.array([0.4, 0.1, np.nan]))
    assert with_nan.n == 1 and np.isnan(with_nan.low) and not with_nan.significant
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(np.zeros(3), np.zeros(2))


def _run(tmp_path, arm, group, mode, seed, volume_dice):
    """A ReportRun with a per-volume table of 6 patients x (ED, ES) and a matching summary."""
    patients = [f"patient{i:03d}" for i in range(1, 7)]
    table = pd.DataFrame(
        {
            "patient": [p for p in patients for _ in range(2)],
            "phase": ["ED", "ES"] * len(patients),
            "mean_dice": volume_dice,
        }
    )
    path = tmp_path / f"{arm}.csv"
    table.to_csv(path, index=False)
    params = 1000 if mode == "baseline" else 400
    summary = {"mean_dice": float(np.mean(volume_dice)), "cost": {"params": params, "macs": 10 * params}}
    before = None if mode == "baseline" else {"mean_dice": 0.1}
    setting = "-" if mode == "baseline" else "half"
    return report.ReportRun(arm, group, setting, mode, seed, summary, before, path)


def test_report_gives_mean_std_over_seeds_and_paired_intervals(tmp_path):
    base = np.linspace(0.80, 0.91, 12)
    wobble = np.tile([0.02, -0.02], 6)
    runs = [
        _run(tmp_path, "baseline", "baseline", "baseline", None, base),
        _run(tmp_path, "half-none-s0", "half-none", "none", 0, base - 0.05),
        _run(tmp_path, "half-none-s1", "half-none", "none", 1, base - 0.07),
        _run(tmp_path, "half-rewind-s0", "half-rewind", "rewind", 0, base + wobble),
        _run(tmp_path, "half-rewind-s1", "half-rewind", "rewind", 1, base - wobble),
    ]
    out = tmp_path / "report"
    report.write_report(runs, out)
    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    assert list(summary.index) == ["baseline", "half-none", "half-rewind"]
    assert list(summary["n_seeds"]) == [1, 2, 2]
    none = summary.loc["half-none"]
    assert none["dice"] == pytest.approx(base.mean() - 0.06)
    assert none["dice_std"] == pytest.approx(np.std([0.05, 0.07], ddof=1))
    assert none["params_pct"] == pytest.approx(40.0)
    assert none["paired_diff"] == pytest.approx(-0.06) and bool(none["significant"])
    assert none["ci_low"] == pytest.approx(-0.06) and none["ci_high"] == pytest.approx(-0.06)
    rewind = summary.loc["half-rewind"]
    assert rewind["paired_diff"] == pytest.approx(0.0, abs=1e-12) and not bool(rewind["significant"])
    significance = pd.read_csv(out / "significance.csv")
    pairs = [tuple(row) for row in significance[["a", "b"]].to_numpy()]
    assert pairs == [("half-none", "baseline"), ("half-rewind", "baseline"), ("half-none", "half-rewind")]
    assert significance["n_patients"].tolist() == [6, 6, 6]
    assert "± 0.0141" in (out / "summary.md").read_text()
    table = pd.read_csv(out / "comparison.csv")
    assert table.columns[:5].tolist() == ["arm", "setting", "mode", "params", "params_pct"]
    assert table["seed"].tolist()[1:] == [0, 1, 0, 1]
    assert (out / "pareto.png").stat().st_size > 1000


def _sweep(tmp_path, **extra):
    """A validated sweep whose base config writes under ``tmp_path/runs``."""
    raw = {"name": "s", "overrides": [f"logging.runs_dir={tmp_path / 'runs'}"], "modes": ["none", "random"]}
    return from_mapping(SweepConfig, {**raw, **extra})


def test_plan_repeats_every_arm_per_seed(tmp_path):
    plan = plan_sweep(_sweep(tmp_path, seeds=[0, 1]), tmp_path)
    names = [arm.name for arm in plan.arms]
    assert names == ["half-none-s0", "half-none-s1", "half-random-s0", "half-random-s1"]
    assert list(plan.baselines) == [None]
    assert plan.arms[1].overrides[-1] == "training.seed=1"
    assert all(o.split("=")[1].strip('"').startswith("/") for o in plan.arms[0].baseline.overrides)
    per_seed = plan_sweep(_sweep(tmp_path, seeds=[3, 4], seed_baseline=True), tmp_path)
    assert [b.name for b in per_seed.baselines.values()] == ["baseline-s3", "baseline-s4"]
    assert per_seed.baselines[4].config.training.seed == 4
    assert per_seed.arms[1].baseline.name == "baseline-s4"
    assert [arm.name for arm in plan_sweep(_sweep(tmp_path), tmp_path).arms] == ["half-none", "half-random"]


def test_seed_settings_are_checked():
    with pytest.raises(ConfigError, match="repeat a seed"):
        sweep_settings(from_mapping(SweepConfig, {"seeds": [0, 0]}))
    with pytest.raises(ConfigError, match="seed_baseline .* give seeds and no baseline run"):
        sweep_settings(from_mapping(SweepConfig, {"seed_baseline": True}))
    with pytest.raises(ConfigError, match=r"threads_per_arm: 0 is out of range"):
        from_mapping(SweepConfig, {"threads_per_arm": 0})


def test_folder_lock_refuses_a_live_sweep_and_takes_over_a_dead_ones(tmp_path):
    lock = tmp_path / ".sweep.lock"
    with folder_lock(tmp_path):
        assert yaml.safe_load(lock.read_text())["pid"] == os.getpid()
        refused = f"another sweep \\(PID {os.getpid()} on .*\\) is running"
        with pytest.raises(SweepError, match=refused), folder_lock(tmp_path):
            pass
    assert not lock.exists()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(f'{{"pid": {int(gone.stdout)}, "host": "{socket.gethostname()}"}}')
    with folder_lock(tmp_path):
        assert yaml.safe_load(lock.read_text())["pid"] == os.getpid()
    lock.write_text('{"pid": 1, "host": "another-node"}')
    with pytest.raises(SweepError, match="PID 1 on another-node"), folder_lock(tmp_path):
        pass
    assert lock.exists() and list(tmp_path.glob(".*.tmp")) == []


def test_local_executor_retries_a_failed_job_once_and_goes_on():
    calls = {"flaky": 0, "broken": 0}

    def flaky(reporter=None):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("transient")
        return "ok"

    def broken(reporter=None):
        calls["broken"] += 1
        raise ValueError("always")

    events = []
    with make_executor("local", ExecutorOptions()) as runner:
        outcomes = runner.run(
            [Job("flaky", flaky), Job("broken", broken), Job("fine", lambda reporter: 1)], events.append
        )
    assert outcomes["flaky"].value == "ok" and outcomes["flaky"].attempts == 2
    assert outcomes["broken"].error == "ValueError: always" and calls["broken"] == 2
    assert outcomes["fine"].value == 1 and outcomes["fine"].end >= outcomes["fine"].start
    states = [(e.job, e.state) for e in events]
    assert ("flaky", "retrying") in states and ("broken", "failed") in states and ("fine", "done") in states
    assert [e.describe() for e in events if e.state == "retrying"][
        0
    ] == "flaky: failed, retrying (RuntimeError: transient)"


def test_executors_come_from_a_registry_users_extend(monkeypatch):
    class Inline(Executor):
        def check_resources(self, gpus_wanted):
            pass

        def check_folder(self, folder):
            pass

        def run(self, jobs, on_event):
            return {
                job.name: executors.JobOutcome(job.name, value=job.fn(**job.kwargs, reporter=None))
                for job in jobs
            }

    monkeypatch.setitem(EXECUTORS, "inline", Inline)
    executors.register_executor("inline")(Inline)
    with make_executor("inline", ExecutorOptions()) as runner:
        assert runner.run([Job("j", lambda x, reporter: x + 1, {"x": 1})], print)["j"].value == 2
    with pytest.raises(ConfigError, match="executor 'dask' is not one of local, ray, inline"):
        make_executor("dask", ExecutorOptions())


def _one_line_error(tmp_path, sweep_extra, args):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"name": "s", "overrides": [f"logging.runs_dir={tmp_path / 'runs'}"], **sweep_extra})
    )
    result = CliRunner().invoke(app, ["sweep", "-c", str(sweep_file), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert not (tmp_path / "runs" / "default" / "s" / "baseline").exists()
    return lines[0]


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    line = _one_line_error(tmp_path, {}, ["--executor", "ray"])
    assert line == 'error: the ray executor needs Ray, which is not installed: pip install "acdc-prune[ray]"'


def test_unreachable_ray_address_is_one_line(tmp_path):
    pytest.importorskip("ray")
    line = _one_line_error(tmp_path, {}, ["--executor", "ray", "--ray-address", "127.0.0.1:9"])
    assert line.startswith("error: cannot reach the Ray cluster at 127.0.0.1:9")
    assert "--ray-address" in _one_line_error(tmp_path, {}, ["--executor", "ray", "--ray-address", "nowhere"])


def test_unknown_executor_gpus_without_gpu_and_a_locked_folder_are_one_line(tmp_path):
    assert "not one of local, ray" in _one_line_error(tmp_path, {}, ["--executor", "slurm"])
    import torch

    if not torch.cuda.is_available():
        assert "asks for GPUs" in _one_line_error(tmp_path, {"gpus_per_arm": 1}, [])
    folder = tmp_path / "runs" / "default" / "s"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".sweep.lock").write_text(f'{{"pid": {os.getpid()}, "host": "{socket.gethostname()}"}}')
    assert f"another sweep (PID {os.getpid()}" in _one_line_error(tmp_path, {}, [])


def test_a_baseline_run_without_a_postprocessing_choice_needs_one_rule(tmp_path):
    """``auto`` would score such a baseline raw and its retrained arms by their own recorded choice."""
    from acdc_prune.config import Config
    from acdc_prune.engine.checkpoints import Checkpoint
    from acdc_prune.models import build_model

    config = Config()
    config.model.features = [4, 8]
    run_dir = tmp_path / "old"
    Checkpoint.of(build_model(config.model), config, epoch=1).save(run_dir / "best.pt")
    model_overrides = [f"logging.runs_dir={tmp_path / 'runs'}", "model.features=[4,8]"]
    with pytest.raises(ConfigError, match="records no post-processing choice.*largest_component=true"):
        plan_sweep(_sweep(tmp_path, baseline=str(run_dir), overrides=model_overrides), tmp_path)
    one_rule = [*model_overrides, "evaluation.largest_component=true"]
    plan = plan_sweep(_sweep(tmp_path, baseline=str(run_dir), overrides=one_rule), tmp_path)
    assert plan.baselines[None].run_dir == run_dir.resolve()
    chosen = {"postprocessing": {"largest_component": False}}
    Checkpoint.of(build_model(config.model), config, epoch=1, state=chosen).save(tmp_path / "new" / "best.pt")
    assert plan_sweep(_sweep(tmp_path, baseline=str(tmp_path / "new"), overrides=model_overrides), tmp_path)
