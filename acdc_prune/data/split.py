"""Patient-level train/validation splits: seeded and stratified by group, or ACDC's fixed benchmark split."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from acdc_prune.config import DataConfig
from acdc_prune.data.records import VolumeRecord
from acdc_prune.errors import DataError
from acdc_prune.io import atomic_write_json

BENCHMARK_VAL_NUMBERS = frozenset(n for start in (17, 37, 57, 77, 97) for n in range(start, start + 4))
"""ACDC benchmark validation patients: the last 4 of each group of 20 (017-020, ..., 097-100)."""

_ACDC_PATIENT = re.compile(r"^patient(\d+)$")


def _patient_groups(records: list[VolumeRecord]) -> dict[str, str | None]:
    groups: dict[str, str | None] = {}
    for record in records:
        known = groups.get(record.patient)
        if known is not None and record.group is not None and known != record.group:
            raise DataError(f"{record.image}: group {record.group} differs from {known} of another volume")
        groups[record.patient] = known or record.group
    return groups


def benchmark_val_patients(patients: list[str]) -> set[str]:
    """Which of ``patients`` (``patientNNN`` ids) belong to the ACDC benchmark validation set.

    Raises:
        DataError: an id that is not ``patientNNN`` (the benchmark split is defined on ACDC ids only).
    """
    val = set()
    for patient in patients:
        match = _ACDC_PATIENT.match(patient)
        if not match:
            raise DataError(f"patient '{patient}': the benchmark split needs ACDC ids patient001..patient100")
        if int(match[1]) in BENCHMARK_VAL_NUMBERS:
            val.add(patient)
    return val


def stratified_val_patients(groups: dict[str, str | None], val_fraction: float, seed: int) -> set[str]:
    """Seeded choice of validation patients, stratified by group (unknown groups form one stratum).

    The number of validation patients is ``round(n * val_fraction)`` (at least 1, at most n - 1), shared
    among the strata in proportion to their sizes (largest remainders get the rounding).
    """
    patients = sorted(groups)
    if len(patients) < 2:
        raise DataError(f"a train/validation split needs at least 2 patients, found {len(patients)}")
    strata: dict[str, list[str]] = defaultdict(list)
    for patient in patients:
        strata[groups[patient] or ""].append(patient)
    n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
    names = sorted(strata)
    quotas = np.array([len(strata[n]) * n_val / len(patients) for n in names])
    counts = np.floor(quotas).astype(int)
    for index in np.argsort(-(quotas - counts), kind="stable")[: n_val - counts.sum()]:
        counts[index] += 1
    rng = np.random.default_rng(seed)
    val: set[str] = set()
    for name, count in zip(names, counts, strict=True):
        members = strata[name]
        val.update(members[i] for i in rng.permutation(len(members))[:count])
    return val


def split_records(
    records: list[VolumeRecord], data_cfg: DataConfig
) -> tuple[list[VolumeRecord], list[VolumeRecord]]:
    """Split volumes into (train, val) by patient: ED and ES of a patient always stay together.

    Args:
        records: volumes from :func:`discover`.
        data_cfg: ``split`` (``"stratified"`` uses ``val_fraction`` and ``split_seed``; ``"benchmark"``
            is ACDC's fixed split: patients 017-020, 037-040, 057-060, 077-080, 097-100 validate).

    Returns:
        ``(train, val)`` record lists, in the order of ``records``.

    Raises:
        DataError: fewer than 2 patients, conflicting groups, non-ACDC ids for the benchmark split, or a
            split with an empty side.
    """
    groups = _patient_groups(records)
    if data_cfg.split == "benchmark":
        val_patients = benchmark_val_patients(sorted(groups))
    else:
        val_patients = stratified_val_patients(groups, data_cfg.val_fraction, data_cfg.split_seed)
    train = [r for r in records if r.patient not in val_patients]
    val = [r for r in records if r.patient in val_patients]
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(f"the {data_cfg.split} split of {len(groups)} patients leaves the {side} set empty")
    return train, val


def save_split(path: str | Path, train: list[VolumeRecord], val: list[VolumeRecord]) -> None:
    """Write the split as JSON ``{"train": [patients], "val": [patients]}`` (sorted ids), atomically."""
    atomic_write_json(
        Path(path),
        {"train": sorted({r.patient for r in train}), "val": sorted({r.patient for r in val})},
    )
