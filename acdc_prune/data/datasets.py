"""Training-slice and whole-volume datasets over cached preprocessed volumes, and the inverse mapping."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import SpatialResample
from monai.utils import convert_to_tensor

from acdc_prune.config import DEFAULT_CACHE, DataConfig
from acdc_prune.data.nifti import check_label_values, check_pair, open_nifti, read_volume, spatial_shape
from acdc_prune.data.records import VolumeRecord
from acdc_prune.data.transforms import check_divisible, preprocess_transforms, train_slice_transforms
from acdc_prune.errors import DataError

PREPROCESS_VERSION = 1
"""Part of the disk-cache key; bumped whenever :func:`preprocess_transforms` changes its output."""


@contextmanager
def _data_errors() -> Iterator[None]:
    """Re-raise the DataError inside MONAI's ``RuntimeError("applying transform ...")`` wrappers."""
    try:
        yield
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _record_dict(record: VolumeRecord, with_label: bool) -> dict[str, str]:
    item = {"image": str(record.image)}
    if with_label:
        item["label"] = str(record.label)
    return item


def _file_hash(item: dict[str, str]) -> bytes:
    """Disk-cache key of one volume: its paths, sizes and modification times (a changed file is redone)."""
    parts = []
    for key in sorted(item):
        stat = os.stat(item[key])
        parts.append(f"{key}={os.path.abspath(item[key])}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.md5("|".join(parts).encode()).hexdigest().encode()


def _settings_key(data_cfg: DataConfig, divisor: int, with_label: bool) -> str:
    settings = {
        "version": PREPROCESS_VERSION,
        "target_spacing": data_cfg.target_spacing,
        "intensity_percentiles": data_cfg.intensity_percentiles,
        "divisor": divisor,
        "with_label": with_label,
    }
    return hashlib.md5(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def preprocessed_volumes(
    records: Sequence[VolumeRecord],
    data_cfg: DataConfig,
    divisor: int,
    with_label: bool,
    cache_dir: str | Path = DEFAULT_CACHE,
) -> Dataset:
    """A MONAI dataset of preprocessed volumes (:func:`preprocess_transforms`), cached per ``data_cfg.cache``.

    ``"memory"`` is a ``CacheDataset`` (filled now, in threads), ``"disk"`` a ``PersistentDataset`` in
    ``<cache_dir>/preprocessed/<settings hash>`` (files keyed by path, size and mtime; the folder is
    the config's :attr:`~acdc_prune.config.Config.cache_dir`), ``"none"`` a plain ``Dataset``.

    Raises:
        DataError: a record lacks a label where ``with_label``, or (memory cache) any file fails to load.
    """
    if with_label:
        missing = [r for r in records if r.label is None]
        if missing:
            raise DataError(f"{missing[0].image}: no label file, but this dataset needs labels")
    for record in records:
        # Header checks up front (cheap) so that most bad files fail here, before the loading threads.
        image = open_nifti(record.image)
        spatial_shape(image, record.image)
        if with_label:
            check_pair(image, open_nifti(record.label), record.image, record.label)
    data = [_record_dict(r, with_label) for r in records]
    transform = preprocess_transforms(data_cfg, divisor, with_label)
    if data_cfg.cache == "memory":
        with _data_errors():
            return CacheDataset(
                data, transform, cache_rate=1.0, num_workers=None, progress=False, copy_cache=False
            )
    if data_cfg.cache == "disk":
        folder = Path(cache_dir) / "preprocessed" / _settings_key(data_cfg, divisor, with_label)
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=folder, hash_func=_file_hash, track_meta=True)
    return Dataset(data, transform)


def _slice_count(record: VolumeRecord) -> int:
    return spatial_shape(open_nifti(record.image), record.image)[2]


class TrainSliceDataset(torch.utils.data.Dataset):
    """2D training samples: one item per short-axis slice of every volume, randomly cropped and augmented.

    Item ``i`` is slice ``z`` of volume ``v`` (volumes in ``records`` order, slices in Z order); its
    crop and augmentation are random (see :func:`train_slice_transforms`). The random state is seeded
    with ``seed``; with worker processes use ``monai.data.DataLoader``, whose ``worker_init_fn`` reseeds
    the transforms of every worker from torch's seed, so a run is reproducible given both seeds.

    Args:
        records: labelled volumes (training side of the split).
        data_cfg: the ``data`` config section (spacing, percentiles, patch_size, foreground_prob,
            augment, cache).
        divisor: total stride of the network; ``data_cfg.patch_size`` must be a multiple of it.
        seed: seed of cropping and augmentation.
        cache_dir: the cache folder (``Config.cache_dir``), for ``data.cache: disk``.

    Items:
        ``{"image": float32 (1, ph, pw), "label": int64 (1, ph, pw) in 0..3}``, ``(ph, pw) = patch_size``.

    Raises:
        ConfigError: patch_size not divisible by ``divisor``.
        DataError: no records, a record without label, or a file that fails to load.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        data_cfg: DataConfig,
        divisor: int,
        seed: int,
        cache_dir: str | Path = DEFAULT_CACHE,
    ) -> None:
        check_divisible(data_cfg.patch_size, divisor)
        if not records:
            raise DataError("no training volumes: the record list is empty")
        self.records = list(records)
        self.volumes = preprocessed_volumes(self.records, data_cfg, divisor, True, cache_dir)
        self.index = [(v, z) for v, record in enumerate(self.records) for z in range(_slice_count(record))]
        self.transform = train_slice_transforms(data_cfg)
        self.transform.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, z = self.index[i]
        with _data_errors():
            volume = self.volumes[v]
        image = convert_to_tensor(volume["image"][..., z], track_meta=False).clone()
        label = convert_to_tensor(volume["label"][..., z], track_meta=False).clone()
        with warnings.catch_warnings():
            # Slices without foreground make RandCropByPosNegLabeld warn that it falls back to random crops.
            warnings.filterwarnings("ignore", message=".*unable to generate class balanced samples.*")
            (sample,) = self.transform({"image": image, "label": label})
        return {
            "image": convert_to_tensor(sample["image"], track_meta=False, dtype=torch.float32),
            "label": convert_to_tensor(sample["label"], track_meta=False).round().to(torch.int64),
        }


class VolumeDataset(Sequence):
    """Whole preprocessed volumes for validation and inference, with what is needed to invert them.

    Args:
        records: volumes (labels optional: items of unlabelled records have no ``"label"``).
        data_cfg: the ``data`` config section (spacing, percentiles, cache).
        divisor: X and Y are padded to a multiple of it (the network's total stride).
        cache_dir: the cache folder (``Config.cache_dir``), for ``data.cache: disk``.

    Items:
        ``"image"``: MetaTensor (1, H, W, Z) float32, preprocessed; its ``affine`` is the preprocessed
        grid's. ``"label"``: MetaTensor (1, H, W, Z) float32 in 0..3 on the same grid (labelled records
        only). ``"record"``: the :class:`VolumeRecord`. ``"original_affine"``: (4, 4) float64 tensor and
        ``"original_shape"``: (X, Y, Z) of the original image, used by :func:`invert_to_original`.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        data_cfg: DataConfig,
        divisor: int,
        cache_dir: str | Path = DEFAULT_CACHE,
    ) -> None:
        self.records = list(records)
        labelled = [r for r in self.records if r.label is not None]
        unlabelled = [r for r in self.records if r.label is None]
        counters = {True: 0, False: 0}
        self._where: list[tuple[bool, int]] = []
        for record in self.records:
            has_label = record.label is not None
            self._where.append((has_label, counters[has_label]))
            counters[has_label] += 1
        self._sources = {
            True: preprocessed_volumes(labelled, data_cfg, divisor, True, cache_dir) if labelled else None,
            False: preprocessed_volumes(unlabelled, data_cfg, divisor, False, cache_dir)
            if unlabelled
            else None,
        }

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        record = self.records[i]
        has_label, position = self._where[i]
        with _data_errors():
            item = dict(self._sources[has_label][position])
        image: MetaTensor = item["image"]
        item["record"] = record
        item["original_affine"] = torch.as_tensor(image.meta["original_affine"], dtype=torch.float64)
        item["original_shape"] = tuple(int(s) for s in image.meta["spatial_shape"])
        return item


