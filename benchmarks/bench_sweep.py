"""Sweep benchmark: wall time of a 4-arm phantom sweep on Ray (2 workers x 1 thread) against local runs.

    python benchmarks/bench_sweep.py --out benchmarks/results/sweep.json

A small baseline of ``configs/demo.yaml`` (the 20-patient phantom, UNet 16-128, 96x96 crops) is
trained once, untimed. Then the same sweep (uniform ratios 0.35 and 0.5 x modes none and rewind,
``--retrain-epochs`` epochs of 20 batches each, the baseline given as an existing run) runs as
``acdc-prune sweep`` in a fresh process per variant, timed from process start to exit:

- ``ray``: a local Ray instance (as many CPUs as the machine has: 2 here), ``threads_per_arm: 1``, so
  2 arms run at once on 1 torch thread each;
- ``local, 2 threads``: one arm after the other on ``training.num_threads: 2``: the same total threads
  (the comparison the ratio is taken against);
- ``local, 1 thread``: one arm after the other on 1 thread, each arm as on Ray.

Each local process runs with ``OMP_NUM_THREADS`` equal to its threads, so that the evaluations run on
them as well as the training (Ray sets it to the task's CPUs in its workers).

Every variant evaluates the baseline once and writes the full report. Each round runs every variant
once, in an order rotated from round to round so that a change of the machine's load hits all of
them; the table gives the median over ``--repeats`` rounds of the wall time, of the time from process
start to the first arm's start (Ray start, worker start, baseline evaluation) and of the mean seconds
per arm (``timing.json``), and the ratio of the medians to ``local, 2 threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from acdc_prune.config import load_config
from acdc_prune.engine.trainer import train

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("uniform-0.35-none", "uniform-0.35-rewind", "uniform-0.5-none", "uniform-0.5-rewind")
VARIANTS = {
    "ray": {"executor": "ray", "threads": 1},
    "local, 2 threads": {"executor": "local", "threads": 2},
    "local, 1 thread": {"executor": "local", "threads": 1},
}


def base_overrides(work: Path, threads: int) -> list[str]:
    """Overrides of ``configs/demo.yaml``: results under ``work``, no progress bars, ``threads`` threads."""
    return [
        f"logging.runs_dir={work / 'runs'}",
        f"data.cache_dir={work / 'cache'}",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"training.num_threads={threads}",
        "evaluation.latency_repeats=5",
        "evaluation.overlays=0",
    ]


def train_baseline(work: Path, epochs: int) -> Path:
    """The untimed baseline: ``configs/demo.yaml`` for ``epochs`` epochs on 2 threads (one trained in
    ``work`` earlier is reused)."""
    if (work / "baseline" / "best.pt").is_file():
        return work / "baseline"
    overrides = [*base_overrides(work, 2), f"training.epochs={epochs}", "training.checkpoint_epochs=[2]"]
    config = load_config(ROOT / "configs" / "demo.yaml", overrides)
    return train(config, run_dir=work / "baseline").run_dir


def timed_sweep(work: Path, baseline: Path, label: str, retrain_epochs: int, round_: int) -> dict:
    """Run the sweep of ``label`` in a fresh ``acdc-prune`` process; wall time and per-arm timings."""
    variant = VARIANTS[label]
    name = label.replace(", ", "-").replace(" ", "") + f"-{round_}"
    sweep = {
        "name": name,
        "config": str(ROOT / "configs" / "demo.yaml"),
        "overrides": base_overrides(work, variant["threads"]),
        "baseline": str(baseline),
        "ratios": {},
        "uniform": [0.35, 0.5],
        "modes": ["none", "rewind"],
        "retrain_epochs": retrain_epochs,
        "rewind_to": "epoch2",
        "threads_per_arm": variant["threads"],
    }
    sweep_file = work / f"{name}.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    command = [
        sys.executable,
        "-m",
        "acdc_prune",
        "sweep",
        "-c",
        str(sweep_file),
        "--executor",
        variant["executor"],
    ]
    env = dict(os.environ)
    if variant["executor"] == "local":  # evaluation too on these threads, as Ray does in its workers
        env["OMP_NUM_THREADS"] = str(variant["threads"])
    start = time.time()
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    wall = time.time() - start
    arms_dir = work / "runs" / "demo" / name / "arms"
    timings = [json.loads((arms_dir / arm / "timing.json").read_text()) for arm in ARMS]
    return {
        "variant": label,
        "round": round_,
        "command": " ".join(command[1:]),
        "load_average": os.getloadavg(),
        "wall_s": wall,
        "to_first_arm_s": min(t["start"] for t in timings) - start,
        "arm_s": [t["seconds"] for t in timings],
        "mean_arm_s": statistics.mean(t["seconds"] for t in timings),
    }


def medians(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per variant, the median over rounds of the wall time, time to first arm and mean arm time."""
    keys = ("wall_s", "to_first_arm_s", "mean_arm_s")
    return {
        label: {key: statistics.median(r[key] for r in runs if r["variant"] == label) for key in keys}
        for label in VARIANTS
    }


def table(summary: dict[str, dict[str, float]], repeats: int) -> Table:
    """The medians as a rich table, with each wall time relative to ``local, 2 threads``."""
    out = Table(title=f"4-arm phantom sweep (configs/demo.yaml), median of {repeats} rounds")
    for header in ("executor", "wall s", "to first arm s", "s per arm", "vs local 2 threads"):
        out.add_column(header, justify="left" if header == "executor" else "right", no_wrap=True)
    reference = summary["local, 2 threads"]["wall_s"]
    for label, m in summary.items():
        ratio = f"{m['wall_s'] / reference:.2f}"
        out.add_row(
            label, f"{m['wall_s']:.1f}", f"{m['to_first_arm_s']:.1f}", f"{m['mean_arm_s']:.1f}", ratio
        )
    return out


def main() -> None:
    """Parse arguments, train the baseline, time the variants round by round, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep.json")
    parser.add_argument("--baseline-epochs", type=int, default=4, help="epochs of the untimed baseline")
    parser.add_argument("--retrain-epochs", type=int, default=6, help="retraining epochs of each arm")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs every variant once)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    console = Console()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    load_before = os.getloadavg()
    baseline = train_baseline(work, args.baseline_epochs)
    labels = list(VARIANTS)
    runs = []
    for round_ in range(args.repeats):
        order = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
        runs += [timed_sweep(work, baseline, label, args.retrain_epochs, round_) for label in order]
    summary = medians(runs)
    ratio = summary["ray"]["wall_s"] / summary["local, 2 threads"]["wall_s"]
    console.print(table(summary, args.repeats))
    console.print(f"ray / local (same total threads): {ratio:.2f} (target <= 0.65)")
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "baseline_epochs": args.baseline_epochs,
        "retrain_epochs": args.retrain_epochs,
        "arms": list(ARMS),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runs": runs,
        "medians": summary,
        "ratio_ray_to_local_same_threads": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
