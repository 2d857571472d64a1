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
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

from acdc_prune.config import EvaluationConfig
from acdc_prune.data import load_label
from acdc_prune.data.nifti import NIFTI_SUFFIXES, open_nifti, read_volume, true_affine, write_nifti
from acdc_prune.engine.clinical import INDICES, clinical_agreement, clinical_indices
from acdc_prune.engine.cost import model_cost
from acdc_prune.engine.inference import keep_largest_components, original_labels, predict_volume
from acdc_prune.engine.metrics import STRUCTURES, mean_foreground_dice, volume_metrics
from acdc_prune.engine.precision import resolve_precision
from acdc_prune.errors import AcdcPruneError, DataError
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


def _check_classes(n_classes: int, gt: np.ndarray, label_path: Path | None) -> None:
    """Refuse a network whose output classes do not match ACDC's labels."""
    expected = len(STRUCTURES) + 1
    if n_classes != expected:
        raise AcdcPruneError(
            f"the model predicts {n_classes} classes but evaluation needs {expected} "
            "(0 background, 1 RV, 2 MYO, 3 LV): check model.out_channels"
        )
    if gt.size and int(gt.max()) >= n_classes:
        raise DataError(f"{label_path}: label {int(gt.max())} is outside the model's {n_classes} classes")


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


def _number(value: float | None, fmt: str) -> str:
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