def invert_to_original(probs: torch.Tensor, item: dict[str, Any]) -> torch.Tensor:
    """Map class probabilities from the preprocessed grid back to the original image grid.

    The padding and the in-plane resampling are undone in one resampling step from the preprocessed
    grid's affine to the original affine and shape (bilinear in-plane; the slices coincide, so Z is
    not interpolated), with MONAI's ``SpatialResample``.

    Args:
        probs: (C, H, W, Z) probabilities or one-hot scores on the grid of ``item["image"]``.
        item: an item of :class:`VolumeDataset`.

    Returns:
        MetaTensor (C, X, Y, Z) float32 on the original grid, with the original affine; its argmax over
        C is the label map in the original geometry.
    """
    image: MetaTensor = item["image"]
    if tuple(probs.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(
            f"probs shape {tuple(probs.shape)} does not match the image grid {tuple(image.shape)}"
        )
    source = MetaTensor(convert_to_tensor(probs, track_meta=False, dtype=torch.float32), affine=image.affine)
    resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)
    return resample(source, dst_affine=item["original_affine"], spatial_size=item["original_shape"])


def load_label(record: VolumeRecord) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The original ground truth of a record, for metrics in the image's own geometry.

    Returns:
        ``(labels (X, Y, Z) uint8 in 0..3, spacing (sx, sy, sz) in mm from the header's pixdim)``.

    Raises:
        DataError: no label, or an unreadable, non-3D or out-of-range label file (the message names it).
    """
    if record.label is None:
        raise DataError(f"{record.image}: this volume has no label file")
    data, _ = read_volume(record.label, np.float32)
    values = np.unique(data)
    check_label_values(values, record.label)
    zooms = open_nifti(record.label).header.get_zooms()[:3]
    return data.astype(np.uint8), tuple(float(z) for z in zooms)  # type: ignore[return-value]
