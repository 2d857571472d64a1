"""Whole-volume inference with a 2D network, slice by slice along the last (slice) axis."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from acdc_prune.engine.precision import FP32, Precision
from acdc_prune.errors import ResourceError


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
) -> torch.Tensor:
    """Softmax probabilities of every slice of a preprocessed volume.

    The model runs in eval mode under ``torch.no_grad`` (its training flag is restored afterwards)
    and under ``precision``'s autocast; probabilities are computed in float32.

    Args:
        model: a 2D network mapping ``(B, C_in, H, W)`` to logits ``(B, C, H, W)``, already on ``device``.
        image: ``(C_in, H, W, D)`` preprocessed volume (a MetaTensor is fine), D slices.
        batch_size: slices per forward pass.
        device: where the model runs.
        precision: autocast dtype and memory format of the slices fed to the model.

    Returns:
        ``(C, H, W, D)`` float32 probabilities on the CPU (a plain tensor, no metadata).

    Raises:
        ResourceError: out of memory; the message names ``evaluation.batch_size`` and a smaller value.
    """
    device = torch.device(device)
    volume = image.as_tensor() if hasattr(image, "as_tensor") else image
    slices = volume.permute(3, 0, 1, 2)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.no_grad(), precision.autocast(device):
            for start in range(0, slices.shape[0], batch_size):
                batch = slices[start : start + batch_size]
                batch = batch.to(device, dtype=torch.float32, memory_format=precision.memory_format)
                outputs.append(model(batch).float().softmax(dim=1).cpu())
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"out of memory on {device} during inference with evaluation.batch_size {batch_size} slices "
            f"of {tuple(slices.shape[2:])}; lower it, e.g. "
            f"--set evaluation.batch_size={max(1, batch_size // 2)}"
        ) from None
    finally:
        model.train(was_training)
    return torch.cat(outputs).permute(1, 2, 3, 0).contiguous()


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component of each structure; other islands become background.

    Stray false-positive islands far from the heart cost little Dice but dominate Hausdorff
    distances; RV, myocardium and LV are each one connected object in a short-axis stack.

    Args:
        labels: ``(X, Y, Z)`` integer label map (0 background, 1 RV, 2 MYO, 3 LV).

    Returns:
        A new ``(X, Y, Z)`` map of the same dtype; components are 26-connected in 3D.
    """
    from scipy import ndimage

    kept = np.zeros_like(labels)
    for value in np.unique(labels[labels > 0]):
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(components.ravel())[1:]
        kept[components == 1 + int(np.argmax(sizes))] = value
    return kept


def original_labels(probs: torch.Tensor, item: dict[str, Any]) -> np.ndarray:
    """Label map of one volume in its original geometry (the grid of the image file).

    Args:
        probs: ``(C, H, W, D)`` probabilities from :func:`predict_volume` on ``item["image"]``.
        item: an item of :class:`acdc_prune.data.VolumeDataset` (what is needed to undo the in-plane
            resampling and the padding).

    Returns:
        ``(X, Y, Z)`` uint8 labels (0 background, 1 RV, 2 MYO, 3 LV) on the original image grid.
    """
    from acdc_prune.data import invert_to_original

    return torch.as_tensor(invert_to_original(probs, item)).argmax(dim=0).cpu().numpy().astype(np.uint8)
