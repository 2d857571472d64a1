"""Bad input: every loader error is a one-line DataError naming the file; check_dataset lists them all."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from acdc_prune.config import DataConfig
from acdc_prune.data import VolumeDataset, check_dataset, discover, load_label
from acdc_prune.data.nifti import write_nifti
from acdc_prune.errors import DataError


@pytest.fixture
def patient(tiny_phantom: Path, tmp_path: Path) -> Path:
    """A writable copy of one phantom patient in ``tmp_path/data/patient001``."""
    folder = tmp_path / "data" / "patient001"
    shutil.copytree(tiny_phantom / "patient001", folder)
    return folder


def _load(root: Path, cache: str = "none") -> None:
    """Discover and preprocess every volume of ``root``, then read every label."""
    records = discover(root, require_labels=True)
    dataset = VolumeDataset(records, DataConfig(cache=cache), divisor=16)
    for i, record in enumerate(records):
        dataset[i]
        load_label(record)


def _assert_one_line_naming(err: pytest.ExceptionInfo[DataError], path: Path, problem: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert problem in message


def _image(folder: Path) -> Path:
    return folder / "patient001_frame01.nii.gz"


def _label(folder: Path) -> Path:
    return folder / "patient001_frame01_gt.nii.gz"


def test_corrupt_gzip(patient: Path) -> None:
    _image(patient).write_bytes(b"\x1f\x8b\x08\x00garbage-that-is-not-deflate" * 20)
    with pytest.raises(DataError) as err:
        _load(patient.parent)
    _assert_one_line_naming(err, _image(patient), "corrupt")


def test_truncated_gzip(patient: Path) -> None:
    data = _image(patient).read_bytes()
    _image(patient).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        _load(patient.parent, cache="memory")
    _assert_one_line_naming(err, _image(patient), "truncated")


def test_not_nifti(patient: Path) -> None:
    _image(patient).write_bytes(gzip.compress(b"this is a text file, not an image\n" * 40))
    with pytest.raises(DataError) as err:
        _load(patient.parent)
    _assert_one_line_naming(err, _image(patient), "not a NIfTI")


def test_label_shape_mismatch(patient: Path) -> None:
    label = nib.load(str(_label(patient)))
    write_nifti(_label(patient), np.asarray(label.dataobj)[:-3], label.affine)
    with pytest.raises(DataError) as err:
        _load(patient.parent)
    _assert_one_line_naming(err, _label(patient), "differs from image shape")


def test_label_affine_mismatch(patient: Path) -> None:
    label = nib.load(str(_label(patient)))
    moved = label.affine.copy()
    moved[0, 3] += 5.0
    write_nifti(_label(patient), np.asarray(label.dataobj), moved)
    with pytest.raises(DataError) as err:
        _load(patient.parent)
    _assert_one_line_naming(err, _label(patient), "affine differs")


def test_label_value_4(patient: Path) -> None:
    label = nib.load(str(_label(patient)))
    data = np.asarray(label.dataobj).copy()
    data[data == 3] = 4
    write_nifti(_label(patient), data, label.affine)
    with pytest.raises(DataError) as err:
        _load(patient.parent)
    _assert_one_line_naming(err, _label(patient), "unexpected label values 4")
    with pytest.raises(DataError) as err:
        load_label(discover(patient.parent)[0])
    _assert_one_line_naming(err, _label(patient), "unexpected label values 4")


@pytest.mark.parametrize("ndim", [2, 4])
def test_2d_and_4d_images(patient: Path, ndim: int) -> None:
    image = nib.load(str(_image(patient)))
    data = np.asarray(image.dataobj)
    data = data[..., 0] if ndim == 2 else np.stack([data, data], axis=-1)
    nib.save(nib.Nifti1Image(data, image.affine), str(_image(patient)))
    with pytest.raises(DataError) as err:
        _load(patient.parent)
    _assert_one_line_naming(err, _image(patient), f"got a {ndim}D image")


def test_missing_info_cfg_key(patient: Path) -> None:
    info = patient / "Info.cfg"
    info.write_text("".join(line for line in info.read_text().splitlines(True) if not line.startswith("ES")))
    with pytest.raises(DataError) as err:
        discover(patient.parent)
    _assert_one_line_naming(err, info, "missing key 'ES'")


def test_missing_info_cfg_and_malformed_lines(patient: Path) -> None:
    info = patient / "Info.cfg"
    info.write_text("ED 1\n")
    with pytest.raises(DataError) as err:
        discover(patient.parent)
    _assert_one_line_naming(err, info, "line 1")
    info.unlink()
    with pytest.raises(DataError) as err:
        discover(patient.parent)
    _assert_one_line_naming(err, info, "Info.cfg not found")


def test_missing_es_frame(patient: Path) -> None:
    es = next(p for p in patient.glob("*.nii.gz") if "frame01" not in p.name and "_gt" not in p.name)
    es.unlink()
    with pytest.raises(DataError) as err:
        discover(patient.parent)
    _assert_one_line_naming(err, es, "ES frame")


def test_empty_missing_and_wrong_layout_folders(tiny_phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        discover(tmp_path)
    _assert_one_line_naming(err, tmp_path, "empty")
    with pytest.raises(DataError) as err:
        discover(tmp_path / "nothing")
    _assert_one_line_naming(err, tmp_path / "nothing", "not found")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as err:
        discover(tmp_path)
    _assert_one_line_naming(err, tmp_path, "neither an ACDC folder")
    with pytest.raises(DataError) as err:
        discover(tiny_phantom, layout="nnunet")
    _assert_one_line_naming(err, tiny_phantom, "looks like the 'acdc' layout")


def test_check_dataset_lists_every_problem(tiny_phantom: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_phantom, root)
    bad_label = root / "patient002" / "patient002_frame01_gt.nii.gz"
    label = nib.load(str(bad_label))
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 4
    write_nifti(bad_label, data, label.affine)
    truncated = root / "patient003" / "patient003_frame01.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (root / "patient004" / "Info.cfg").write_text("ED: 1\nGroup: HCM\n")
    with_nan = root / "patient005" / "patient005_frame01.nii.gz"
    image = nib.load(str(with_nan))
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    data[0, 0, 0] = np.nan
    write_nifti(with_nan, data, image.affine)
    report = check_dataset(root)
    assert not report.ok
    assert len(report.problems) == 4
    for path in (bad_label, truncated, root / "patient004" / "Info.cfg", with_nan):
        assert sum(str(path) in p for p in report.problems) == 1
    assert any("1 of" in p and "voxels are NaN or infinite" in p for p in report.problems)
    assert report.summary["patients"] == 4 and report.summary["volumes"] == 8
    assert report.summary["label_values"] == [0, 1, 2, 3, 4]


def test_check_dataset_summary_of_a_clean_phantom(tiny_phantom: Path) -> None:
    report = check_dataset(tiny_phantom)
    assert report.ok, report.problems
    summary = report.summary
    assert summary["layout"] == "acdc" and summary["patients"] == 5 and summary["volumes"] == 10
    assert summary["groups"] == {"DCM": 1, "HCM": 1, "MINF": 1, "NOR": 1, "RV": 1}
    assert summary["phases"] == {"ED": 5, "ES": 5}
    assert summary["label_values"] == [0, 1, 2, 3]
    assert 1.2 <= summary["in_plane_spacing_mm"][0] <= summary["in_plane_spacing_mm"][1] <= 1.9
    assert 6 <= summary["slices"][0] <= summary["slices"][1] <= 12
    assert dict(report.summary_rows())["patients"] == "5"
    missing = check_dataset(tiny_phantom.parent / "does-not-exist")
    assert not missing.ok and "not found" in missing.problems[0]
