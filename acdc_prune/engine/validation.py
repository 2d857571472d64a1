"""Validation during training: mean 3D Dice per structure on whole volumes, in their original geometry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from acdc_prune.engine.metrics import STRUCTURES, mean_foreground_dice, volume_metrics
from acdc_prune.engine.precision import Precision
from acdc_prune.engine.segment import keep_largest_components, segment

DICE_KEYS = tuple(f"dice_{name}" for name in STRUCTURES.values()) + ("dice_mean", "dice_mean_largest")
"""Per-epoch validation scores: ``dice_RV``, ``dice_MYO``, ``dice_LV`` and ``dice_mean`` of the raw
predictions, and ``dice_mean_largest`` with the largest-component post-processing."""


class Validator:
    """3D validation of whole volumes with :func:`~acdc_prune.engine.segment.segment`.

    Args:
        dataset: ``VolumeDataset`` items (``image`` (1, H, W, D), ``record``, ...).
        batch_size: slices per inference batch.
        read_label: ``load_label(record) -> (labels (X, Y, Z), spacing)``; read once and kept.
        precision: precision and memory format of the forward passes.
    """

    def __init__(
        self, dataset: Sequence[dict[str, Any]], batch_size: int, read_label: Callable, precision: Precision
    ) -> None:
        self.dataset, self.batch_size, self.precision = dataset, batch_size, precision
        self.read_label = read_label
        self.labels: dict[int, tuple[np.ndarray, Any]] = {}

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float | None]:
        """Mean 3D Dice per structure over the volumes where it is defined, and the mean over
        volumes of each volume's mean foreground Dice (``dice_mean``); background is excluded. The
        same mean after keeping each structure's largest component (``dice_mean_largest``) lets the
        trainer choose the post-processing on these patients, as nnU-Net does."""
        per_structure: dict[str, list[float]] = {name: [] for name in STRUCTURES.values()}
        means: list[float] = []
        means_largest: list[float] = []
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if index not in self.labels:
                self.labels[index] = self.read_label(item["record"])
            gt, spacing = self.labels[index]
            pred = segment(model, item, batch_size=self.batch_size, device=device, precision=self.precision)
            scores = volume_metrics(pred, np.asarray(gt), tuple(spacing), hd_percentile=None)
            for name in per_structure:
                if scores[name]["dice"] is not None:
                    per_structure[name].append(scores[name]["dice"])
            largest = volume_metrics(keep_largest_components(pred), np.asarray(gt), tuple(spacing), None)
            for values, volume_scores in ((means, scores), (means_largest, largest)):
                mean = mean_foreground_dice(volume_scores)
                if mean is not None:
                    values.append(mean)
        result = {f"dice_{name}": _mean(values) for name, values in per_structure.items()}
        result["dice_mean"] = _mean(means)
        result["dice_mean_largest"] = _mean(means_largest)
        return result


def postprocessing_choice(row: dict[str, Any]) -> dict[str, Any] | None:
    """The post-processing that validation row ``row`` chooses: largest components where they raise
    the mean Dice (nnU-Net's rule), with both figures; ``None`` for a row that was not validated.

    Args:
        row: a history row with ``epoch``, ``dice_mean`` and ``dice_mean_largest``.
    """
    raw, largest = row.get("dice_mean"), row.get("dice_mean_largest")
    if raw is None or largest is None:
        return None
    return {
        "largest_component": largest > raw,
        "epoch": row["epoch"],
        "dice_mean": raw,
        "dice_mean_largest": largest,
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
