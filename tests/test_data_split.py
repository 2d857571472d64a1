"""Patient-level splits: no leakage, stratification by group, determinism, ACDC's benchmark split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acdc_prune.config import DataConfig
from acdc_prune.data import VolumeRecord, save_split, split_records
from acdc_prune.data.phantom import GROUPS
from acdc_prune.data.split import BENCHMARK_VAL_NUMBERS
from acdc_prune.errors import DataError


def _acdc_records(n_patients: int = 100) -> list[VolumeRecord]:
    """ED/ES records named like ACDC's training set: groups in blocks of 20 (files are not needed)."""
    acdc_groups = ("DCM", "HCM", "MINF", "NOR", "RV")
    records = []
    for number in range(1, n_patients + 1):
        patient = f"patient{number:03d}"
        group = acdc_groups[(number - 1) // 20 % 5]
        for phase, frame in (("ED", 1), ("ES", 12)):
            image = Path(f"/data/{patient}/{patient}_frame{frame:02d}.nii.gz")
            records.append(
                VolumeRecord(
                    patient, phase, image, image.with_name(image.name[:-7] + "_gt.nii.gz"), group, frame
                )
            )
    return records


def _patients(records: list[VolumeRecord]) -> set[str]:
    return {r.patient for r in records}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_split_keeps_patients_whole_and_balances_groups(seed: int) -> None:
    records = _acdc_records()
    train, val = split_records(records, DataConfig(val_fraction=0.2, split_seed=seed))
    assert not _patients(train) & _patients(val)
    assert _patients(train) | _patients(val) == _patients(records)
    assert len(train) + len(val) == len(records)
    assert len(_patients(val)) == 20
    for group in GROUPS:
        assert sum(1 for p in _patients(val) if next(r.group for r in val if r.patient == p) == group) == 4
    for patient in _patients(val):
        assert sorted(r.phase for r in val if r.patient == patient) == ["ED", "ES"]


def test_stratified_split_is_deterministic_by_seed() -> None:
    records = _acdc_records()
    first = split_records(records, DataConfig(split_seed=3))
    assert split_records(records, DataConfig(split_seed=3)) == first
    assert _patients(split_records(list(reversed(records)), DataConfig(split_seed=3))[1]) == _patients(
        first[1]
    )
    assert _patients(split_records(records, DataConfig(split_seed=4))[1]) != _patients(first[1])


def test_stratified_split_of_small_and_ungrouped_sets() -> None:
    ungrouped = [VolumeRecord(r.patient, r.phase, r.image, r.label, None, r.frame) for r in _acdc_records(3)]
    train, val = split_records(ungrouped, DataConfig(val_fraction=0.1))
    assert len(_patients(val)) == 1 and len(_patients(train)) == 2
    with pytest.raises(DataError, match="at least 2 patients"):
        split_records(ungrouped[:2], DataConfig())


def test_benchmark_split_membership() -> None:
    train, val = split_records(_acdc_records(), DataConfig(split="benchmark"))
    expected = {f"patient{n:03d}" for s in (17, 37, 57, 77, 97) for n in range(s, s + 4)}
    assert _patients(val) == expected
    assert len(_patients(train)) == 80
    assert len(BENCHMARK_VAL_NUMBERS) == 20


def test_benchmark_split_refuses_other_ids_and_empty_sides() -> None:
    odd = [VolumeRecord("case_1", None, Path("a.nii.gz"), None, None, None)] * 2
    with pytest.raises(DataError, match="case_1"):
        split_records(odd, DataConfig(split="benchmark"))
    with pytest.raises(DataError, match="validation set empty"):
        split_records(_acdc_records(10), DataConfig(split="benchmark"))


def test_save_split_writes_patient_lists(tmp_path: Path) -> None:
    train, val = split_records(_acdc_records(), DataConfig(split="benchmark"))
    save_split(tmp_path / "run" / "split.json", train, val)
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved == {"train": sorted(_patients(train)), "val": sorted(_patients(val))}
