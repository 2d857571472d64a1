"""The ``acdc-prune`` command line: parse arguments, call the library, print with rich.

Heavy libraries (torch, MONAI) are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="Train, prune and evaluate 2D U-Nets on short-axis cardiac MRI (ACDC) with MONAI.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check or generate data sets.", no_args_is_help=True)
config_app = typer.Typer(help="Show the config schema and resolved configs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

_state = {"debug": False}

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/); defaults fill the rest.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, repeatable: --set training.epochs=5"),
]


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """acdc-prune: structured pruning of cardiac segmentation U-Nets, measured honestly."""
    _state["debug"] = debug


def _run(action: Callable[[], Any]) -> Any:
    """Run a command body; report known errors as one line and exit non-zero (traceback with --debug)."""
    from rich.markup import escape

    from acdc_prune.errors import AcdcPruneError

    try:
        return action()
    except typer.Exit:
        raise
    except AcdcPruneError as err:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as err:
        detail = f": {escape(str(err))}" if str(err) else ""
        err_console.print(f"[yellow]interrupted[/]{detail}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except (OSError, MemoryError) as err:
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]error:[/] {err.__class__.__name__}: {escape(str(err))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except Exception as err:
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]unexpected error:[/] {err.__class__.__name__}: {escape(str(err))} "
            "(--debug shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _load_config(config: Path | None, overrides: list[str] | None, data: Path | None = None):
    from acdc_prune.config import load_config

    extra = [f"data.root={data}"] if data is not None else []
    return load_config(config, [*(overrides or []), *extra])


@config_app.command("show")
def config_show(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML.

    Example: acdc-prune config show -c configs/demo.yaml --set training.epochs=5
    """

    def body() -> None:
        import yaml

        console.print(
            yaml.safe_dump(_load_config(config, overrides).to_dict(), sort_keys=False), highlight=False
        )

    _run(body)


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

    _run(body)


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

    _run(body)