def evaluate_model(
    model: nn.Module,
    volume_dataset: Sequence[dict[str, Any]],
    eval_cfg: EvaluationConfig,
    out_dir: Path | None,
    device: torch.device | str = "cpu",
    console: Console | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score ``model`` on every labelled volume of ``volume_dataset`` in the volumes' original geometry.

    Args:
        model: 2D network, ``(B, C_in, H, W) -> (B, 4, H, W)`` logits; it is moved to ``device``.
        volume_dataset: items ``{"image": (C_in, H, W, D) preprocessed, "record": VolumeRecord, ...}``
            as produced by :class:`acdc_prune.data.VolumeDataset`; every record needs a label.
        eval_cfg: Hausdorff percentile, inference batch size, overlays, predictions, latency settings.
        out_dir: folder for ``per_volume.csv``, ``clinical.csv``, ``summary.json``, ``overlays/*.png``
            and, with ``eval_cfg.save_predictions``, ``predictions/<case>.nii.gz`` (labels in the
            original grid with the image's affine); ``None`` writes nothing.
        device: where inference runs (cost adds CUDA figures when it is a GPU).
        console: rich console of the progress bar.
        progress: show a progress bar.

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        DataError: an empty data set, a volume without label, or a label the model cannot predict.
        AcdcPruneError: the model does not predict the 4 ACDC classes.
    """
    if len(volume_dataset) == 0:
        raise DataError("no volumes to evaluate")
    device = torch.device(device)
    out_dir = Path(out_dir) if out_dir is not None else None
    precision = resolve_precision(eval_cfg.precision, eval_cfg.channels_last, device, "evaluation")
    precision.prepare(model, device)
    overlay_at = _overlay_indices(len(volume_dataset), eval_cfg.overlays) if out_dir is not None else set()
    rows = []
    in_channels = 0
    steps = track(
        range(len(volume_dataset)),
        description="Evaluating",
        console=console,
        disable=not progress,
        transient=True,
    )
    for index in steps:
        item = volume_dataset[index]
        record = item["record"]
        if record.label is None:
            raise DataError(f"{record.image}: no label file; evaluation needs a labelled data set")
        in_channels = int(item["image"].shape[0])
        probs = predict_volume(model, item["image"], eval_cfg.batch_size, device, precision)
        gt, spacing = load_label(record)
        _check_classes(probs.shape[0], gt, record.label)
        pred = original_labels(probs, item)
        if eval_cfg.largest_component:
            pred = keep_largest_components(pred)
        metrics = volume_metrics(pred, gt, spacing, eval_cfg.hd_percentile)
        row = _volume_row(record, metrics)
        rows.append(row)
        if out_dir is None:
            continue
        if eval_cfg.save_predictions:
            affine = true_affine(open_nifti(record.image))
            write_nifti(out_dir / "predictions" / f"{row['case']}.nii.gz", pred, affine)
        if index in overlay_at:
            image, _ = read_volume(record.image)
            dice = ", ".join(f"{name} {_number(row[f'{name}_dice'], '.3f')}" for name in STRUCTURES.values())
            title = f"{row['case']} ({record.phase or 'no phase'}): Dice {dice}"
            save_overlay(out_dir / "overlays" / f"{row['case']}.png", image, gt, pred, spacing, title)
    per_volume = pd.DataFrame(rows)
    clinical = clinical_indices(per_volume)
    summary = summarize(per_volume, eval_cfg.hd_percentile)
    summary["cost"] = model_cost(model, eval_cfg, in_channels, device)
    if out_dir is not None:
        atomic_write_text(out_dir / "per_volume.csv", per_volume.to_csv(index=False))
        atomic_write_text(out_dir / "clinical.csv", clinical.to_csv(index=False))
        atomic_write_json(out_dir / "summary.json", summary)
    return EvaluationResult(per_volume=per_volume, summary=summary, clinical=clinical, out_dir=out_dir)


def _cell(aggregate: dict[str, Any], digits: int) -> str:
    """``mean ± std`` of an aggregate, with the count of excluded volumes when there are any."""
    if aggregate["mean"] is None:
        text = "–"
    elif aggregate["std"] is None:
        text = f"{aggregate['mean']:.{digits}f}"
    else:
        text = f"{aggregate['mean']:.{digits}f} ± {aggregate['std']:.{digits}f}"
    if aggregate["excluded"]:
        text += f" [dim]({aggregate['excluded']} excl.)[/]"
    return text


def summary_table(result: EvaluationResult) -> Table:
    """Rich table of the segmentation metrics per structure and phase (mean ± sd over volumes)."""
    summary = result.summary
    percentile = summary["hd_percentile"]
    table = Table(title=f"Segmentation metrics ({summary['n_volumes']} volumes, original geometry)")
    headers = {
        "dice": "Dice",
        "iou": "IoU",
        "precision": "Precision",
        "recall": "Recall",
        "hd": f"HD{percentile:g} (mm)",
        "slice_dice": "Slice Dice",
    }
    table.add_column("Structure")
    table.add_column("Phase")
    for metric in SCORES:
        table.add_column(headers[metric], justify="right")
    groups = [(phase, summary["phases"][phase]) for phase in PHASES if phase in summary["phases"]]
    groups.append(("all", summary["all"]))
    for name in STRUCTURES.values():
        for phase, group in groups:
            metrics = group[name]
            table.add_row(
                name,
                phase,
                *(_cell(metrics[metric], 2 if metric == "hd" else 3) for metric in SCORES),
                end_section=phase == "all",
            )
    table.caption = (
        f"mean Dice {_number(summary['mean_dice'], '.3f')}, "
        f"mean HD{percentile:g} {_number(summary['mean_hd'], '.2f')} mm"
    )
    return table


def clinical_table(result: EvaluationResult) -> Table:
    """Rich table of the clinical indices' agreement with the ground truth over patients."""
    table = Table(title="Clinical indices (prediction vs ground truth)")
    for column in ("Index", "Unit", "n", "MAE", "Bias", "95% limits", "Pearson r"):
        table.add_column(column, justify="left" if column in ("Index", "Unit") else "right")

    for index in INDICES:
        stats = result.summary["clinical"][index]
        limits = f"{stats['loa_low']:.1f} to {stats['loa_high']:.1f}" if stats["loa_low"] is not None else "–"
        table.add_row(
            index,
            str(stats["unit"]),
            str(stats["n"]),
            _number(stats["mae"], ".1f"),
            _number(stats["bias"], "+.1f"),
            limits,
            _number(stats["pearson_r"], ".3f"),
        )
    return table


def cost_table(result: EvaluationResult) -> Table:
    """Rich table of the model's size, compute, latency and peak memory for one slice."""
    cost = result.summary["cost"]
    shape = "x".join(str(s) for s in cost["input_shape"])
    table = Table(title=f"Model cost (one slice, input {shape})", show_header=False)
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    table.add_row("Parameters", f"{cost['params'] / 1e6:.3f} M")
    table.add_row("MACs", f"{cost['macs'] / 1e9:.3f} G")
    for key in ("latency_cpu", "latency_cuda"):
        if key in cost:
            latency = cost[key]
            threads = f", {latency['threads']} threads" if "threads" in latency else ""
            if "load_average" in latency:
                threads += f", load {latency['load_average']:.1f}"
            table.add_row(
                f"Latency {latency['device']}{threads}",
                f"{latency['median_ms']:.2f} ms (IQR {latency['iqr_ms']:.2f}, n={latency['repeats']})",
            )
    memory = cost["peak_memory"]
    table.add_row(f"Peak memory ({memory['device']})", f"{memory['bytes'] / 2**20:.1f} MiB")
    return table


def print_evaluation(result: EvaluationResult, console: Console) -> None:
    """Print the segmentation, clinical and cost tables to ``console``."""
    console.print(summary_table(result))
    console.print(clinical_table(result))
    console.print(cost_table(result))
