"""Discovery of the ACDC and nnU-Net raw layouts, and the config-driven record loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from acdc_prune.config import DataConfig, config_from_dict
from acdc_prune.data import discover, load_records
from acdc_prune.errors import DataError


def _nnunet_from_acdc(acdc: Path, out: Path, test_patients: int = 2) -> Path:
    """Copy an ACDC folder into nnU-Net's raw layout; the last patients go to imagesTs, unlabelled."""
    records = discover(acdc, require_labels=True)
    patients = sorted({r.patient for r in records})
    test = set(patients[-test_patients:])
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (out / folder).mkdir(parents=True)
    for r in records:
        case = r.image.name[: -len(".nii.gz")]
        split = "Ts" if r.patient in test else "Tr"
        shutil.copy(r.image, out / f"images{split}" / f"{case}_0000.nii.gz")
        if split == "Tr":
            shutil.copy(r.label, out / "labelsTr" / f"{case}.nii.gz")
    meta = {"channel_names": {"0": "cineMRI"}, "labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3}}
    (out / "dataset.json").write_text(json.dumps({**meta, "numTraining": 6, "file_ending": ".nii.gz"}))
    return out


def test_acdc_layout_records(tiny_phantom: Path) -> None:
    records = discover(tiny_phantom)
    assert len(records) == 10
    assert [r.patient for r in records] == sorted(r.patient for r in records)
    assert [r.phase for r in records] == ["ED", "ES"] * 5
    first = records[0]
    assert first.patient == "patient001" and first.group == "NOR" and first.frame == 1
    assert first.image.name == "patient001_frame01.nii.gz"
    assert first.label.name == "patient001_frame01_gt.nii.gz"
    assert discover(tiny_phantom, layout="acdc") == records


def test_acdc_test_folder_without_labels_is_valid_for_inference(tiny_phantom: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_phantom / "patient002", tmp_path / "patient002")
    for gt in tmp_path.rglob("*_gt.nii.gz"):
        gt.unlink()
    records = discover(tmp_path)
    assert [r.label for r in records] == [None, None]
    with pytest.raises(DataError, match="patient002_frame01_gt.nii.gz"):
        discover(tmp_path, require_labels=True)


def test_nnunet_layout_groups_cases_by_patient_and_derives_phases(tiny_phantom: Path, tmp_path: Path) -> None:
    root = _nnunet_from_acdc(tiny_phantom, tmp_path / "Dataset027_ACDC")
    acdc = {(r.patient, r.frame): r for r in discover(tiny_phantom)}
    train = discover(root, require_labels=True)
    assert len(train) == 6 and len({r.patient for r in train}) == 3
    for r in train:
        assert r.label is not None and r.label.parent.name == "labelsTr"
        assert r.phase == acdc[(r.patient, r.frame)].phase
        assert r.group is None
    assert discover(root, layout="nnunet") == train
    test = discover(root / "imagesTs")
    assert {r.patient for r in test} == {"patient004", "patient005"}
    assert all(r.label is None for r in test)
    assert [r.phase for r in test] == ["ED", "ES", "ED", "ES"]


def test_nnunet_case_ids_without_patient_structure_keep_one_volume_per_patient(
    tiny_phantom: Path, tmp_path: Path
) -> None:
    (tmp_path / "imagesTr").mkdir()
    shutil.copy(
        tiny_phantom / "patient001" / "patient001_frame01.nii.gz",
        tmp_path / "imagesTr" / "case_7_0000.nii.gz",
    )
    shutil.copy(
        tiny_phantom / "patient001" / "patient001_frame01.nii.gz", tmp_path / "imagesTr" / "p9_ES_0000.nii.gz"
    )
    records = discover(tmp_path)
    assert [(r.patient, r.phase, r.frame, r.label) for r in records] == [
        ("case_7", None, None, None),
        ("p9", "ES", None, None),
    ]


def test_load_records_uses_the_root_or_the_cached_phantom(tiny_phantom: Path, tmp_path: Path) -> None:
    assert load_records(DataConfig(root=str(tiny_phantom)), tmp_path) == discover(tiny_phantom)
    records = load_records(DataConfig(root=None, phantom_patients=2, phantom_seed=5), tmp_path)
    assert len(records) == 4
    assert records[0].image.is_relative_to(tmp_path / "phantom")


def test_the_config_resolves_the_one_cache_folder(tmp_path: Path) -> None:
    config = config_from_dict({"logging": {"runs_dir": str(tmp_path / "runs")}})
    assert config.cache_dir == tmp_path / "runs" / ".cache"
    config.data.cache_dir = str(tmp_path / "c")
    assert config.cache_dir == tmp_path / "c"
