"""Commands on one network: ``train`` it, ``evaluate`` it on labelled data, ``predict`` with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from acdc_prune.cli_common import ConfigOption, SetOption, config_from_options, console, run_command

AnyModelArgument = Annotated[
    Path,
    typer.Argument(
        help="Run folder (baseline or pruned), checkpoint file, or int8 model (quantized folder, .onnx)."
    ),
]


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
            cfg = config_from_options(resume / "config.yaml", overrides)
        else:
            cfg = config_from_options(config, overrides, data)
        with RichReporter(console, bars=cfg.logging.progress) as reporter:
            result = train_model(cfg, resume=resume, reporter=reporter)
        if current_ranks().is_main:  # under torchrun, rank 0 alone reports
            console.print(
                f"best mean foreground Dice {result.best_dice:.4f} at epoch {result.best_epoch}; "
                f"run folder [bold]{result.run_dir}[/]"
            )

    run_command(body)


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

    run_command(body)


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

    run_command(body)
