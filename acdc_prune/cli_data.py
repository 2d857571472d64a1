"""The ``data`` and ``config`` command groups: check or generate data sets, show the config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from acdc_prune.cli_common import ConfigOption, SetOption, config_from_options, console, run_command

data_app = typer.Typer(help="Check or generate data sets.", no_args_is_help=True)
config_app = typer.Typer(help="Show the config schema and resolved configs.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML.

    Example: acdc-prune config show -c configs/demo.yaml --set training.epochs=5
    """

    def body() -> None:
        import yaml

        console.print(
            yaml.safe_dump(config_from_options(config, overrides).to_dict(), sort_keys=False), highlight=False
        )

    run_command(body)


@config_app.command("keys")
def config_keys() -> None:
    """List every config key with its type, default and meaning.

    Example: acdc-prune config keys
    """
    from rich.table import Table

    from acdc_prune.config import describe_fields

    table = Table("key", "type", "default", "meaning")
    for key, type_name, default, doc in describe_fields():
        table.add_row(key, type_name, repr(default), doc)
    console.print(table)


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Data set folder (ACDC or nnU-Net raw layout).")],
    layout: Annotated[str, typer.Option(help="auto, acdc or nnunet.")] = "auto",
) -> None:
    """Summarise a data set and list every problem found; exits 1 if there are problems.

    Example: acdc-prune data check ~/ACDC/training
    """

    def body() -> None:
        from rich.table import Table

        from acdc_prune.data import check_dataset

        report = check_dataset(path, layout=layout)
        table = Table("property", "value", title=f"data set {path}", show_header=False)
        for name, value in report.summary_rows():
            table.add_row(name, value)
        console.print(table)
        for problem in report.problems:
            console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        if not report.ok:
            console.print(f"[bold red]{len(report.problems)} problem(s) found[/]")
            raise typer.Exit(1)
        console.print("[green]no problems found[/]")

    run_command(body)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must not exist or be empty).")],
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, help="Number of patients.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Seed; the same seed gives byte-identical files.")] = 0,
) -> None:
    """Write a phantom data set in the ACDC layout (no download needed).

    Example: acdc-prune data synth phantom/ --patients 20 --seed 0
    """

    def body() -> None:
        from acdc_prune.data import synthesize_dataset

        root = synthesize_dataset(out, patients, seed)
        console.print(f"wrote {patients} phantom patients to [bold]{root}[/]")

    run_command(body)
