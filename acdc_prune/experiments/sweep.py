"""Sweeps: one baseline, then every ratios setting x re-initialisation mode, resumable, with a report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from acdc_prune.config import Config, from_mapping, load_config, read_yaml, spec, validate_ratios
from acdc_prune.errors import CheckpointError, ConfigError
from acdc_prune.experiments import report
from acdc_prune.experiments.prune import REINIT_MODES
from acdc_prune.io import atomic_write_json, check_name, read_json, remove_leftovers, staged_dir


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
    """The named and uniform ratios settings of ``sweep``, checked (names, values, at least one arm)."""
    check_name(sweep.name, "sweep name")
    settings = {name: validate_ratios(ratios, f"ratios.{name}") for name, ratios in sweep.ratios.items()}
    for ratio in sweep.uniform:
        settings[f"uniform-{ratio:g}"] = {"default": ratio}
    for name in settings:
        check_name(name, "ratios setting name")
    if not settings or not (sweep.modes or sweep.scratch):
        raise ConfigError("the sweep has no arms: give at least one ratios setting and one mode")
    return settings


def _trained_epochs(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir/last.pt`` (0 when there is none)."""
    from acdc_prune.engine.checkpoints import read_checkpoint

    last = run_dir / "last.pt"
    return int(read_checkpoint(last)["epoch"]) if last.is_file() else 0


def ensure_baseline(config: Config, run_dir: Path, console: Console) -> None:
    """Train the baseline into ``run_dir``, resuming an interrupted one, skipping a finished one."""
    from acdc_prune.engine.trainer import train

    done = _trained_epochs(run_dir)
    if done >= config.training.epochs:
        console.print(f"baseline in {run_dir} already trained ({done} epochs): skipped")
        return
    if done > 0:
        console.print(f"resuming baseline in {run_dir} from epoch {done}")
        train(config, resume=run_dir, console=console)
    else:
        train(config, run_dir=run_dir, console=console)


def evaluate_once(model_dir: Path, out_dir: Path, console: Console) -> dict[str, Any]:
    """The validation summary of the model in ``model_dir``, computed once into ``out_dir``."""
    from acdc_prune.engine.checkpoints import load_model
    from acdc_prune.experiments.evaluation import evaluate_records, validation_records

    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        model, config, _ = load_model(model_dir)
        with staged_dir(out_dir) as staging:
            evaluate_records(model, config, validation_records(config), staging, console)
    return read_json(summary_path, f"delete {out_dir} and run the sweep again")


def _arms(sweep: SweepConfig, base: Config) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(arm name, setting, mode, prune_run keyword arguments)`` for every arm of the sweep."""
    arms = []
    for setting, ratios in sweep_settings(sweep).items():
        for mode in sweep.modes:
            kwargs = {"reinit": mode, "retrain_epochs": sweep.retrain_epochs, "retrain_lr": sweep.retrain_lr}
            arms.append((f"{setting}-{mode}", setting, mode, {**kwargs, "ratios": ratios}))
        if sweep.scratch:
            kwargs = {
                "reinit": "random",
                "retrain_epochs": base.training.epochs,
                "retrain_lr": base.training.lr,
            }
            arms.append((f"{setting}-scratch", setting, "scratch", {**kwargs, "ratios": ratios}))
    return arms


def _arm_result(arm_dir: Path) -> dict[str, Any]:
    """The ``result.json`` of a finished arm (see ``prune_run``)."""
    return read_json(arm_dir / "result.json", f"delete {arm_dir} and run the sweep again")


def run_sweep(
    sweep: SweepConfig,
    base_dir: Path,
    *,
    data: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Run (or resume) a sweep and write its report; returns the report folder.

    Layout: ``<runs_dir>/<experiment>/<name>/`` with ``baseline/`` (a training run), ``baseline_eval/``,
    ``arms/<setting>-<mode>/`` (pruned child folders, see ``prune_run``) and ``report/``. An arm
    folder exists only once it is complete, so re-running the sweep skips finished arms and redoes
    the rest.

    Args:
        sweep: the validated sweep.
        base_dir: folder that ``sweep.config`` is relative to.
        data: data folder overriding the base config's ``data.root``.
        console: rich console.
    """
    from acdc_prune.experiments.prune import prune_run

    console = console or Console()
    overrides = [*sweep.overrides, *([f"data.root={data}"] if data is not None else [])]
    base = load_config(base_dir / sweep.config if sweep.config else None, overrides)
    root = Path(base.logging.runs_dir) / base.logging.experiment / sweep.name
    arms = _arms(sweep, base)
    for folder in (root, root / "arms"):
        remove_leftovers(folder)  # staging folders of steps that a killed earlier attempt left unfinished
    # Results of arms finished earlier are read first: a damaged one stops the sweep before new work.
    finished = {
        arm: _arm_result(root / "arms" / arm)
        for arm, *_ in arms
        if (root / "arms" / arm / "result.json").is_file()
    }

    baseline_dir = Path(sweep.baseline) if sweep.baseline else root / "baseline"
    if sweep.baseline:
        if not (baseline_dir / "best.pt").is_file():
            raise CheckpointError(f"baseline run {baseline_dir} has no best.pt")
    else:
        ensure_baseline(base, baseline_dir, console)
    baseline_summary = evaluate_once(baseline_dir, root / "baseline_eval", console)
    rows = [report.summary_row("baseline", "-", "baseline", None, baseline_summary)]
    curves = {"baseline": pd.read_csv(baseline_dir / "metrics.csv")}
    modes = {"baseline": "baseline"}

    for index, (arm, setting, mode, kwargs) in enumerate(arms, start=1):
        arm_dir = root / "arms" / arm
        if arm in finished:
            console.print(f"[{index}/{len(arms)}] {arm}: finished earlier, skipped")
            result = finished[arm]
        else:
            console.rule(f"[{index}/{len(arms)}] {arm}")
            rewind_to = sweep.rewind_to if mode == "rewind" else None
            prune_run(baseline_dir, out_dir=arm_dir, rewind_to=rewind_to, console=console, **kwargs)
            result = _arm_result(arm_dir)
        rows.append(report.summary_row(arm, setting, mode, result["before"], result["after"]))
        if (arm_dir / "metrics.csv").is_file():
            curves[arm] = pd.read_csv(arm_dir / "metrics.csv")
            modes[arm] = mode

    report_dir = root / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    frame = report.comparison_frame(rows)
    report.write_tables(frame, report_dir)
    report.plot_pareto(frame, report_dir / "pareto.png")
    report.plot_training_curves(curves, modes, report_dir / "curves.png")
    atomic_write_json(
        report_dir / "sweep.json", {"baseline": str(baseline_dir), "arms": [a[0] for a in arms]}
    )
    console.print(report.rich_table(frame, f"{sweep.name}: validation, after retraining"))
    console.print(f"report in [bold]{report_dir}[/]")
    return report_dir
