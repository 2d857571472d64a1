"""MONAI dict transforms: deterministic volume preprocessing and random 2D training-slice sampling."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    DivisiblePadd,
    EnsureChannelFirstd,
    LoadImage,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from acdc_prune.config import DataConfig
from acdc_prune.data.nifti import (
    check_finite,
    check_label_values,
    check_pair,
    describe_error,
    open_nifti,
    spatial_shape,
    true_affine,
)
from acdc_prune.errors import DataError

KEYS = ("image", "label")


class LoadVolumed(MapTransform):
    """Load the ``image`` and ``label`` NIfTI paths of a dict with MONAI's ``LoadImage`` (nibabel).

    On top of ``LoadImage`` it checks what a training pipeline must not silently accept: each file is a
    readable 3D NIfTI without NaN or infinite voxels, the label has the image's shape and affine and
    holds only the values 0..3. The affine of each volume is taken from
    :func:`~acdc_prune.data.nifti.true_affine` (ACDC's files carry a unit-scaled sform with the spacing
    in pixdim). Any failure is a one-line :class:`DataError` that
    names the file. Output volumes are MetaTensors (X, Y, Z) float32, not yet channel-first.
    """

    def __init__(self, keys: tuple[str, ...] = KEYS) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.loader = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, str | Path]) -> dict[Hashable, MetaTensor]:
        """Load every present key of ``data`` (``{"image": path, "label": path}``)."""
        d = dict(data)
        headers = {}
        for key in self.key_iterator(d):
            path = Path(d[key])
            header = open_nifti(path)
            spatial_shape(header, path)
            try:
                volume = self.loader(path)
            except DataError:
                raise
            except Exception as err:  # nibabel/gzip/zlib raise several types for damaged files
                raise DataError(f"{path}: corrupt or truncated file ({describe_error(err)})") from None
            check_finite(volume.as_tensor().numpy(), path)
            affine = torch.as_tensor(true_affine(header), dtype=torch.float64)
            volume.affine = affine
            volume.meta["original_affine"] = affine.clone()
            headers[key] = (header, path)
            d[key] = volume
        if "label" in headers:
            (image, image_path), (label, label_path) = headers["image"], headers["label"]
            check_pair(image, label, image_path, label_path)
            check_label_values(torch.unique(d["label"]).numpy(), label_path)
        return d


class KeepGeometryd(MapTransform):
    """Reduce each volume's metadata to its geometry: affine, original affine and shape, and file name.

    The reader's full header (numpy arrays) and MONAI's operation records are dropped, so a disk cache
    entry loads with ``torch.load(weights_only=True)``; :func:`~acdc_prune.data.invert_to_original`
    needs only the affines and the original shape.
    """

    def __init__(self, keys: tuple[str, ...] = KEYS) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        """Replace every present key's MetaTensor by one with only the geometry metadata."""
        d = dict(data)
        for key in self.key_iterator(d):
            volume: MetaTensor = d[key]
            meta = {
                "original_affine": torch.as_tensor(volume.meta["original_affine"], dtype=torch.float64),
                "spatial_shape": [int(s) for s in volume.meta["spatial_shape"]],
                "filename_or_obj": str(volume.meta["filename_or_obj"]),
            }
            d[key] = MetaTensor(volume.as_tensor(), affine=volume.affine, meta=meta)
        return d


def check_divisible(patch_size: list[int] | tuple[int, ...], divisor: int) -> None:
    """Refuse a training patch that the network's total stride does not divide.

    Raises:
        ConfigError: naming ``data.patch_size`` and the divisor.
    """
    from acdc_prune.errors import ConfigError

    if divisor < 1:
        raise ConfigError(f"divisor must be a positive integer, got {divisor}")
    if any(p % divisor for p in patch_size):
        fixed = [max(divisor, round(p / divisor) * divisor) for p in patch_size]
        raise ConfigError(
            f"data.patch_size {list(patch_size)} is not divisible by the model's total stride {divisor}; "
            f"use e.g. {fixed}"
        )


def preprocess_transforms(data_cfg: DataConfig, divisor: int, with_label: bool = True) -> Compose:
    """The deterministic, cacheable part: volumes in, preprocessed channel-first volumes out.

    load -> channel-first -> in-plane resampling to ``data_cfg.target_spacing`` (the slice spacing is
    kept: MONAI's ``Spacingd`` keeps an axis whose pixdim is non-positive; bilinear for the image,
    nearest for the label) -> clip to ``data_cfg.intensity_percentiles`` -> z-score -> pad X and Y to
    a multiple of ``divisor`` (edge values for the image, 0 for the label) -> keep only the geometry
    metadata (:class:`KeepGeometryd`).

    Args:
        data_cfg: the ``data`` config section.
        divisor: total stride of the network (pad target).
        with_label: whether dicts carry a ``label`` key.

    Returns:
        A Compose mapping ``{"image": path[, "label": path]}`` to ``{"image": MetaTensor (1, H, W, Z)
        float32[, "label": MetaTensor (1, H, W, Z) float32 with values 0..3]}``; the MetaTensors carry
        the affine of the preprocessed grid and the original affine and shape.
    """
    keys = list(KEYS) if with_label else ["image"]
    modes = ("bilinear", "nearest")[: len(keys)]
    pads = ("edge", "constant")[: len(keys)]
    return Compose(
        [
            LoadVolumed(tuple(keys)),
            EnsureChannelFirstd(keys=keys),
            Spacingd(keys=keys, pixdim=(*data_cfg.target_spacing, -1.0), mode=modes),
            ClipIntensityPercentilesd(
                keys="image", lower=data_cfg.intensity_percentiles[0], upper=data_cfg.intensity_percentiles[1]
            ),
            NormalizeIntensityd(keys="image"),
            DivisiblePadd(keys=keys, k=(divisor, divisor, 1), mode=pads),
            KeepGeometryd(tuple(keys)),
        ]
    )


def train_slice_transforms(data_cfg: DataConfig) -> Compose:
    """Random 2D transforms of a training slice ``{"image": (1, H, W), "label": (1, H, W)}``.

    Pads to at least ``data_cfg.patch_size``, and crops a patch centred on the heart (label > 0) with
    probability ``data_cfg.foreground_prob``, elsewhere otherwise. With ``data_cfg.augment``, before the
    crop a random rotation (any angle) and scaling (0.8-1.2) and after it random flips along both
    axes, intensity scaling and shifting, gamma, and Gaussian noise.

    Returns:
        A Compose returning a list with one dict of tensors (1, ph, pw), ``(ph, pw) = patch_size``.
    """
    patch = tuple(data_cfg.patch_size)
    fg = data_cfg.foreground_prob
    keys = list(KEYS)
    spatial = [SpatialPadd(keys=keys, spatial_size=patch, mode=("edge", "constant"))]
    if data_cfg.augment:
        spatial.append(
            RandAffined(
                keys=keys,
                prob=0.75,
                rotate_range=(math.pi,),
                scale_range=(0.2, 0.2),
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            )
        )
    spatial.append(
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=patch, pos=fg, neg=1.0 - fg, num_samples=1
        )
    )
    if not data_cfg.augment:
        return Compose(spatial)
    return Compose(
        [
            *spatial,
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            RandGaussianNoised(keys="image", std=0.1, prob=0.2),
        ]
    )