@app.command()
def train(
    config: ConfigOption = None,
    data: Annotated[Path | None, typer.Option(help="Data folder (sets data.root; default: phantom).")] = None,
    overrides: SetOption = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder from its last.pt.")
    ] = None,
) -> None:
    """Train a segmentation network; writes runs/<experiment>/<run-id>/.

    Example: acdc-prune train --data ~/ACDC/training -c configs/acdc.yaml --set training.epochs=100
    Multi-process: torchrun --nproc_per_node=2 -m acdc_prune train -c configs/demo.yaml
    """

    def body() -> None:
        from acdc_prune.engine.distributed import current_ranks
        from acdc_prune.engine.trainer import train as train_model

        if resume is not None:
            cfg = _load_config(resume / "config.yaml", overrides)
        else:
            cfg = _load_config(config, overrides, data)
        result = train_model(cfg, resume=resume, console=console)
        if current_ranks().is_main:  # under torchrun, rank 0 alone reports
            console.print(
                f"best mean foreground Dice {result.best_dice:.4f} at epoch {result.best_epoch}; "
                f"run folder [bold]{result.run_dir}[/]"
            )

    _run(body)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Run folder (baseline or pruned) or checkpoint file.")],
    data: Annotated[
        Path | None,
        typer.Option(help="Labelled data folder (ACDC or nnU-Net); default: the run's validation patients."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/eval/<time>).")] = None,
    save_predictions: Annotated[bool, typer.Option(help="Write predictions as NIfTI.")] = False,
    overrides: SetOption = None,
) -> None:
    """Score a model per structure and phase (Dice, HD95, IoU, clinical indices) and time it.

    Example: acdc-prune evaluate runs/acdc/20261121-101500 --data ~/ACDC/testing
    """

    def body() -> None:
        from acdc_prune.experiments.evaluation import evaluate_folder

        evaluate_folder(
            model, data, out=out, save_predictions=save_predictions, overrides=overrides, console=console
        )

    _run(body)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Run folder (baseline or pruned) or checkpoint file.")],
    data: Annotated[
        Path, typer.Option(help="Images to segment (ACDC or nnU-Net layout; labels not needed).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <run>/predictions/<time>).")
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Write a label volume (NIfTI, each image's own grid and affine) for every image of a folder.

    Example: acdc-prune predict bundles/acdc_unet_prune/models/pruned/model.pt --data ~/ACDC/testing
    """

    def body() -> None:
        from acdc_prune.experiments.predict import predict_folder

        predict_folder(model, data, out=out, overrides=overrides, console=console)

    _run(body)


@app.command()
def prune(
    run_dir: Annotated[Path, typer.Argument(help="Trained run folder (best.pt, config.yaml, epochN.pt).")],
    ratios: Annotated[
        Path, typer.Option(help="YAML: 'default: 0.25' plus block prefixes, e.g. 'encoders.1: 0.5'.")
    ],
    rewind: Annotated[
        str | None, typer.Option(help="Rewind surviving weights to this checkpoint of the run, e.g. epoch5.")
    ] = None,
    reinit: Annotated[
        str | None, typer.Option(help="none (keep weights) or random; --rewind implies rewind.")
    ] = None,
    retrain_epochs: Annotated[int | None, typer.Option(min=0, help="Retraining epochs (0 = none).")] = None,
    retrain_lr: Annotated[float | None, typer.Option(help="Peak retraining learning rate.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Prune this checkpoint instead of the run's best.pt.")
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Prune filters by L1 norm, rebuild a smaller network, re-initialise, retrain and evaluate.

    Example: acdc-prune prune runs/acdc/20261121-101500 --ratios configs/ratios.yaml --rewind epoch5
    """

    def body() -> None:
        from acdc_prune.errors import ConfigError
        from acdc_prune.experiments.prune import prune_run, read_ratios

        if rewind is not None and reinit not in (None, "rewind"):
            raise ConfigError(f"--rewind {rewind} and --reinit {reinit} contradict each other; give one")
        mode = "rewind" if rewind is not None else (reinit or "none")
        result = prune_run(
            run_dir,
            read_ratios(ratios),
            reinit=mode,
            rewind_to=rewind,
            retrain_epochs=retrain_epochs,
            retrain_lr=retrain_lr,
            checkpoint=checkpoint,
            overrides=overrides,
            console=console,
        )
        params, macs = result.meta["params"], result.meta["macs"]
        console.print(
            f"params {params['before']:,} -> {params['after']:,}, "
            f"MACs {macs['before']:,} -> {macs['after']:,}; mean Dice "
            f"{result.before['mean_dice']:.4f} before retraining, {result.after['mean_dice']:.4f} after"
        )
        console.print(f"pruned model in [bold]{result.out_dir}[/]")

    _run(body)


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="Run folder or checkpoint file.")],
    ratios: Annotated[Path | None, typer.Option(help="Preview what this ratios file would remove.")] = None,
    checkpoint: Annotated[str, typer.Option(help="Checkpoint of the run: best, last, epoch5...")] = "best",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/inspect/<time>).")] = None,
) -> None:
    """Filter-norm statistics, histograms and heat map, widths per block, and a ratios preview.

    Example: acdc-prune inspect runs/acdc/20261121-101500 --ratios configs/ratios.yaml
    """

    def body() -> None:
        from acdc_prune.experiments.inspect import inspect_run
        from acdc_prune.experiments.prune import read_ratios

        preview = read_ratios(ratios) if ratios is not None else None
        inspect_run(run_dir, ratios=preview, checkpoint=checkpoint, out=out, console=console)

    _run(body)


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="Sweep YAML (see configs/demo-sweep.yaml).")],
    data: Annotated[
        Path | None, typer.Option(help="Data folder (sets data.root of the base config).")
    ] = None,
) -> None:
    """Baseline once, then every ratios setting x mode: prune, retrain, evaluate; re-running resumes.

    Example: acdc-prune sweep -c configs/acdc-sweep.yaml --data ~/ACDC/training
    """

    def body() -> None:
        from acdc_prune.experiments.sweep import load_sweep, run_sweep

        spec, base_dir = load_sweep(config)
        run_sweep(spec, base_dir, data=data, console=console)

    _run(body)


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="Real ACDC training folder (default: the phantom).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Root folder of the results.")] = Path("runs"),
) -> None:
    """The whole pipeline on the built-in phantom: train, prune x {none, random, rewind}, retrain, compare.

    Example: acdc-prune demo            (or: acdc-prune demo --data ~/ACDC/training)
    """

    def body() -> None:
        from acdc_prune.experiments.demo import run_demo

        run_demo(data=data, runs_dir=runs_dir, console=console)

    _run(body)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="Run folder (baseline or pruned) or checkpoint file.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="onnx, torchscript, exported (torch.export, .pt2) or weights (no training state).",
        ),
    ] = "onnx",
    checkpoint: Annotated[str, typer.Option(help="Checkpoint of the run: best, last, epoch5...")] = "best",
    out: Annotated[
        Path | None, typer.Option(help="Output file or folder (default: <run>/export/<checkpoint>.<ext>).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    opset: Annotated[int, typer.Option(min=18, help="ONNX opset version.")] = 18,
) -> None:
    """Export a model with dynamic batch and size, checked against PyTorch; writes <file> and <file>.json.

    Example: acdc-prune export runs/acdc/20261121-101500/pruned/none-20261121-120000 --format onnx
    """

    def body() -> None:
        from acdc_prune.engine.export import export_checkpoint, print_export

        result = export_checkpoint(model, fmt, checkpoint=checkpoint, out=out, force=force, opset=opset)
        print_export(result, console)

    _run(body)


def run() -> None:
    """Entry point for ``python -m acdc_prune``."""
    app(prog_name="acdc-prune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
