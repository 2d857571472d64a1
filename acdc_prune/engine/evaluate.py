"""Evaluate a segmentation network on labelled volumes: metrics in original geometry, clinical indices, cost.

Per volume the network runs slice by slice on the preprocessed image, the probabilities are mapped
back to the original image grid, and the argmax labels are scored there against the original ground
truth with its real voxel spacing (see :mod:`acdc_prune.engine.metrics` for the conventions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn

from acdc_prune.config import EvaluationConfig
from acdc_prune.data import load_label
from acdc_prune.data.nifti import NIFTI_SUFFIXES, open_nifti, read_volume, true_affine, write_nifti
from acdc_prune.engine.clinical import clinical_agreement, clinical_indices
from acdc_prune.engine.cost import model_cost
from acdc_prune.engine.metrics import STRUCTURES, mean_foreground_dice, volume_metrics
from acdc_prune.engine.precision import resolve_precision
from acdc_prune.engine.progress import LogReporter, Reporter
from acdc_prune.engine.segment import N_CLASSES, segment_as_configured
from acdc_prune.errors import DataError
from acdc_prune.io import atomic_save_figure, atomic_write_json, atomic_write_text

SCORES: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd", "slice_dice")
"""Per-structure metrics aggregated in the summary (volumes go to the clinical indices instead)."""
PHASES: tuple[str, ...] = ("ED", "ES")
_COLORS = {"RV": "tab:blue", "MYO": "tab:green", "LV": "tab:red"}


@dataclass
class EvaluationResult:
    """What :func:`evaluate_model` measured.

    Attributes:
        per_volume: one row per volume: ``patient``, ``phase``, ``group``, ``frame``, ``case``,
            ``{S}_{metric}`` for S in RV, MYO, LV and every metric of ``volume_metrics`` (NaN where
            undefined), and ``mean_dice`` (mean foreground 3D Dice of the volume).
        summary: JSON-ready dict (see :func:`summarize`), with ``cost`` added.
        clinical: per-patient clinical indices (see :func:`acdc_prune.engine.clinical.clinical_indices`).
        out_dir: where the files were written, or ``None``.
    """

    per_volume: pd.DataFrame
    summary: dict[str, Any]
    clinical: pd.DataFrame
    out_dir: Path | None


def case_name(image: Path) -> str:
    """File name of ``image`` without its NIfTI suffix and nnU-Net's ``_0000`` channel tag."""
    name = image.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.removesuffix("_0000")


def _check_labels(gt: np.ndarray, label_path: Path | None) -> None:
    """Refuse a label file with values beyond ACDC's four classes."""
    if gt.size and int(gt.max()) >= N_CLASSES:
        raise DataError(f"{label_path}: label {int(gt.max())} is outside the model's {N_CLASSES} classes")


