"""Commands that compress a network: ``prune``, ``inspect``, ``sensitivity``, ``export``, ``quantize``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from acdc_prune.cli_common import SetOption, console, run_command
from acdc_prune.errors import ConfigError

CheckpointOption = Annotated[str, typer.Option(help="Checkpoint of the run: best, last, epoch5...")]
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

    run_command(body)


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


def inspect(
    run_dir: Annotated[Path, typer.Argument(help="Run folder or checkpoint file.")],
    ratios: Annotated[Path | None, typer.Option(help="Preview what this ratios file would remove.")] = None,
    checkpoint: CheckpointOption = "best",
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

    run_command(body)


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
    checkpoint: CheckpointOption = "best",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder; give an existing one to resume it (default: <run>/sensitivity/<time>)."
        ),
    ] = None,
    overrides: SetOption = None,
    replay: Annotated[
        bool,
        typer.Option(
            "--replay/--no-replay",
            help="Keep the unpruned network's block outputs in memory so each row runs from its pruned "
            "block on (same table, faster); --no-replay saves that memory.",
        ),
    ] = True,
) -> None:
    """Prune one block at a time at each ratio, recalibrate BatchNorm, score; plots and a ratios.yaml.

    Example: acdc-prune sensitivity runs/acdc/20261121-101500 --ratios 0.25,0.5,0.75,0.9 --target-macs 0.25
    """

    def body() -> None:
        from acdc_prune.experiments.sensitivity import run_sensitivity
        from acdc_prune.experiments.sensitivity_ratios import parse_ratio_list
        from acdc_prune.render import RichReporter, print_sensitivity

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
                replay=replay,
                reporter=reporter,
            )
        print_sensitivity(result, console)

    run_command(body)


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
    checkpoint: CheckpointOption = "best",
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

    run_command(body)


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
    checkpoint: CheckpointOption = "best",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    overrides: SetOption = None,
) -> None:
    """int8 model (onnxruntime, QDQ) calibrated on training slices; evaluate and predict take its folder.

    Example: acdc-prune quantize runs/acdc/20261121-101500/pruned/none-20261121-120000
    """

    def body() -> None:
        from acdc_prune.experiments.quantize import quantize_run
        from acdc_prune.render import RichReporter, print_quantization

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
        print_quantization(result, console)
        console.print(f"evaluate it with: acdc-prune evaluate {result.path.parent}")

    run_command(body)
