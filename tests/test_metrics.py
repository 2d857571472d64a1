"""Overlap, surface and volume metrics against hand-computed values on synthetic label volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from acdc_prune.engine.metrics import STRUCTURES, hausdorff_distance, mean_foreground_dice, volume_metrics
from acdc_prune.errors import DataError

SPACING = (1.0, 2.0, 10.0)


def test_overlap_metrics_match_hand_counts():
    gt = np.zeros((8, 8, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[0:4, 0:4, 0:2] = 3  # 32 voxels
    pred[0:4, 2:5, 0:2] = 3  # 24 voxels, 16 of them inside gt
    lv = volume_metrics(pred, gt, SPACING)["LV"]
    assert lv["dice"] == pytest.approx(2 * 16 / (24 + 32))
    assert lv["iou"] == pytest.approx(16 / (24 + 32 - 16))
    assert lv["precision"] == pytest.approx(16 / 24)
    assert lv["recall"] == pytest.approx(16 / 32)
    assert lv["volume_gt_ml"] == pytest.approx(32 * 20.0 / 1000)
    assert lv["volume_pred_ml"] == pytest.approx(24 * 20.0 / 1000)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hausdorff_of_a_one_voxel_shift_is_the_spacing_of_that_axis(axis):
    gt = np.zeros((10, 10, 6), bool)
    gt[2:4, 2:4, 1:3] = True  # 2x2x2: every voxel is a surface voxel
    pred = np.roll(gt, 1, axis=axis)
    # Half of each surface lies on the other one (distance 0), half one voxel away along ``axis``.
    assert hausdorff_distance(pred, gt, SPACING, 95.0) == pytest.approx(SPACING[axis])
    assert hausdorff_distance(pred, gt, SPACING, 100.0) == pytest.approx(SPACING[axis])
    # 16 sorted distances, eight 0 then eight d: the 50th percentile interpolates halfway.
    assert hausdorff_distance(pred, gt, SPACING, 50.0) == pytest.approx(SPACING[axis] / 2)


def test_hausdorff_uses_the_farthest_direction():
    gt = np.zeros((12, 12, 5), bool)
    gt[2:6, 2:6, 1:4] = True
    pred = gt.copy()
    pred[9, 9, 2] = True  # one stray voxel: far from gt, but gt is all close to pred
    stray = np.hypot(4 * 1.0, 4 * 2.0)  # to gt's corner (5, 5, 2)
    assert hausdorff_distance(pred, gt, SPACING, 100.0) == pytest.approx(stray)
    assert hausdorff_distance(gt, pred, SPACING, 100.0) == pytest.approx(stray)


def test_hausdorff_matches_monai_on_irregular_shapes():
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.standard_normal((40, 40, 12)), sigma=(3, 3, 1))
    gt = np.zeros(noise.shape, bool)
    pred = np.zeros(noise.shape, bool)
    interior = (slice(4, 36), slice(4, 36), slice(2, 10))
    gt[interior] = noise[interior] > 0.05
    pred[interior] = noise[interior] + 0.03 * rng.standard_normal(gt[interior].shape) > 0.0
    spacing = (1.4, 1.4, 8.0)
    for percentile in (95.0, 100.0):
        reference = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None].float(),
            torch.from_numpy(gt)[None, None].float(),
            include_background=True,
            percentile=percentile,
            spacing=spacing,
        ).item()
        assert hausdorff_distance(pred, gt, spacing, percentile) == pytest.approx(reference, rel=1e-5)


def test_slice_dice_averages_slices_where_a_mask_is_present():
    gt = np.zeros((6, 6, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 0:2] = 2
    pred[1:3, 1:3, 1:3] = 2
    myo = volume_metrics(pred, gt, SPACING)["MYO"]
    # z=0 GT only (0), z=1 identical (1), z=2 prediction only (0), z=3 empty in both: excluded.
    assert myo["slice_dice"] == pytest.approx(1 / 3)
    assert myo["dice"] == pytest.approx(0.5)


def test_both_empty_is_undefined_not_perfect():
    gt = np.zeros((6, 6, 3), np.uint8)
    gt[1:3, 1:3, 1] = 3
    rv = volume_metrics(gt.copy(), gt, SPACING)["RV"]
    for key in ("dice", "iou", "precision", "recall", "hd", "slice_dice"):
        assert rv[key] is None
    assert rv["volume_pred_ml"] == 0.0
    assert rv["volume_gt_ml"] == 0.0


def test_false_detection_scores_zero_and_leaves_recall_and_hd_undefined():
    gt = np.zeros((6, 6, 3), np.uint8)
    pred = gt.copy()
    pred[1:3, 1:3, 1] = 1
    rv = volume_metrics(pred, gt, SPACING)["RV"]
    assert (rv["dice"], rv["iou"], rv["precision"], rv["slice_dice"]) == (0.0, 0.0, 0.0, 0.0)
    assert rv["recall"] is None
    assert rv["hd"] is None


def test_miss_scores_zero_and_leaves_precision_and_hd_undefined():
    gt = np.zeros((6, 6, 3), np.uint8)
    gt[1:3, 1:3, 1] = 1
    rv = volume_metrics(np.zeros_like(gt), gt, SPACING)["RV"]
    assert (rv["dice"], rv["iou"], rv["recall"]) == (0.0, 0.0, 0.0)
    assert rv["precision"] is None
    assert rv["hd"] is None


def test_no_metric_is_ever_nan_or_inf():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 4, (10, 10, 4))
    gt = rng.integers(0, 3, (10, 10, 4))  # no LV in gt at all
    for values in volume_metrics(pred, gt, SPACING).values():
        assert all(v is None or np.isfinite(v) for v in values.values())


def test_skipping_hausdorff_keeps_overlap_metrics():
    gt = np.zeros((6, 6, 3), np.uint8)
    gt[1:4, 1:4, :] = 3
    fast = volume_metrics(gt, gt, SPACING, hd_percentile=None)
    assert fast["LV"]["hd"] is None
    assert fast["LV"]["dice"] == 1.0


def test_mean_foreground_dice_skips_undefined_structures():
    per_structure = {"RV": {"dice": None}, "MYO": {"dice": 0.6}, "LV": {"dice": 0.9}, "BG": {"dice": 0.0}}
    assert mean_foreground_dice(per_structure) == pytest.approx(0.75)
    assert mean_foreground_dice({name: {"dice": None} for name in STRUCTURES.values()}) is None


def test_mismatched_shapes_are_a_data_error():
    with pytest.raises(DataError, match="of one shape"):
        volume_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 3)), SPACING)
    with pytest.raises(DataError, match="spacing"):
        volume_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 2)), (1.0, 0.0, 1.0))
