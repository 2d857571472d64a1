"""Predict label volumes (NIfTI in each image's original geometry) for every image of a data folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from acdc_prune.config import Config, save_config
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.progress import LogReporter, Reporter
from acdc_prune.errors import DataError
from acdc_prune.experiments.evaluation import open_configured
from acdc_prune.io import staged_dir, unused_path


def predict_records(
    model: nn.Module, config: Config, records: list[Any], out_dir: Path, reporter: Reporter | None = None
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
        reporter: receives the progress.

    Returns:
        The written files, in the order of ``records``.
    """
    from acdc_prune.data import VolumeDataset
    from acdc_prune.data.nifti import open_nifti, true_affine, write_nifti
    from acdc_prune.engine.device import resolve_device
    from acdc_prune.engine.evaluate import case_name
    from acdc_prune.engine.precision import resolve_precision
    from acdc_prune.engine.segment import segment_as_configured
    from acdc_prune.models import total_stride

    device = resolve_device(config.training.device)
    evaluation = config.evaluation
    precision = resolve_precision(evaluation.precision, evaluation.channels_last, device, "evaluation")
    precision.prepare(model, device)
    dataset = VolumeDataset(records, config.data, total_stride(config.model), config.cache_dir)
    written = []
    reporter = reporter or LogReporter()
    reporter.start("volumes", len(dataset), description="Predicting")
    for index in range(len(dataset)):
        item = dataset[index]
        labels = segment_as_configured(model, item, evaluation, device, precision)
        image = item["record"].image
        path = out_dir / f"{case_name(image)}.nii.gz"
        write_nifti(path, labels, true_affine(open_nifti(image)))
        written.append(path)
        reporter.update("volumes", index + 1)
    reporter.finish("volumes")
    return written


def predict_folder(
    model_path: Path | Checkpoint,
    data: Path,
    *,
    out: Path | None = None,
    overrides: list[str] | None = None,
    reporter: Reporter | None = None,
) -> Path:
    """Segment every image of ``data`` with the model saved at ``model_path``.

    Args:
        model_path: a run folder (its ``best.pt``), a pruned child folder, a checkpoint file
            (a bundle's ``models/model.pt`` included) or an opened :class:`Checkpoint`.
        data: ACDC or nnU-Net raw folder; label files are ignored when present.
        out: output folder (must not exist); default ``<run folder>/predictions/<timestamp>``.
        overrides: dotted overrides of the stored config (``training.device``, ``evaluation.batch_size``...).
        reporter: receives the progress.

    Returns:
        The output folder, which appears only once every prediction and its ``config.yaml`` are written.

    Raises:
        DataError: no images in ``data``; CheckpointError: no usable model at ``model_path``.
    """
    from acdc_prune.data import discover

    source, model, config = open_configured(model_path, overrides)
    records = discover(data, layout="auto", require_labels=False)
    if not records:
        raise DataError(f"{data}: no images found (expected an ACDC or nnU-Net raw folder)")
    run_dir = source.run_dir
    out = Path(out) if out is not None else unused_path(run_dir / "predictions")
    with staged_dir(out) as staging:
        save_config(config, staging / "config.yaml")
        predict_records(model, config, records, staging, reporter)
    return out
