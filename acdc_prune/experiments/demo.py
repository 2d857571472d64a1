"""The demo: the whole prune-and-compare pipeline on the phantom (or a real ACDC folder) in one call."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rich.console import Console

from acdc_prune.experiments.sweep import load_sweep, run_sweep
from acdc_prune.io import unused_path


def preset(name: str) -> Path:
    """Path of a config shipped with the package (``configs/<name>`` in the repository)."""
    return Path(str(files("acdc_prune.configs") / name))


def run_demo(data: Path | None = None, runs_dir: Path | None = None, console: Console | None = None) -> Path:
    """Generate the phantom (unless ``data`` is given), train a small baseline, prune it to 40% of
    its MACs, retrain under none / lr_rewind / rewind, evaluate and print the comparison.

    Args:
        data: a real ACDC training folder; the demo then uses ``configs/acdc-sweep.yaml``.
        runs_dir: root of the results (default ``runs``); each demo gets a new folder there.
        console: rich console.

    Returns:
        The report folder.
    """
    sweep, base_dir = load_sweep(preset("acdc-sweep.yaml" if data is not None else "demo-sweep.yaml"))
    runs_dir = Path(runs_dir or "runs")
    sweep.overrides = [*sweep.overrides, f"logging.runs_dir={runs_dir}", "logging.experiment=demo"]
    sweep.name = unused_path(runs_dir / "demo", prefix=f"{sweep.name}-").name
    return run_sweep(sweep, base_dir, data=data, console=console)
