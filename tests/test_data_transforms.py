"""Preprocessing, training slices, whole volumes, caches, and exact inversion to the original geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acdc_prune.config import DataConfig
from acdc_prune.data import TrainSliceDataset, VolumeDataset, discover, invert_to_original, load_label
from acdc_prune.errors import ConfigError


def _cfg(**kwargs: object) -> DataConfig:
    return DataConfig(**{"patch_size": [64, 64], "target_spacing": [1.5, 1.5], **kwargs})


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    """(1, H, W, Z) labels -> (4, H, W, Z) float one-hot."""
    return torch.nn.functional.one_hot(labels[0].long(), 4).permute(3, 0, 1, 2).float()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_train_slices_shapes_values_and_length(tiny_phantom: Path) -> None:
    records = discover(tiny_phantom)[:4]
    dataset = TrainSliceDataset(records, _cfg(), divisor=16, seed=0)
    slices = sum(load_label(r)[0].shape[2] for r in records)
    assert len(dataset) == slices
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[i]
        assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, 64, 64) and item["label"].dtype == torch.int64
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3}
        assert type(item["image"]) is torch.Tensor


def test_train_slices_are_deterministic_by_seed_and_foreground_aware(tiny_phantom: Path) -> None:
    records = discover(tiny_phantom)[:2]
    cfg = _cfg(foreground_prob=1.0)
    a = TrainSliceDataset(records, cfg, 16, seed=1)
    b = TrainSliceDataset(records, cfg, 16, seed=1)
    c = TrainSliceDataset(records, cfg, 16, seed=2)
    first = [a[i] for i in range(4)]
    assert all(torch.equal(x["image"], b[i]["image"]) for i, x in enumerate(first))
    assert not all(torch.equal(x["image"], c[i]["image"]) for i, x in enumerate(first))
    mid_slices = [a[i] for i in range(1, 4)]
    assert all((x["label"] > 0).any() for x in mid_slices)


def test_train_slices_without_augmentation_are_plain_crops(tiny_phantom: Path) -> None:
    record = discover(tiny_phantom)[0]
    dataset = TrainSliceDataset([record], _cfg(augment=False, patch_size=[256, 256]), 16, seed=0)
    volume = VolumeDataset([record], _cfg(), 16)[0]
    item = dataset[2]
    image = volume["image"][0, ..., 2]
    h, w = image.shape
    x, y = (256 - h) // 2, (256 - w) // 2
    assert torch.equal(item["image"][0, x : x + h, y : y + w], image.as_tensor())
    assert torch.equal(item["label"][0, x : x + h, y : y + w], volume["label"][0, ..., 2].long().as_tensor())


def test_patch_size_must_be_divisible_by_the_stride(tiny_phantom: Path) -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        TrainSliceDataset(discover(tiny_phantom)[:1], _cfg(patch_size=[60, 64]), divisor=16, seed=0)


def test_volume_preprocessing_spacing_padding_and_normalisation(tiny_phantom: Path) -> None:
    records = discover(tiny_phantom)[:2]
    dataset = VolumeDataset(records, _cfg(target_spacing=[1.25, 1.25]), divisor=32)
    for record, item in zip(records, dataset, strict=True):
        image, label = item["image"], item["label"]
        original, spacing = load_label(record)
        assert image.shape == label.shape and image.ndim == 4 and image.shape[0] == 1
        assert image.shape[1] % 32 == 0 and image.shape[2] % 32 == 0
        assert image.shape[3] == original.shape[2] == item["original_shape"][2]
        columns = np.linalg.norm(image.affine[:3, :3].numpy(), axis=0)
        assert np.allclose(columns, [1.25, 1.25, spacing[2]], atol=1e-4)
        assert item["record"] == record
        assert set(label.unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
        assert abs(float(image.mean())) < 0.3 and 0.7 < float(image.std()) < 1.3


def test_inversion_is_exact_when_the_spacing_is_kept(tiny_phantom: Path) -> None:
    record = discover(tiny_phantom)[3]
    original, spacing = load_label(record)
    item = VolumeDataset([record], _cfg(target_spacing=list(spacing[:2])), divisor=16)[0]
    assert item["image"].shape[1:3] != original.shape[:2]
    inverted = invert_to_original(_one_hot(item["label"]), item)
    assert tuple(inverted.shape) == (4, *original.shape)
    assert np.array_equal(inverted.argmax(0).numpy().astype(np.uint8), original)
    assert torch.allclose(inverted.affine, item["original_affine"])


def test_inversion_after_resampling_restores_geometry_and_labels(tiny_phantom: Path) -> None:
    import nibabel as nib

    for record in discover(tiny_phantom)[:4]:
        original, _ = load_label(record)
        item = VolumeDataset([record], _cfg(target_spacing=[1.0, 1.0]), divisor=16)[0]
        inverted = invert_to_original(_one_hot(item["label"]), item)
        assert tuple(inverted.shape[1:]) == original.shape
        assert np.allclose(inverted.affine.numpy(), nib.load(str(record.image)).affine, atol=1e-4)
        predicted = inverted.argmax(0).numpy()
        for value in (1, 2, 3):
            assert _dice(predicted == value, original == value) > 0.95


def test_unlabelled_records_give_image_only_items(tiny_phantom: Path) -> None:
    record = discover(tiny_phantom)[0]
    unlabelled = type(record)(record.patient, record.phase, record.image, None, record.group, record.frame)
    dataset = VolumeDataset([unlabelled, record], _cfg(), divisor=16)
    first, second = dataset[0], dataset[1]
    assert "label" not in first and "label" in second
    assert torch.equal(first["image"].as_tensor(), second["image"].as_tensor())
    probs = torch.softmax(torch.randn(4, *first["image"].shape[1:]), 0)
    assert tuple(invert_to_original(probs, first).shape[1:]) == load_label(record)[0].shape


@pytest.mark.parametrize("cache", ["disk", "none"])
def test_disk_and_no_cache_match_the_memory_cache(tiny_phantom: Path, tmp_path: Path, cache: str) -> None:
    records = discover(tiny_phantom)[:2]
    memory = VolumeDataset(records, _cfg(), 16)
    other = VolumeDataset(records, _cfg(cache=cache), 16, cache_dir=tmp_path)
    for a, b in zip(memory, other, strict=True):
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert torch.allclose(a["image"].affine, b["image"].affine)
    if cache == "disk":
        files = list((tmp_path / "preprocessed").rglob("*.pt"))
        assert len(files) == 2
        assert all(torch.load(f, weights_only=True)["image"].shape[0] == 1 for f in files)
        again = VolumeDataset(records, _cfg(cache=cache), 16, cache_dir=tmp_path)
        assert torch.equal(again[1]["label"].as_tensor(), memory[1]["label"].as_tensor())
