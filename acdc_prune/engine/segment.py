"""Segment one volume: MONAI's SliceInferer, labels in the original grid, optional post-processing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.inferers import SliceInferer
from monai.transforms import KeepLargestConnectedComponent
from torch import nn

from acdc_prune.engine.metrics import STRUCTURES
from acdc_prune.engine.precision import FP32, Precision
from acdc_prune.errors import AcdcPruneError, Hint, ResourceError

N_CLASSES = len(STRUCTURES) + 1
"""Background, RV, MYO and LV."""
MIRROR_FLIPS = ((), (2,), (3,), (2, 3))
"""Axes of ``(B, C, H, W)`` slices flipped by test-time mirroring: none, H, W, both."""
_LARGEST = KeepLargestConnectedComponent(
    applied_labels=list(STRUCTURES), is_onehot=False, independent=True, connectivity=3
)


def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
    mirror: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of every slice of a preprocessed volume, with MONAI's ``SliceInferer``.

    The model sees whole slices (the window is the slice), ``batch_size`` at a time, in eval mode
    under ``torch.no_grad`` and ``precision``'s autocast and memory format; its training flag is
    restored afterwards. Probabilities are computed in float32.

    Args:
        model: a 2D network ``(B, C_in, H, W) -> (B, C, H, W)`` logits, already on ``device``.
        image: ``(C_in, H, W, D)`` preprocessed volume (a MetaTensor is fine), D slices.
        batch_size: slices per forward pass.
        device: where the model runs.
        precision: autocast dtype and memory format.
        mirror: test-time mirroring as nnU-Net does it: average the probabilities of the slice and
            of its flips along H, W and both (4 forward passes per slice).

    Returns:
        ``(C, H, W, D)`` float32 probabilities on the CPU (a plain tensor).

    Raises:
        ResourceError: out of memory; the message names ``evaluation.batch_size`` and a smaller value.
    """
    device = torch.device(device)
    volume = image.as_tensor() if hasattr(image, "as_tensor") else image
    window = tuple(volume.shape[1:3])  # whole slices: one window per slice, no blending
    inferer = SliceInferer(roi_size=window, sw_batch_size=batch_size, spatial_dim=2, overlap=0.0)

    flips = MIRROR_FLIPS if mirror else ((),)

    def probabilities(slices: torch.Tensor) -> torch.Tensor:
        with precision.autocast(device):
            return model(slices).float().softmax(dim=1)

    def network(slices: torch.Tensor) -> torch.Tensor:
        slices = slices.to(device, dtype=torch.float32, memory_format=precision.memory_format)
        total = sum(probabilities(slices.flip(dims)).flip(dims) for dims in flips)
        return (total / len(flips)).cpu()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = inferer(volume[None].float(), network)
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"out of memory on {device} during inference with evaluation.batch_size {batch_size} slices "
            f"of {window}; lower it",
            Hint("evaluation.batch_size", max(1, batch_size // 2)),
        ) from None
    finally:
        model.train(was_training)
    return torch.as_tensor(probs)[0].contiguous()


def resolve_largest_component(setting: bool | str, choice: dict[str, Any] | None) -> bool:
    """``evaluation.largest_component`` resolved for one model.

    Args:
        setting: ``True`` or ``False`` as the user set it, or ``"auto"``.
        choice: the post-processing the validation patients chose for the model during training (see
            :func:`acdc_prune.engine.validation.postprocessing_choice`), ``None`` where none was made;
            ``auto`` follows it, and means off without it.
    """
    if setting != "auto":
        return bool(setting)
    return bool((choice or {}).get("largest_component", False))


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component of each structure; other islands become background.

    Stray false-positive islands far from the heart cost little Dice but dominate Hausdorff
    distances; RV, myocardium and LV are each one connected object in a short-axis stack. This is
    MONAI's ``KeepLargestConnectedComponent`` per structure with 26-connectivity.

    Args:
        labels: ``(X, Y, Z)`` integer label map (0 background, 1 RV, 2 MYO, 3 LV).

    Returns:
        A new ``(X, Y, Z)`` map of the same dtype.
    """
    kept = _LARGEST(torch.as_tensor(labels)[None])
    return np.asarray(torch.as_tensor(kept)[0].numpy(), dtype=labels.dtype)


def segment(
    model: nn.Module,
    item: dict[str, Any],
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
    mirror: bool = False,
    largest_component: bool = False,
) -> np.ndarray:
    """Label map of one volume in its original geometry: the one path of validation, evaluate and predict.

    Args:
        model: 2D network ``(B, C_in, H, W) -> (B, 4, H, W)`` logits, already on ``device``.
        item: an item of :class:`acdc_prune.data.VolumeDataset` (``image`` ``(C_in, H, W, D)`` and what
            is needed to undo the in-plane resampling and the padding).
        batch_size: slices per forward pass.
        device: where the model runs.
        precision: autocast dtype and memory format.
        mirror: test-time mirroring (see :func:`predict_probabilities`).
        largest_component: keep only the largest 3D component of each structure.

    Returns:
        ``(X, Y, Z)`` uint8 labels (0 background, 1 RV, 2 MYO, 3 LV) on the image file's grid.

    Raises:
        AcdcPruneError: the model does not predict the 4 ACDC classes.
        ResourceError: out of memory during inference.
    """
    from acdc_prune.data import invert_to_original

    probs = predict_probabilities(model, item["image"], batch_size, device, precision, mirror)
    if probs.shape[0] != N_CLASSES:
        raise AcdcPruneError(
            f"the model predicts {probs.shape[0]} classes but segmentation needs {N_CLASSES} "
            "(0 background, 1 RV, 2 MYO, 3 LV): check model.out_channels"
        )
    original = invert_to_original(probs, item).as_tensor()
    # The class axis moved last first: torch reduces the innermost axis about 7x faster on the CPU.
    labels = original.movedim(0, -1).contiguous().argmax(dim=-1).cpu().numpy().astype(np.uint8)
    return keep_largest_components(labels) if largest_component else labels


def segment_as_configured(
    model: nn.Module, item: dict[str, Any], evaluation: Any, device: torch.device | str, precision: Precision
) -> np.ndarray:
    """:func:`segment` with the inference settings of an ``EvaluationConfig``: batch size, mirroring
    (``tta``) and post-processing (``largest_component``; resolve ``auto`` with
    ``Checkpoint.largest_component`` first: left unresolved here, it means off)."""
    return segment(
        model,
        item,
        batch_size=evaluation.batch_size,
        device=device,
        precision=precision,
        mirror=evaluation.tta,
        largest_component=evaluation.largest_component is True,
    )
