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

from acdc_prune.errors import ConfigError

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
AnyModelArgument = Annotated[
    Path,
    typer.Argument(
        help="Run folder (baseline or pruned), checkpoint file, or int8 model (quantized folder, .onnx)."
    ),
]
TargetOption = Annotated[
    float | None,
    typer.Option(help="Keep this fraction of the original network (0.1 = 10x fewer); a budget, not ratios."),
]
ImportanceOption = Annotated[
    str | None,
    typer.Option(
        help="Channel criterion: l1, l2, bn_scale, taylor, redundancy (or one registered in Python)."
    ),
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
    from acdc_prune.render import error_text

    try:
        return action()
    except typer.Exit:
        raise
    except AcdcPruneError as err:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(error_text(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as err:
        detail = f": {escape(error_text(err))}" if str(err) else ""
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
        from acdc_prune.render import RichReporter

        if resume is not None:
            cfg = _load_config(resume / "config.yaml", overrides)
        else:
            cfg = _load_config(config, overrides, data)
        with RichReporter(console, bars=cfg.logging.progress) as reporter:
            result = train_model(cfg, resume=resume, reporter=reporter)
        if current_ranks().is_main:  # under torchrun, rank 0 alone reports
            console.print(
                f"best mean foreground Dice {result.best_dice:.4f} at epoch {result.best_epoch}; "
                f"run folder [bold]{result.run_dir}[/]"
            )

    _run(body)


@app.command()
def evaluate(
    model: AnyModelArgument,
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
        from acdc_prune.render import RichReporter, print_evaluation

        with RichReporter(console) as reporter:
            result = evaluate_folder(
                model,
                data,
                out=out,
                save_predictions=save_predictions,
                overrides=overrides,
                reporter=reporter,
            )
        print_evaluation(result, console)
        console.print(f"results in [bold]{result.out_dir}[/]")

    _run(body)


@app.command()
def predict(
    model: AnyModelArgument,
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
        from acdc_prune.render import RichReporter

        with RichReporter(console) as reporter:
            folder = predict_folder(model, data, out=out, overrides=overrides, reporter=reporter)
        console.print(f"predictions in [bold]{folder}[/]")

    _run(body)


@app.command()
def prune(
    run_dir: Annotated[Path, typer.Argument(help="Trained (or already pruned) run folder.")],
    ratios: Annotated[
        Path | None, typer.Option(help="YAML: 'default: 0.25' plus block prefixes, e.g. 'encoders.1: 0.5'.")
    ] = None,
    target_macs: TargetOption = None,
    target_params: TargetOption = None,
    target_latency: TargetOption = None,
    importance: ImportanceOption = None,
    scope: Annotated[
        str | None, typer.Option(help="block (ratios per coupled group) or global (rank across groups).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Reach the target in N geometric steps, retraining between.")
    ] = None,
    rewind: Annotated[
        str | None, typer.Option(help="Rewind surviving weights to this checkpoint of the run, e.g. epoch5.")
    ] = None,
    reinit: Annotated[
        str | None,
        typer.Option(help="none (keep weights), random, or lr_rewind (keep them, replay the LR schedule)."),
    ] = None,
    retrain_epochs: Annotated[int | None, typer.Option(min=0, help="Retraining epochs (0 = none).")] = None,
    retrain_lr: Annotated[float | None, typer.Option(help="Peak retraining learning rate.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Prune this checkpoint instead of the run's best.pt.")
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Prune filters, rebuild a smaller network, recalibrate BatchNorm, retrain and evaluate.

    Give block ratios (--ratios) or a budget (--target-macs 0.1: keep 10% of the original MACs).
    Example: acdc-prune prune runs/acdc/20261121-101500 --target-macs 0.1 --importance taylor
    """

    def body() -> None:
        from acdc_prune.experiments.prune import prune_run, read_ratios
        from acdc_prune.render import RichReporter, print_pruning

        targets = {"macs": target_macs, "params": target_params, "latency": target_latency}
        extra = _pruning_overrides(targets, importance=importance, scope=scope, steps=steps)
        if rewind is not None and reinit not in (None, "rewind"):
            raise ConfigError(f"--rewind {rewind} and --reinit {reinit} contradict each other; give one")
        if ratios is not None and any(value is not None for value in targets.values()):
            raise ConfigError("--ratios and a --target-* option contradict each other; give one")
        mode = "rewind" if rewind is not None else reinit
        with RichReporter(console) as reporter:
            result = prune_run(
                run_dir,
                read_ratios(ratios) if ratios is not None else None,
                reinit=mode,
                rewind_to=rewind,
                retrain_epochs=retrain_epochs,
                retrain_lr=retrain_lr,
                checkpoint=checkpoint,
                overrides=[*(overrides or []), *extra],
                reporter=reporter,
            )
        print_pruning(result, console)

    _run(body)


def _pruning_overrides(targets: dict[str, float | None], **options: Any) -> list[str]:
    """Pruning options of the command line as dotted ``pruning.*`` overrides (``None`` = not given).

    Args:
        targets: metric (``macs``, ``params``, ``latency``) -> fraction to keep; at most one is given.
        options: further ``pruning`` keys (``importance``, ``scope``, ``steps``).
    """
    given = {metric: value for metric, value in targets.items() if value is not None}
    if len(given) > 1:
        raise ConfigError("give one of --target-macs, --target-params and --target-latency")
    settings = [f"pruning.{key}={value}" for key, value in options.items() if value is not None]
    for metric, value in given.items():
        settings += [f"pruning.target_metric={metric}", f"pruning.target={value}"]
    return settings


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="Run folder or checkpoint file.")],
    ratios: Annotated[Path | None, typer.Option(help="Preview what this ratios file would remove.")] = None,
    checkpoint: Annotated[str, typer.Option(help="Checkpoint of the run: best, last, epoch5...")] = "best",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: <run>/inspect/<time>, or <runs_dir>/inspect/<time> for a file)."
        ),
    ] = None,
) -> None:
    """Filter-norm statistics, histograms and heat map, widths per block, and a ratios preview.

    Example: acdc-prune inspect runs/acdc/20261121-101500 --ratios configs/ratios.yaml
    """

    def body() -> None:
        from acdc_prune.experiments.inspect import inspect_run
        from acdc_prune.experiments.prune import read_ratios
        from acdc_prune.render import print_inspection

        preview = read_ratios(ratios) if ratios is not None else None
        print_inspection(inspect_run(run_dir, ratios=preview, checkpoint=checkpoint, out=out), console)

    _run(body)


@app.command()
def sensitivity(
    run_dir: Annotated[Path, typer.Argument(help="Run folder or checkpoint file (a pruned one too).")],
    ratios: Annotated[
        str, typer.Option(help="Comma-separated shares of a block's filters removed, each in (0, 1).")
    ] = "0.25,0.5,0.75,0.9",
    importance: Annotated[
        str | None, typer.Option(help="Channel criterion (default: the run's pruning.importance).")
    ] = None,
    volumes: Annotated[
        int, typer.Option(help="Validation volumes scored: a fixed, evenly spread subset.")
    ] = 8,
    target_macs: Annotated[
        float, typer.Option(help="ratios.yaml keeps this fraction of the MACs (0.25 = 4x fewer).")
    ] = 0.25,
    checkpoint: Annotated[str, typer.Option(help="Checkpoint of the run: best, last, epoch5...")] = "best",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder; give an existing one to resume it (default: <run>/sensitivity/<time>)."
        ),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Prune one block at a time at each ratio, recalibrate BatchNorm, score; plots and a ratios.yaml.

    Example: acdc-prune sensitivity runs/acdc/20261121-101500 --ratios 0.25,0.5,0.75,0.9 --target-macs 0.25
    """

    def body() -> None:
        from rich.table import Table

        from acdc_prune.experiments.sensitivity import parse_ratio_list, run_sensitivity
        from acdc_prune.render import RichReporter

        tried = parse_ratio_list(ratios)
        with RichReporter(console) as reporter:
            result = run_sensitivity(
                run_dir,
                tried,
                importance=importance,
                volumes=volumes,
                target_macs=target_macs,
                checkpoint=checkpoint,
                out=out,
                overrides=overrides,
                reporter=reporter,
            )
        meta, target = result.meta, result.meta["target"]
        table = Table(
            "block", *(f"{r:g}" for r in tried), title="Dice loss when one block is pruned by ratio"
        )
        for block, rows in result.table.groupby("block", sort=False):
            table.add_row(str(block), *(f"{loss:+.4f}" for loss in rows["dice_loss"]))
        console.print(table)
        recalibrated = meta.get("reference_recalibrated", {}).get("dice_mean")
        console.print(
            f"unpruned Dice {meta['reference']['dice_mean']:.4f}"
            + (f" ({recalibrated:.4f} recalibrated)" if recalibrated is not None else "")
            + f" on {len(meta['settings']['volumes'])} validation volumes; ratios.yaml keeps "
            f"{target['real_macs_fraction']:.3f} of the MACs (target {target['macs_fraction']:g})"
        )
        console.print(f"sensitivity in [bold]{result.out_dir}[/]")

    _run(body)


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


def _sweep_failures() -> tuple[dict[str, str], Callable[[Any], None]]:
    """A dict of failed jobs (name -> error) and the sweep event callback that fills it."""
    failed: dict[str, str] = {}

    def record(event: Any) -> None:
        if event.state == "failed":
            failed[event.job] = event.message

    return failed, record


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


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="Sweep YAML (see configs/demo-sweep.yaml).")],
    data: Annotated[
        Path | None, typer.Option(help="Data folder (sets data.root of the base config).")
    ] = None,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
) -> None:
    """Baselines, then every ratios setting x mode x seed: prune, retrain, evaluate; re-running resumes.

    Example: acdc-prune sweep -c configs/acdc-sweep.yaml --data ~/ACDC/training --executor ray
    """

    def body() -> None:
        from acdc_prune.experiments.sweep import load_sweep, run_sweep
        from acdc_prune.render import RichReporter

        spec, base_dir = load_sweep(config)
        failed, record = _sweep_failures()
        with RichReporter(console) as reporter:
            report_dir = run_sweep(
                spec,
                base_dir,
                data=data,
                executor=executor,
                ray_address=ray_address,
                reporter=reporter,
                on_event=record,
            )
        _print_sweep_report(report_dir, failed, f"{spec.name}: validation, after retraining")

    _run(body)


@app.command("sweep-eval")
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
        from acdc_prune.render import RichReporter

        failed, record = _sweep_failures()
        with RichReporter(console) as reporter:
            report_dir = evaluate_sweep(
                sweep_dir,
                data,
                name=name,
                executor=executor,
                ray_address=ray_address,
                reporter=reporter,
                on_event=record,
            )
        _print_sweep_report(report_dir, failed, f"{sweep_dir.name} on {data.name}")

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

        report_dir = run_demo(data=data, runs_dir=runs_dir, console=console)
        _print_sweep_report(report_dir, {}, "demo: validation, after retraining")

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
        from acdc_prune.engine.export import export_checkpoint
        from acdc_prune.render import print_export

        result = export_checkpoint(model, fmt, checkpoint=checkpoint, out=out, force=force, opset=opset)
        print_export(result, console)

    _run(body)


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="Run folder (baseline or pruned) or checkpoint file.")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <run>/quantized, or <run>/quantized-qat).")
    ] = None,
    calibration_slices: Annotated[
        int, typer.Option(help="Training slices to calibrate activation ranges on (at least 8).")
    ] = 128,
    keep_float: Annotated[
        str | None, typer.Option(help="Module-path prefixes left in float, e.g. decoders.3 (head always).")
    ] = None,
    method: Annotated[str, typer.Option(help="Calibration: minmax, entropy or percentile.")] = "minmax",
    qat_epochs: Annotated[
        int, typer.Option(min=0, help="Quantization-aware fine-tuning epochs first (0 = post-training only).")
    ] = 0,
    qat_lr: Annotated[
        float | None, typer.Option(help="QAT peak learning rate (default training.lr / 10).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="Checkpoint of the run: best, last, epoch5...")] = "best",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    overrides: SetOption = None,
) -> None:
    """int8 model (onnxruntime, QDQ) calibrated on training slices; evaluate and predict take its folder.

    Example: acdc-prune quantize runs/acdc/20261121-101500/pruned/none-20261121-120000
    """

    def body() -> None:
        from rich.table import Table

        from acdc_prune.experiments.quantize import quantize_run
        from acdc_prune.render import RichReporter

        prefixes = [p.strip() for p in (keep_float or "").split(",") if p.strip()]
        with RichReporter(console) as reporter:
            result = quantize_run(
                model,
                out=out,
                checkpoint=checkpoint,
                calibration_slices=calibration_slices,
                keep_float=prefixes,
                method=method,
                qat_epochs=qat_epochs,
                qat_lr=qat_lr,
                force=force,
                overrides=overrides,
                reporter=reporter,
            )
        facts = result.summary["quantization"]
        table = Table(title="int8 quantization", show_header=False)
        table.add_row("File", str(result.path))
        table.add_row(
            "Size", f"{facts['size_bytes'] / 2**20:.2f} MiB (float {facts['float_size_bytes'] / 2**20:.2f})"
        )
        table.add_row("Calibration", f"{result.summary['calibration']['slices']} training slices, {method}")
        table.add_row("Float layers", ", ".join(facts["float_nodes"]))
        if "qat" in result.summary:
            qat, dice = result.summary["qat"], result.summary["qat"]["best_dice"]
            shown = f"{dice:.4f}" if dice is not None else "undefined"
            table.add_row("QAT epochs", f"{qat['epochs']}, best validation Dice {shown} (int8-rounded)")
        check = facts["check"]
        table.add_row(
            "Max |logit deviation|", f"{check['max_abs_logit_deviation']:.3g} on {check['slices']} slices"
        )
        table.add_row("Label agreement", f"{check['label_agreement']:.4%}")
        console.print(table)
        console.print(f"evaluate it with: acdc-prune evaluate {result.path.parent}")

    _run(body)


def run() -> None:
    """Entry point for ``python -m acdc_prune``."""
    app(prog_name="acdc-prune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
