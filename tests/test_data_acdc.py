"""Optional checks on a real ACDC training folder named by the ACDC_DATA environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from acdc_prune.config import DataConfig
from acdc_prune.data import VolumeDataset, discover, invert_to_original, load_label, split_records

pytestmark = pytest.mark.acdc


@pytest.fixture(scope="module")
def acdc_root() -> Path:
    root = os.environ.get("ACDC_DATA")
    if not root:
        pytest.skip("set ACDC_DATA to an ACDC training folder to run the real-data tests")
    return Path(root)


def test_discover_and_benchmark_split(acdc_root: Path) -> None:
    records = discover(acdc_root, require_labels=True)
    assert len(records) == 200 and len({r.patient for r in records}) == 100
    assert {r.phase for r in records} == {"ED", "ES"}
    train, val = split_records(records, DataConfig(split="benchmark"))
    assert len({r.patient for r in val}) == 20 and len({r.patient for r in train}) == 80


def test_pixdim_spacing_and_inversion_on_a_real_volume(acdc_root: Path) -> None:
    record = discover(acdc_root, require_labels=True)[0]
    original, spacing = load_label(record)
    item = VolumeDataset([record], DataConfig(target_spacing=[1.25, 1.25], cache="none"), divisor=32)[0]
    columns = np.linalg.norm(item["image"].affine[:3, :3].numpy(), axis=0)
    assert np.allclose(columns, [1.25, 1.25, spacing[2]], atol=1e-4)
    assert abs(item["image"].shape[1] * 1.25 - original.shape[0] * spacing[0]) < 32 * 1.25 + 2 * spacing[0]
    one_hot = torch.nn.functional.one_hot(item["label"][0].long(), 4).permute(3, 0, 1, 2).float()
    predicted = invert_to_original(one_hot, item).argmax(0).numpy()
    for value in (1, 2, 3):
        a, b = predicted == value, original == value
        assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) > 0.95
