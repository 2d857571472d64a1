"""Networks: the project's U-Net and a registry of MONAI segmentation networks by name."""

from acdc_prune.models.registry import build_model, total_stride
from acdc_prune.models.unet import UNet2D

__all__ = ["UNet2D", "build_model", "total_stride"]
