"""Phantom generator: determinism, ACDC-like files, anatomy and function per group, cached data sets."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from acdc_prune.data import discover, phantom_root
from acdc_prune.data.phantom import GENERATOR_VERSION, GROUPS
from acdc_prune.data.records import parse_info_cfg


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(path: Path) -> tuple[np.ndarray, float]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), float(np.prod(img.header.get_zooms()[:3])) / 1000.0


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path, make_phantom) -> None:
    a = _files(make_phantom(tmp_path / "a", 2, 3))
    b = _files(make_phantom(tmp_path / "b", 2, 3))
    c = _files(make_phantom(tmp_path / "c", 2, 4))
    assert a == b
    assert len(a) == 2 * 5
    shared = set(a) & set(c)
    assert any(a[name] != c[name] for name in shared if name.endswith(".nii.gz"))


def test_acdc_layout_info_and_geometry(tiny_phantom: Path) -> None:
    records = discover(tiny_phantom, "acdc", require_labels=True)
    assert len(records) == 10
    assert [r.group for r in records[::2]] == list(GROUPS)
    for record in records:
        info = parse_info_cfg(record.image.parent / "Info.cfg")
        assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
        assert record.frame == int(info[record.phase])
        image = nib.load(str(record.image))
        sx, sy, sz = image.header.get_zooms()[:3]
        assert 1.2 <= sx == sy <= 1.9 and 5.0 <= sz <= 10.0
        assert 6 <= image.shape[2] <= 12
        assert image.get_data_dtype() == np.int16
        assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), [sx, sy, sz], rtol=1e-5)
        assert np.allclose(nib.load(str(record.label)).affine, image.affine)
    shapes = {nib.load(str(r.image)).shape for r in records}
    assert len(shapes) >= 4


def test_label_statistics_follow_the_anatomy(tiny_phantom: Path) -> None:
    records = discover(tiny_phantom, "acdc", require_labels=True)
    ef = {}
    for ed, es in zip(records[::2], records[1::2], strict=True):
        ed_labels, voxel_ml = _labels(ed.label)
        es_labels, _ = _labels(es.label)
        assert set(np.unique(ed_labels)) == {0, 1, 2, 3}
        lv_ed, lv_es = (ed_labels == 3).sum() * voxel_ml, (es_labels == 3).sum() * voxel_ml
        assert lv_es < lv_ed
        ef[ed.group] = 1.0 - lv_es / lv_ed
        heart_per_slice = (ed_labels > 0).sum(axis=(0, 1))
        assert heart_per_slice[0] > heart_per_slice[-1]
        assert np.all(np.diff(heart_per_slice) <= 0.02 * heart_per_slice[0])
        myo_ed, myo_es = (ed_labels == 2).sum(), (es_labels == 2).sum()
        assert abs(myo_es - myo_ed) < 0.3 * myo_ed
    assert ef["DCM"] < ef["NOR"] - 0.2
    assert ef["HCM"] > ef["NOR"] - 0.05


def test_intensities_overlap_between_structures_and_surroundings(tiny_phantom: Path) -> None:
    record = discover(tiny_phantom)[0]
    image = np.asarray(nib.load(str(record.image)).dataobj).astype(np.float32)
    labels, _ = _labels(record.label)
    blood = image[labels == 3]
    myo = image[labels == 2]
    background = image[labels == 0]
    lo, hi = np.percentile(blood, [5, 95])
    assert np.mean((background > lo) & (background < hi)) > 0.005
    lo, hi = np.percentile(myo, [5, 95])
    assert np.mean((background > lo) & (background < hi)) > 0.02
    assert np.median(blood) > 2 * np.median(myo)


def test_phantom_root_generates_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = phantom_root(tmp_path, 2, 7)
    assert root == tmp_path / "phantom" / f"v{GENERATOR_VERSION}-n2-s7"
    assert len(discover(root)) == 4
    assert [p.name for p in (tmp_path / "phantom").iterdir()] == [root.name]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached phantom was regenerated")

    monkeypatch.setattr("acdc_prune.data.phantom.synthesize_dataset", refuse)
    assert phantom_root(tmp_path, 2, 7) == root


def test_phantom_root_leaves_no_partial_folder_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(out: Path, n_patients: int, seed: int) -> Path:
        (Path(out) / "patient001").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr("acdc_prune.data.phantom.synthesize_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        phantom_root(tmp_path, 2, 7)
    assert list((tmp_path / "phantom").iterdir()) == []
