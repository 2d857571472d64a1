"""Batches of the run's training patients for data-driven criteria and BatchNorm recalibration."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from acdc_prune.config import Config
from acdc_prune.engine.steps import plain_tensor


def training_batches(config: Config, batch_size: int | None = None) -> Callable[[], Iterator[tuple]]:
    """A function that yields ``(image, label)`` batches of the run's training patients, the same each call.

    Only the training side of the run's split is read (never validation or test patients). Slices are
    cropped as in training (``data.patch_size``, foreground-biased) without augmentation, in a
    seeded order, so a criterion or a recalibration sees the same batches every time. Nothing is
    loaded until the first batch is drawn, so a criterion that needs no data costs nothing.

    Args:
        config: the run's config (data, split, network stride, ``training.batch_size``, seed).
        batch_size: slices per batch (default ``training.batch_size``).

    Returns:
        A callable; each call returns a fresh iterator over batches of image ``(B, C_in, H, W)`` float
        and label ``(B, 1, H, W)`` integer tensors (plain tensors, no MONAI metadata).
    """
    seed, size = config.training.seed, batch_size or config.training.batch_size
    built: list[Any] = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not built:
            built.append(_training_slices(config))
        dataset = built[0]
        dataset.transform.set_random_state(seed=seed)
        order = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=size, shuffle=True, generator=order, num_workers=0)
        for batch in loader:
            yield plain_tensor(batch["image"]), plain_tensor(batch["label"])

    return batches


def _training_slices(config: Config) -> Any:
    """The run's training slices, cropped as in training, without augmentation."""
    from acdc_prune.data import TrainSliceDataset, load_records, split_records
    from acdc_prune.models import total_stride

    data_cfg = copy.deepcopy(config.data)
    data_cfg.augment = False
    train_records, _ = split_records(load_records(config.data, config.cache_dir), config.data)
    return TrainSliceDataset(
        train_records, data_cfg, total_stride(config.model), config.training.seed, config.cache_dir
    )
