"""Re-evaluation of a finished sweep's baselines and arms on another labelled data set (``sweep-eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from acdc_prune.experiments import report
from acdc_prune.experiments.executors import ExecutorOptions, Job
from acdc_prune.experiments.sweep_jobs import Execution, evaluation_job, open_session
from acdc_prune.experiments.sweep_plan import MANIFEST, report_run
from acdc_prune.io import atomic_write_json, check_name, read_json

if TYPE_CHECKING:
    from typing_extensions import Unpack


def _evaluation_dir(out: Path, model: dict[str, Any]) -> Path:
    """Where ``sweep-eval`` writes the evaluation of one model of ``sweep.json``."""
    return out / model["name"] if model["group"] == "baseline" else out / "arms" / model["name"]


def _evaluation_runs(models: list[dict[str, Any]], out: Path) -> list[report.ReportRun]:
    """The models of ``sweep.json`` evaluated into ``out``, as the report reads them."""
    runs = []
    for model in models:
        eval_dir = _evaluation_dir(out, model)
        if (eval_dir / "summary.json").is_file():
            summary = read_json(eval_dir / "summary.json", f"delete {eval_dir} and run sweep-eval again")
            runs.append(report_run(model, summary, None, eval_dir / "per_volume.csv"))
    return runs


def _evaluation_jobs(models: list[dict[str, Any]], out: Path, data: Path) -> list[tuple[Job, Path]]:
    """A job evaluating each model of ``sweep.json`` on ``data`` into ``out``, with its done marker."""
    jobs = []
    for model in models:
        eval_dir = _evaluation_dir(out, model)
        kwargs = {
            "model_dir": Path(model["dir"]),
            "out_dir": eval_dir,
            "data": data,
            "overrides": model["overrides"],
        }
        jobs.append((Job(model["name"], evaluation_job, kwargs), eval_dir / "summary.json"))
    return jobs


def evaluate_sweep(
    sweep_dir: Path, data: Path, *, name: str | None = None, **execution: Unpack[Execution]
) -> Path:
    """Evaluate the baselines and every finished arm of a sweep on another labelled data folder.

    Writes ``SWEEP/eval-<name>/``: ``<baseline>/`` and ``arms/<arm>/`` (evaluation folders: per-volume
    CSV, summary, overlays) and ``report/`` (the tables and Pareto plot of
    :func:`acdc_prune.experiments.report.write_report`, Dice before retraining left empty, and
    ``sweep_eval.json``). Nothing of the sweep itself is written; re-running skips finished
    evaluations. Jobs run on the executor with the sweep's resources (``sweep.json``).

    Args:
        sweep_dir: a sweep folder whose ``report/sweep.json`` exists (the sweep ran to its end).
        data: a labelled ACDC or nnU-Net raw folder.
        name: the evaluation's name (default: the data folder's name).
        execution: ``executor``, ``ray_address``, ``reporter``, ``on_event``, ``console`` (see
            :class:`~acdc_prune.experiments.sweep_jobs.Execution`).

    Returns:
        The new report folder.

    Raises:
        CheckpointError: no ``sweep.json``; DataError: ``data`` is not a labelled data set; and the
            executor and lock errors of ``run_sweep``.
    """
    from acdc_prune.data import discover

    sweep_dir = Path(sweep_dir).expanduser().resolve()
    manifest = read_json(sweep_dir / "report" / MANIFEST, "run the sweep to its end first (acdc-prune sweep)")
    data = Path(data).expanduser().resolve()
    discover(data, layout="auto", require_labels=True)  # a bad folder is refused before any worker starts
    out = sweep_dir / f"eval-{check_name(name or data.name, 'evaluation name')}"
    models = [model for model in manifest["models"] if (Path(model["dir"]) / "best.pt").is_file()]
    resources = ExecutorOptions(manifest["threads_per_arm"], manifest["gpus_per_arm"])
    with open_session(out, resources, manifest["gpus_wanted"], **execution) as session:
        outcomes = session.run(_evaluation_jobs(models, out, data))
        failed = {job: outcome.error for job, outcome in outcomes.items() if not outcome.ok}
        report_dir = out / "report"
        report.write_report(_evaluation_runs(models, out), report_dir)
        details = {
            "sweep": str(sweep_dir),
            "data": str(data),
            "executor": session.runner.name,
            "failed": failed,
        }
        atomic_write_json(report_dir / "sweep_eval.json", details)
    return report_dir
