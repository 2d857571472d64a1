"""Evaluate a saved model (run folder, pruned folder or checkpoint) on a data folder or a run's split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from acdc_prune.config import Config, apply_overrides, config_from_dict, save_config
from acdc_prune.engine.progress import Reporter
from acdc_prune.engine.quantize import open_source
from acdc_prune.io import staged_dir, unused_path


def validation_records(config: Config) -> list[Any]:
    """The validation volumes of the run that ``config`` describes (same data, same seeded split)."""
    from acdc_prune.data import load_records, split_records

    records = load_records(config.data, config.cache_dir)
    return split_records(records, config.data)[1]


def evaluate_records(
    model: nn.Module,
    config: Config,
    records: list[Any],
    out_dir: Path | None,
    reporter: Reporter | None = None,
) -> Any:
    """Score ``model`` on ``records`` with ``config``'s preprocessing and evaluation settings.

    Args:
        model: 2D network ``(B, C_in, H, W) -> (B, C, H, W)``.
        config: gives the preprocessing (``data``), the padding divisor (``model``), the device
            (``training.device``) and the metrics and cost settings (``evaluation``).
        records: labelled volumes (:class:`acdc_prune.data.VolumeRecord`).
        out_dir: folder for the evaluation files, or ``None`` to write nothing.
        reporter: receives the progress.

    Returns:
        The :class:`acdc_prune.engine.evaluate.EvaluationResult`.
    """
    from acdc_prune.data import VolumeDataset
    from acdc_prune.engine.device import resolve_device
    from acdc_prune.engine.evaluate import evaluate_model
    from acdc_prune.models import total_stride

    dataset = VolumeDataset(records, config.data, total_stride(config.model), config.cache_dir)
    return evaluate_model(
        model,
        dataset,
        config.evaluation,
        out_dir,
        device=resolve_device(config.training.device),
        reporter=reporter,
    )


def open_configured(model_path: Path | Any, overrides: list[str] | None) -> tuple[Any, nn.Module, Config]:
    """Open a saved model with its stored config, ``overrides`` applied and post-processing resolved.

    Args:
        model_path: a run or pruned folder, a checkpoint or ONNX file, or a model opened with
            :func:`~acdc_prune.engine.quantize.open_source` (a ``Checkpoint`` or an ONNX source).
        overrides: dotted overrides of the stored config.

    Returns:
        ``(source, model, config)``: the opened checkpoint or ONNX model, its network (built here, so a
        model that does not fit is refused before any folder appears) and the config to use, whose
        ``evaluation.largest_component`` is ``True`` or ``False`` (``auto`` resolved by the source).
    """
    source = open_source(model_path) if isinstance(model_path, (str, Path)) else model_path
    model = source.build_model()
    config = config_from_dict(apply_overrides(source.config.to_dict(), overrides or []))
    config.evaluation.largest_component = source.largest_component(config.evaluation.largest_component)
    return source, model, config


def evaluate_folder(
    model_path: Path,
    data: Path | None,
    *,
    out: Path | None = None,
    save_predictions: bool = False,
    overrides: list[str] | None = None,
    reporter: Reporter | None = None,
) -> Any:
    """Evaluate the model saved at ``model_path`` on every labelled volume of ``data``.

    Args:
        model_path: a run folder (its ``best.pt``), a pruned child folder, or a checkpoint file.
        data: labelled data folder, ACDC or nnU-Net raw layout; ``None`` evaluates the validation
            patients of the run's own split (same data, same seeded split as its training).
        out: output folder (must not exist); default ``<run folder>/eval/<timestamp>``.
        save_predictions: also write the predicted labels as NIfTI in the original geometry.
        overrides: dotted overrides of the stored config (``evaluation.*``, ``training.device``...).
        reporter: receives the progress.

    Returns:
        The :class:`acdc_prune.engine.evaluate.EvaluationResult`. The output folder (with the resolved
        ``config.yaml``) appears only once every file in it is written.
    """
    from acdc_prune.data import discover

    _, model, config = open_configured(model_path, overrides)
    config.evaluation.save_predictions = config.evaluation.save_predictions or save_predictions
    if data is None:
        records = validation_records(config)
    else:
        records = discover(data, layout="auto", require_labels=True)
    run_dir = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    out = out or unused_path(run_dir / "eval")
    with staged_dir(out) as staging:
        save_config(config, staging / "config.yaml")
        result = evaluate_records(model, config, records, staging, reporter)
    result.out_dir = out
    return result
