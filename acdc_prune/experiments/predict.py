"""Predict label volumes (NIfTI in each image's original geometry) for every image of a data folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import track
from torch import nn

from acdc_prune.config import Config, apply_overrides, config_from_dict, save_config
from acdc_prune.errors import DataError
from acdc_prune.io import staged_dir, unused_path


def predict_records(
    model: nn.Module, config: Config, records: list[Any], out_dir: Path, console: Console
) -> list[Path]:
    """Segment every volume of ``records`` and write ``<out_dir>/<case>.nii.gz``.

    Args:
        model: 2D network ``(B, C_in, H, W) -> (B, 4, H, W)`` logits; it is moved to the config's device.
        config: gives the preprocessing (``data``), the padding divisor (``model``), the device
            (``training.device``), the inference batch size and the optional largest-component
            post-processing (``evaluation``).
        records: volumes (:class:`acdc_prune.data.VolumeRecord`); labels are not needed.
        out_dir: existing folder that receives one uint8 label volume per record, on the image's
            own grid and with its affine (0 background, 1 RV, 2 MYO, 3 LV).
        console: where the progress bar goes.

    Returns:
        The written files, in the order of ``records``.
    """
    from acdc_prune.data import VolumeDataset
    from acdc_prune.data.nifti import open_nifti, true_affine, write_nifti
    from acdc_prune.engine.evaluate import case_name
    from acdc_prune.engine.inference import keep_largest_components, original_labels, predict_volume
    from acdc_prune.engine.precision import resolve_precision
    from acdc_prune.engine.trainer import resolve_device
    from acdc_prune.models import total_stride

    device = resolve_device(config.training.device)
    evaluation = config.evaluation
    precision = resolve_precision(evaluation.precision, evaluation.channels_last, device, "evaluation")
    precision.prepare(model, device)
    dataset = VolumeDataset(records, config.data, total_stride(config.model), config.logging.runs_dir)
    written = []
    for index in track(
        range(len(dataset)), description="Predicting", console=console, disable=not config.logging.progress
    ):
        item = dataset[index]
        probs = predict_volume(model, item["image"], evaluation.batch_size, device, precision)
        image = item["record"].image
        path = out_dir / f"{case_name(image)}.nii.gz"
        labels = original_labels(probs, item)
        if config.evaluation.largest_component:
            labels = keep_largest_components(labels)
        write_nifti(path, labels, true_affine(open_nifti(image)))
        written.append(path)
    return written


def predict_folder(
    model_path: Path,
    data: Path,
    *,
    out: Path | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> Path:
    """Segment every image of ``data`` with the model saved at ``model_path``.

    Args:
        model_path: a run folder (its ``best.pt``), a pruned child folder, or a checkpoint file
            (a bundle's ``models/model.pt`` included).
        data: ACDC or nnU-Net raw folder; label files are ignored when present.
        out: output folder (must not exist); default ``<run folder>/predictions/<timestamp>``.
        overrides: dotted overrides of the stored config (``training.device``, ``evaluation.batch_size``...).
        console: rich console for progress.

    Returns:
        The output folder, which appears only once every prediction and its ``config.yaml`` are written.

    Raises:
        DataError: no images in ``data``; CheckpointError: no usable model at ``model_path``.
    """
    from acdc_prune.data import discover
    from acdc_prune.engine.checkpoints import load_model

    console = console or Console()
    model, config, _ = load_model(model_path)
    config = config_from_dict(apply_overrides(config.to_dict(), overrides or []))
    records = discover(data, layout="auto", require_labels=False)
    if not records:
        raise DataError(f"{data}: no images found (expected an ACDC or nnU-Net raw folder)")
    run_dir = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    out = Path(out) if out is not None else unused_path(run_dir / "predictions")
    with staged_dir(out) as staging:
        save_config(config, staging / "config.yaml")
        predict_records(model, config, records, staging, console)
    console.print(f"{len(records)} predictions in [bold]{out}[/]")
    return out
