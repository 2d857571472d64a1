"""Clinical indices (EDV, ESV, EF, myocardial mass) and their agreement, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from acdc_prune.engine.clinical import clinical_agreement, clinical_indices
from acdc_prune.engine.metrics import volume_metrics
from acdc_prune.errors import DataError


def _row(patient, phase, lv, rv, myo, lv_gt=None, rv_gt=None, myo_gt=None):
    return {
        "patient": patient,
        "phase": phase,
        "LV_volume_pred_ml": lv,
        "RV_volume_pred_ml": rv,
        "MYO_volume_pred_ml": myo,
        "LV_volume_gt_ml": lv if lv_gt is None else lv_gt,
        "RV_volume_gt_ml": rv if rv_gt is None else rv_gt,
        "MYO_volume_gt_ml": myo if myo_gt is None else myo_gt,
    }


def test_indices_from_label_volumes():
    spacing = (1.5, 1.5, 10.0)  # 22.5 ul per voxel
    rows = []
    for phase, lv_voxels, rv_voxels, myo_voxels in (("ED", 6000, 4000, 5000), ("ES", 2400, 2000, 5200)):
        gt = np.zeros((100, 100, 10), np.uint8).reshape(-1)
        gt[:lv_voxels] = 3
        gt[lv_voxels : lv_voxels + rv_voxels] = 1
        gt[lv_voxels + rv_voxels : lv_voxels + rv_voxels + myo_voxels] = 2
        gt = gt.reshape(100, 100, 10)
        metrics = volume_metrics(gt, gt, spacing, hd_percentile=None)
        rows.append(
            {"patient": "p1", "phase": phase}
            | {
                f"{s}_volume_{src}_ml": metrics[s][f"volume_{src}_ml"]
                for s in ("LV", "RV", "MYO")
                for src in ("pred", "gt")
            }
        )
    indices = clinical_indices(pd.DataFrame(rows)).set_index("patient")
    voxel_ml = 22.5 / 1000
    assert indices.at["p1", "LV_EDV_gt"] == pytest.approx(6000 * voxel_ml)  # 135 ml
    assert indices.at["p1", "LV_ESV_gt"] == pytest.approx(2400 * voxel_ml)  # 54 ml
    assert indices.at["p1", "LV_EF_gt"] == pytest.approx(60.0)
    assert indices.at["p1", "RV_EF_gt"] == pytest.approx(50.0)
    # Mass uses the ED myocardium only: 5000 voxels = 112.5 ml -> 118.125 g.
    assert indices.at["p1", "MYO_mass_gt"] == pytest.approx(5000 * voxel_ml * 1.05)
    assert indices.at["p1", "LV_EF_pred"] == indices.at["p1", "LV_EF_gt"]


def test_agreement_statistics():
    rows = []
    # (pred, gt) LV EDV per patient: errors +10, -5, +25; ES identical everywhere.
    for patient, pred, gt in (("a", 110.0, 100.0), ("b", 145.0, 150.0), ("c", 225.0, 200.0)):
        rows.append(_row(patient, "ED", pred, 100.0, 80.0, lv_gt=gt))
        rows.append(_row(patient, "ES", 40.0, 50.0, 85.0))
    agreement = clinical_agreement(clinical_indices(pd.DataFrame(rows)))
    edv = agreement["LV_EDV"]
    assert edv["n"] == 3 and edv["excluded"] == 0
    assert edv["mae"] == pytest.approx((10 + 5 + 25) / 3)
    assert edv["bias"] == pytest.approx((10 - 5 + 25) / 3)
    sd = np.std([10.0, -5.0, 25.0], ddof=1)
    assert edv["sd"] == pytest.approx(sd)
    assert edv["loa_low"] == pytest.approx(10.0 - 1.96 * sd)
    assert edv["pearson_r"] == pytest.approx(np.corrcoef([110, 145, 225], [100, 150, 200])[0, 1])
    assert edv["unit"] == "ml"
    # EF = (EDV - 40) / EDV: pred and gt differ only through EDV.
    ef = agreement["LV_EF"]
    expected = [
        (110 - 40) / 110 * 100 - 60,
        (145 - 40) / 145 * 100 - 110 / 150 * 100,
        (225 - 40) / 225 * 100 - 80,
    ]
    assert ef["bias"] == pytest.approx(np.mean(expected))
    # Identical RV volumes: no error and a constant series, so r is undefined rather than NaN.
    assert agreement["RV_EDV"]["mae"] == 0.0
    assert agreement["RV_EDV"]["pearson_r"] is None


def test_missing_phase_and_zero_edv_are_excluded_and_counted():
    rows = [
        _row("a", "ED", 100.0, 0.0, 80.0),
        _row("a", "ES", 40.0, 0.0, 85.0),
        _row("b", "ED", 120.0, 90.0, 70.0),  # no ES volume
        _row("c", None, 1.0, 1.0, 1.0),  # an unlabelled frame is ignored
    ]
    indices = clinical_indices(pd.DataFrame(rows)).set_index("patient")
    assert list(indices.index) == ["a", "b"]
    assert math.isnan(indices.at["b", "LV_ESV_pred"])
    assert math.isnan(indices.at["b", "LV_EF_pred"])
    assert math.isnan(indices.at["a", "RV_EF_gt"])  # EDV 0
    agreement = clinical_agreement(indices.reset_index())
    assert (agreement["LV_EF"]["n"], agreement["LV_EF"]["excluded"]) == (1, 1)
    assert (agreement["RV_EF"]["n"], agreement["RV_EF"]["excluded"]) == (0, 2)
    assert agreement["RV_EF"]["mae"] is None
    assert agreement["LV_EF"]["sd"] is None
    assert agreement["MYO_mass"]["n"] == 2


def test_two_volumes_of_one_phase_are_refused():
    rows = [_row("a", "ED", 1.0, 1.0, 1.0), _row("a", "ED", 2.0, 1.0, 1.0)]
    with pytest.raises(DataError, match="patient a has more than one ED volume"):
        clinical_indices(pd.DataFrame(rows))
