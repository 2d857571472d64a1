"""Clinical indices (ventricular volumes, ejection fractions, myocardial mass) and their agreement.

Formulas (volumes come from voxel counts times voxel volume in the original geometry):

* EDV, ESV: cavity volume in ml at end-diastole and end-systole (LV label 3, RV label 1).
* EF = (EDV - ESV) / EDV * 100 in %; undefined when EDV is 0 or a phase is missing.
* Myocardial mass = myocardium volume at ED (ml) * 1.05 g/ml, in g.

Undefined values are NaN in the per-patient table and are left out (and counted) by the agreement.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from acdc_prune.errors import DataError

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
INDICES: dict[str, str] = {
    "LV_EDV": "ml",
    "LV_ESV": "ml",
    "LV_EF": "%",
    "RV_EDV": "ml",
    "RV_ESV": "ml",
    "RV_EF": "%",
    "MYO_mass": "g",
}


def _ejection_fraction(edv: float, esv: float) -> float:
    """EF in % from EDV and ESV; NaN when EDV is 0 or either volume is missing."""
    if not edv > 0 or math.isnan(esv):
        return math.nan
    return (edv - esv) / edv * 100.0


def _patient_indices(by_phase: pd.DataFrame, source: str) -> dict[str, float]:
    """The seven indices of one patient from ``{S}_volume_{source}_ml`` at ED and ES (NaN if missing)."""

    def volume(structure: str, phase: str) -> float:
        column = f"{structure}_volume_{source}_ml"
        return float(by_phase.at[phase, column]) if phase in by_phase.index else math.nan

    values = {}
    for ventricle in ("LV", "RV"):
        edv, esv = volume(ventricle, "ED"), volume(ventricle, "ES")
        values[f"{ventricle}_EDV"] = edv
        values[f"{ventricle}_ESV"] = esv
        values[f"{ventricle}_EF"] = _ejection_fraction(edv, esv)
    values["MYO_mass"] = volume("MYO", "ED") * MYOCARDIUM_DENSITY_G_PER_ML
    return values


def clinical_indices(volumes: pd.DataFrame) -> pd.DataFrame:
    """Per-patient clinical indices from predicted and ground-truth structure volumes.

    Args:
        volumes: one row per volume with columns ``patient``, ``phase`` (``"ED"``, ``"ES"``; rows with
            any other phase, e.g. ``None`` for unlabelled frames, are ignored) and, for ``S`` in RV,
            MYO, LV, ``S_volume_pred_ml`` and ``S_volume_gt_ml`` (the per-volume table of
            :func:`acdc_prune.engine.evaluate.evaluate_model`).

    Returns:
        One row per patient (column ``patient``) with ``{index}_pred`` and ``{index}_gt`` for every
        index of :data:`INDICES`: volumes in ml, EF in %, mass in g; NaN where undefined.

    Raises:
        DataError: a patient has two volumes of the same phase.
    """
    phased = volumes[volumes["phase"].isin(["ED", "ES"])]
    duplicated = phased.duplicated(subset=["patient", "phase"])
    if duplicated.any():
        first = phased[duplicated].iloc[0]
        raise DataError(f"patient {first['patient']} has more than one {first['phase']} volume")
    rows = []
    for patient, group in phased.groupby("patient", sort=True):
        by_phase = group.set_index("phase")
        row: dict[str, object] = {"patient": patient}
        pred, gt = _patient_indices(by_phase, "pred"), _patient_indices(by_phase, "gt")
        for index in INDICES:
            row[f"{index}_pred"] = pred[index]
            row[f"{index}_gt"] = gt[index]
        rows.append(row)
    columns = ["patient"] + [f"{index}_{source}" for index in INDICES for source in ("pred", "gt")]
    return pd.DataFrame(rows, columns=columns)


def clinical_agreement(indices: pd.DataFrame) -> dict[str, dict[str, float | int | str | None]]:
    """Agreement of predicted with ground-truth clinical indices over patients.

    Args:
        indices: the table of :func:`clinical_indices`.

    Returns:
        Per index: ``unit``; ``n`` (patients with both values defined) and ``excluded`` (patients
        where either is NaN); ``mae`` (mean absolute error), ``bias`` (mean of pred - gt), ``sd``
        (standard deviation of pred - gt, ddof 1) with the Bland-Altman limits ``loa_low`` and
        ``loa_high`` (bias -/+ 1.96 sd); ``pearson_r``. A statistic that needs more pairs than there
        are (``sd`` and limits 2, ``pearson_r`` 3 and non-constant series) is ``None``.
    """
    agreement: dict[str, dict[str, float | int | str | None]] = {}
    for index, unit in INDICES.items():
        pred = indices[f"{index}_pred"].to_numpy(dtype=float)
        gt = indices[f"{index}_gt"].to_numpy(dtype=float)
        keep = np.isfinite(pred) & np.isfinite(gt)
        pred, gt = pred[keep], gt[keep]
        difference = pred - gt
        n = int(keep.sum())
        sd = float(np.std(difference, ddof=1)) if n >= 2 else None
        bias = float(difference.mean()) if n else None
        correlated = n >= 3 and np.ptp(pred) > 0 and np.ptp(gt) > 0
        agreement[index] = {
            "unit": unit,
            "n": n,
            "excluded": int((~keep).sum()),
            "mae": float(np.abs(difference).mean()) if n else None,
            "bias": bias,
            "sd": sd,
            "loa_low": bias - 1.96 * sd if sd is not None else None,
            "loa_high": bias + 1.96 * sd if sd is not None else None,
            "pearson_r": float(stats.pearsonr(pred, gt).statistic) if correlated else None,
        }
    return agreement
