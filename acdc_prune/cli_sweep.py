"""Commands over many runs: a ``sweep`` of pruning arms, ``sweep-eval`` on other data, and the ``demo``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from acdc_prune.cli_common import console, err_console, run_command

ExecutorOption = Annotated[
    str,
    typer.Option(
        help="Where jobs run: local (this process, one after the other) or ray (Ray tasks, in parallel)."
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster to join (host:port, ray://host:port or auto); default: a local Ray instance."
    ),
]


def _print_sweep_report(report_dir: Path, failed: dict[str, str], title: str) -> None:
    """The summary table of a sweep report, its folder, and the failed jobs (then exit 1)."""
    from rich.markup import escape

    from acdc_prune.experiments import report

    console.print(report.rich_table(report.read_summary(report_dir), title))
    console.print(f"report in [bold]{report_dir}[/]")
    for job, error in failed.items():
        err_console.print(
            f"[bold red]failed:[/] {escape(job)}: {escape(error)}", highlight=False, soft_wrap=True
        )
    if failed:
        raise typer.Exit(1)


def _run_jobs(start: Callable[..., Path], title: str) -> None:
    """Run the jobs of a sweep with progress bars, then print its report and the jobs that failed.

    Args:
        start: ``start(reporter=..., on_event=...)`` runs the jobs and returns the report folder.
        title: the title of the summary table.
    """
    from acdc_prune.render import RichReporter

    failed: dict[str, str] = {}

    def record(event: Any) -> None:
        if event.state == "failed":
            failed[event.job] = event.message

    with RichReporter(console) as reporter:
        report_dir = start(reporter=reporter, on_event=record)
    _print_sweep_report(report_dir, failed, title)


def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="Sweep YAML (see configs/demo-sweep.yaml).")],
    data: Annotated[
        Path | None, typer.Option(help="Data folder (sets data.root of the base config).")
    ] = None,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
) -> None:
    """Baselines, then every setting x mode x seed: prune, retrain, evaluate; re-running resumes.

    A setting is a criterion x scope x block ratios, or a criterion x budget target.

    Example: acdc-prune sweep -c configs/acdc-sweep.yaml --data ~/ACDC/training --executor ray
    """

    def body() -> None:
        from acdc_prune.experiments.sweep import load_sweep, run_sweep

        spec, base_dir = load_sweep(config)
        start = functools.partial(
            run_sweep, spec, base_dir, data=data, executor=executor, ray_address=ray_address
        )
        _run_jobs(start, f"{spec.name}: validation, after retraining")

    run_command(body)


def sweep_eval(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep folder (the one holding report/sweep.json).")],
    data: Annotated[Path, typer.Option(help="Labelled data folder (ACDC or nnU-Net raw layout).")],
    name: Annotated[
        str | None, typer.Option(help="Writes SWEEP/eval-<name>/ (default: the data folder's name).")
    ] = None,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
) -> None:
    """Evaluate the baselines and every finished arm of a sweep on another labelled data set.

    The sweep's own results are never touched; re-running skips finished evaluations.

    Example: acdc-prune sweep-eval runs/acdc/acdc --data ~/data/other-site --executor ray
    """

    def body() -> None:
        from acdc_prune.experiments.sweep import evaluate_sweep

        start = functools.partial(
            evaluate_sweep, sweep_dir, data, name=name, executor=executor, ray_address=ray_address
        )
        _run_jobs(start, f"{sweep_dir.name} on {data.name}")

    run_command(body)


def demo(
    data: Annotated[
        Path | None, typer.Option(help="Real ACDC training folder (default: the phantom).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Root folder of the results.")] = Path("runs"),
) -> None:
    """The whole pipeline on the phantom: train, prune to 40% of the MACs, retrain under 3 modes, compare.

    Example: acdc-prune demo            (or: acdc-prune demo --data ~/ACDC/training)
    """

    def body() -> None:
        from acdc_prune.experiments.demo import run_demo

        report_dir = run_demo(data=data, runs_dir=runs_dir, console=console)
        _print_sweep_report(report_dir, {}, "demo: validation, after retraining")

    run_command(body)