def _aggregate(values: pd.Series) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, median, count of defined values and count of excluded ones."""
    defined = values.dropna().to_numpy(dtype=float)
    n = int(defined.size)
    return {
        "mean": float(defined.mean()) if n else None,
        "std": float(defined.std(ddof=1)) if n > 1 else None,
        "median": float(np.median(defined)) if n else None,
        "n": n,
        "excluded": int(values.size - n),
    }


def _mean_of_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _structure_summary(rows: pd.DataFrame) -> dict[str, Any]:
    """Aggregates per structure and metric over ``rows``, plus ``mean_dice``/``mean_hd`` over structures."""
    summary: dict[str, Any] = {
        name: {metric: _aggregate(rows[f"{name}_{metric}"]) for metric in SCORES}
        for name in STRUCTURES.values()
    }
    summary["mean_dice"] = _mean_of_defined([summary[name]["dice"]["mean"] for name in STRUCTURES.values()])
    summary["mean_hd"] = _mean_of_defined([summary[name]["hd"]["mean"] for name in STRUCTURES.values()])
    summary["n_volumes"] = len(rows)
    return summary


def summarize(per_volume: pd.DataFrame, hd_percentile: float) -> dict[str, Any]:
    """JSON-ready summary of a per-volume table.

    Args:
        per_volume: the table of :class:`EvaluationResult`.
        hd_percentile: the Hausdorff percentile the table was computed with (recorded).

    Returns:
        ``n_volumes``, ``n_patients``, ``hd_percentile``; ``all`` (every volume) and ``phases`` (``ED``,
        ``ES`` where present), each with, per structure and metric, ``mean``, ``std``, ``median``, ``n``
        and ``excluded`` (undefined values left out), plus ``mean_dice`` and ``mean_hd``: the mean over
        RV, MYO and LV of the structure means; ``mean_dice`` and ``mean_hd`` are repeated at the top
        level; ``clinical``: the agreement of :func:`acdc_prune.engine.clinical.clinical_agreement`.
    """
    overall = _structure_summary(per_volume)
    return {
        "n_volumes": len(per_volume),
        "n_patients": int(per_volume["patient"].nunique()),
        "hd_percentile": hd_percentile,
        "mean_dice": overall["mean_dice"],
        "mean_hd": overall["mean_hd"],
        "all": overall,
        "phases": {
            phase: _structure_summary(per_volume[per_volume["phase"] == phase])
            for phase in PHASES
            if (per_volume["phase"] == phase).any()
        },
        "clinical": clinical_agreement(clinical_indices(per_volume)),
    }


def _volume_row(record: Any, metrics: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """One per-volume table row: identity of the volume, then every metric (``None`` -> NaN)."""
    row: dict[str, Any] = {
        "patient": record.patient,
        "phase": record.phase,
        "group": record.group,
        "frame": record.frame,
        "case": case_name(Path(record.image)),
    }
    for name, values in metrics.items():
        for metric, value in values.items():
            row[f"{name}_{metric}"] = math.nan if value is None else value
    dice = mean_foreground_dice(metrics)
    row["mean_dice"] = math.nan if dice is None else dice
    return row


def number_text(value: float | None, fmt: str) -> str:
    """``value`` formatted with ``fmt``, or an en dash when it is undefined (``None`` or NaN)."""
    return "–" if value is None or math.isnan(value) else format(value, fmt)


def _overlay_slices(gt: np.ndarray, count: int = 3) -> list[int]:
    """Up to ``count`` slice indices spread over the slices with ground-truth foreground."""
    present = np.flatnonzero((gt > 0).any(axis=(0, 1)))
    if present.size == 0:
        return [gt.shape[2] // 2]
    picks = np.quantile(np.arange(present.size), np.linspace(0.2, 0.8, count)).round().astype(int)
    return sorted({int(present[i]) for i in picks})


def save_overlay(
    path: Path,
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: tuple[float, float, float],
    title: str,
) -> None:
    """Write a PNG of up to three slices: image in grey, ground-truth contours solid, predicted dashed.

    Args:
        path: PNG file to write.
        image: (X, Y, Z) image in original geometry.
        gt: (X, Y, Z) ground-truth labels on the same grid.
        pred: (X, Y, Z) predicted labels on the same grid.
        spacing: (sx, sy, sz) in mm; pixels are drawn with their true aspect ratio.
        title: figure title.
    """
    slices = _overlay_slices(gt)
    figure = Figure(figsize=(4 * len(slices), 4.4), layout="constrained")
    axes = figure.subplots(1, len(slices), squeeze=False)[0]
    for ax, z in zip(axes, slices, strict=True):
        plane = image[:, :, z].T
        low, high = np.percentile(plane, [1, 99])
        ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=spacing[1] / spacing[0])
        for label, name in STRUCTURES.items():
            for mask, style in ((gt[:, :, z] == label, "solid"), (pred[:, :, z] == label, "dashed")):
                if mask.any():
                    ax.contour(
                        mask.T.astype(float),
                        levels=[0.5],
                        colors=_COLORS[name],
                        linestyles=style,
                        linewidths=1.2,
                    )
        ax.set_title(f"slice {z}", fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([], [], color=_COLORS[name], label=name) for name in STRUCTURES.values()]
    handles += [
        Line2D([], [], color="black", linestyle="solid", label="ground truth"),
        Line2D([], [], color="black", linestyle="dashed", label="prediction"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    atomic_save_figure(figure, path, dpi=120)


def _overlay_indices(n_volumes: int, count: int) -> set[int]:
    """``count`` volume indices spread evenly over the data set."""
    if count == 0:
        return set()
    return {int(i) for i in np.linspace(0, n_volumes - 1, min(count, n_volumes)).round()}


def _write_volume_files(
    out_dir: Path,
    row: dict[str, Any],
    record: Any,
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Any,
    *,
    save: bool,
    overlay: bool,
) -> None:
    """The prediction NIfTI (when ``save``) and the overlay PNG (when ``overlay``) of one volume."""
    if save:
        affine = true_affine(open_nifti(record.image))
        write_nifti(out_dir / "predictions" / f"{row['case']}.nii.gz", pred, affine)
    if overlay:
        image, _ = read_volume(record.image)
        dice = ", ".join(f"{name} {number_text(row[f'{name}_dice'], '.3f')}" for name in STRUCTURES.values())
        title = f"{row['case']} ({record.phase or 'no phase'}): Dice {dice}"
        save_overlay(out_dir / "overlays" / f"{row['case']}.png", image, gt, pred, spacing, title)


def evaluate_model(
    model: nn.Module,
    volume_dataset: Sequence[dict[str, Any]],
    eval_cfg: EvaluationConfig,
    out_dir: Path | None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> EvaluationResult:
    """Score ``model`` on every labelled volume of ``volume_dataset`` in the volumes' original geometry.

    Every volume goes through :func:`~acdc_prune.engine.segment.segment` in
    ``evaluation.precision`` with the configured post-processing, then is scored against its label.

    Args:
        model: 2D network, ``(B, C_in, H, W) -> (B, 4, H, W)`` logits; it is moved to ``device``.
        volume_dataset: items ``{"image": (C_in, H, W, D) preprocessed, "record": VolumeRecord, ...}``
            as produced by :class:`acdc_prune.data.VolumeDataset`; every record needs a label.
        eval_cfg: Hausdorff percentile, inference batch size, precision, post-processing, overlays,
            predictions, latency settings.
        out_dir: folder for ``per_volume.csv``, ``clinical.csv``, ``summary.json``, ``overlays/*.png``
            and, with ``eval_cfg.save_predictions``, ``predictions/<case>.nii.gz`` (labels in the
            original grid with the image's affine); ``None`` writes nothing.
        device: where inference runs (cost adds CUDA figures when it is a GPU).
        reporter: receives the ``volumes`` progress bar.

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        DataError: an empty data set, a volume without label, or a label the model cannot predict.
        AcdcPruneError: the model does not predict the 4 ACDC classes.
    """
    if len(volume_dataset) == 0:
        raise DataError("no volumes to evaluate")
    reporter = reporter or LogReporter()
    device = torch.device(device)
    out_dir = Path(out_dir) if out_dir is not None else None
    precision = resolve_precision(eval_cfg.precision, eval_cfg.channels_last, device, "evaluation")
    precision.prepare(model, device)
    overlay_at = _overlay_indices(len(volume_dataset), eval_cfg.overlays) if out_dir is not None else set()
    rows = []
    in_channels = 0
    reporter.start("volumes", len(volume_dataset), description="Evaluating")
    for index in range(len(volume_dataset)):
        item = volume_dataset[index]
        record = item["record"]
        if record.label is None:
            raise DataError(f"{record.image}: no label file; evaluation needs a labelled data set")
        in_channels = int(item["image"].shape[0])
        pred = segment_as_configured(model, item, eval_cfg, device, precision)
        gt, spacing = load_label(record)
        _check_labels(gt, record.label)
        row = _volume_row(record, volume_metrics(pred, gt, spacing, eval_cfg.hd_percentile))
        rows.append(row)
        if out_dir is not None:
            overlay = index in overlay_at
            _write_volume_files(
                out_dir, row, record, pred, gt, spacing, save=eval_cfg.save_predictions, overlay=overlay
            )
        reporter.update("volumes", index + 1)
    reporter.finish("volumes")
    per_volume = pd.DataFrame(rows)
    clinical = clinical_indices(per_volume)
    summary = summarize(per_volume, eval_cfg.hd_percentile)
    summary["cost"] = model_cost(model, eval_cfg, in_channels, device)
    if out_dir is not None:
        atomic_write_text(out_dir / "per_volume.csv", per_volume.to_csv(index=False))
        atomic_write_text(out_dir / "clinical.csv", clinical.to_csv(index=False))
        atomic_write_json(out_dir / "summary.json", summary)
    return EvaluationResult(per_volume=per_volume, summary=summary, clinical=clinical, out_dir=out_dir)
