"""Overlap and surface metrics per cardiac structure, in a volume's own (anisotropic) geometry.

Conventions (also in ``docs/evaluation.md``):

* A structure is *empty* in a volume when no voxel carries its label.
* Both prediction and ground truth empty: every metric is ``None`` (undefined). Aggregates exclude
  it and count the exclusion; it is never scored as a perfect 1.0.
* Ground truth empty, prediction not (a false detection): Dice 0, IoU 0, precision 0; recall and the
  Hausdorff distance are ``None`` (excluded and counted).
* Prediction empty, ground truth not (a miss): Dice 0, IoU 0, recall 0; precision and the
  Hausdorff distance are ``None`` (excluded and counted).
* No metric is ever NaN or infinite; undefined is always ``None``.
* The Hausdorff distance at percentile ``p`` is ``max(P_p(d(S_pred -> S_gt)), P_p(d(S_gt -> S_pred)))``
  where ``S`` are surface voxels (mask voxels with a 6-connected neighbour outside the mask or
  outside the image), distances are Euclidean in mm with the voxel spacing, and ``P_p`` is the
  linearly interpolated percentile: the definition of MONAI's ``compute_hausdorff_distance``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from acdc_prune.errors import DataError

STRUCTURES: dict[int, str] = {1: "RV", 2: "MYO", 3: "LV"}
METRICS: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "recall",
    "hd",
    "slice_dice",
    "volume_pred_ml",
    "volume_gt_ml",
)


def _ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, or ``None`` when the denominator is zero (undefined)."""
    return None if denominator == 0 else numerator / denominator


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of ``mask``: voxels with a 6-connected neighbour outside the mask or the array."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff_distance(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float], percentile: float = 95.0
) -> float | None:
    """Symmetric percentile Hausdorff distance in mm between two binary masks.

    Args:
        pred: (X, Y, Z) boolean predicted mask.
        gt: (X, Y, Z) boolean ground-truth mask.
        spacing: voxel size (sx, sy, sz) in mm, so anisotropic slice spacing is honoured.
        percentile: 100 gives the classical Hausdorff distance, 95 the usual HD95.

    Returns:
        The distance in mm, or ``None`` when either mask is empty (undefined, never ``inf``).
    """
    if not pred.any() or not gt.any():
        return None
    # Distances between surface voxels do not depend on what lies outside the union's bounding box,
    # so the distance transforms run on that box (plus one voxel for the erosion) only.
    union = np.argwhere(pred | gt)
    lower = np.maximum(union.min(axis=0) - 1, 0)
    upper = np.minimum(union.max(axis=0) + 2, pred.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))
    surface_pred, surface_gt = _surface(pred[box]), _surface(gt[box])
    to_gt = ndimage.distance_transform_edt(~surface_gt, sampling=spacing)[surface_pred]
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)[surface_gt]
    return float(max(np.percentile(to_gt, percentile), np.percentile(to_pred, percentile)))


def _slice_dice(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """Mean 2D Dice over the Z slices where ``pred`` or ``gt`` is present; ``None`` if there are none."""
    intersection = (pred & gt).sum(axis=(0, 1))
    total = pred.sum(axis=(0, 1)) + gt.sum(axis=(0, 1))
    present = total > 0
    if not present.any():
        return None
    return float(np.mean(2.0 * intersection[present] / total[present]))


def structure_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    hd_percentile: float | None = 95.0,
) -> dict[str, float | None]:
    """Metrics of one structure given its binary masks (see the module docstring for empty masks).

    Args:
        pred: (X, Y, Z) boolean predicted mask, Z the slice axis.
        gt: (X, Y, Z) boolean ground-truth mask.
        spacing: voxel size (sx, sy, sz) in mm.
        hd_percentile: Hausdorff percentile; ``None`` skips the surface distance (``hd`` is ``None``),
            which makes the call cheap enough for validation during training.

    Returns:
        ``dice``, ``iou``, ``precision``, ``recall``, ``hd`` (mm), ``slice_dice`` and the volumes
        ``volume_pred_ml``, ``volume_gt_ml`` (always defined, 0.0 for an empty mask).
    """
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    tp = int((pred & gt).sum())
    voxel_ml = math.prod(spacing) / 1000.0
    hd = None if hd_percentile is None else hausdorff_distance(pred, gt, spacing, hd_percentile)
    return {
        "dice": _ratio(2 * tp, n_pred + n_gt),
        "iou": _ratio(tp, n_pred + n_gt - tp),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_gt),
        "hd": hd,
        "slice_dice": _slice_dice(pred, gt),
        "volume_pred_ml": n_pred * voxel_ml,
        "volume_gt_ml": n_gt * voxel_ml,
    }


def volume_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    hd_percentile: float | None = 95.0,
) -> dict[str, dict[str, float | None]]:
    """Metrics of every structure (RV, MYO, LV) of one labelled volume.

    Args:
        pred: (X, Y, Z) integer predicted labels (0 background, 1 RV, 2 MYO, 3 LV), Z the slice axis.
        gt: (X, Y, Z) integer ground-truth labels on the same grid.
        spacing: voxel size (sx, sy, sz) in mm of that grid.
        hd_percentile: percentile of the Hausdorff distance; ``None`` skips surface distances.

    Returns:
        ``{"RV": {...}, "MYO": {...}, "LV": {...}}``, each as returned by :func:`structure_metrics`.

    Raises:
        DataError: the two volumes do not have the same shape or the spacing is not 3 positive numbers.
    """
    if pred.shape != gt.shape or pred.ndim != 3:
        raise DataError(
            f"prediction {pred.shape} and ground truth {gt.shape} must be (X, Y, Z) volumes of one shape"
        )
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise DataError(f"voxel spacing must be three positive numbers in mm, got {tuple(spacing)}")
    spacing = tuple(float(s) for s in spacing)
    return {
        name: structure_metrics(pred == label, gt == label, spacing, hd_percentile)
        for label, name in STRUCTURES.items()
    }


def mean_foreground_dice(per_structure: dict[str, dict[str, float | None]]) -> float | None:
    """Mean 3D Dice over RV, MYO and LV of one volume, background excluded.

    Args:
        per_structure: the output of :func:`volume_metrics`.

    Returns:
        The mean of the structures whose Dice is defined, or ``None`` when none is (every structure
        empty in both prediction and ground truth); callers skip ``None`` rather than average it.
    """
    values = [per_structure[name]["dice"] for name in STRUCTURES.values()]
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
