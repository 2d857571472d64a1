"""The project's 2D U-Net, built from MONAI blocks with readable, prunable module names."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import nn

NORMS = ("batch", "instance", "group")
ACTIVATIONS = ("relu", "leakyrelu", "prelu")
UPSAMPLES = ("deconv", "nontrainable")


def match_spatial(up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Resize ``up`` (N, C, h, w) to the spatial size of ``skip`` (N, C', H, W) when they differ.

    Needed when an input side is not divisible by the network's total stride: pooling floors, so the
    up-sampled map can be one pixel short of its skip. Bilinear, so channels never mix. Registered with
    ``torch.fx.wrap``: a symbolic trace records it as one ``call_function`` node whose output has the
    channels of its first argument, instead of failing on the shape test.
    """
    if up.shape[-2:] != skip.shape[-2:]:
        up = F.interpolate(up, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    return up


torch.fx.wrap("match_spatial")


def _norm(name: str, channels: int) -> tuple[str, dict]:
    """MONAI norm spec for ``channels`` feature maps."""
    if name == "batch":
        return ("batch", {})
    if name == "instance":
        # Affine like nnU-Net, so every norm has per-channel parameters to carry through pruning.
        return ("instance", {"affine": True})
    return ("group", {"num_groups": math.gcd(8, channels)})


def _act(name: str, channels: int) -> tuple[str, dict]:
    """MONAI activation spec; PReLU gets one slope per channel."""
    if name == "relu":
        return ("relu", {"inplace": True})
    if name == "leakyrelu":
        return ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    return ("prelu", {"num_parameters": channels})


def conv_block(
    in_channels: int, out_channels: int, norm: str, act: str, dropout: float, residual: bool
) -> nn.Module:
    """Two 3x3 conv + norm (+ dropout) + activation units, optionally with a residual connection.

    Without ``residual`` the block is ``Sequential(conv1, conv2)`` of MONAI ``Convolution`` units (each
    ``conv`` then ``adn``); with it, a MONAI ``ResidualUnit`` (1x1 projection when the widths differ).
    Convs have no bias since a norm follows. Input (N, in_channels, H, W) -> (N, out_channels, H, W).
    """
    kwargs = {
        "spatial_dims": 2,
        "out_channels": out_channels,
        "kernel_size": 3,
        "act": _act(act, out_channels),
        "norm": _norm(norm, out_channels),
        "dropout": dropout or None,
        "bias": False,
    }
    if residual:
        return ResidualUnit(in_channels=in_channels, subunits=2, **kwargs)
    return nn.Sequential(
        OrderedDict(
            conv1=Convolution(in_channels=in_channels, **kwargs),
            conv2=Convolution(in_channels=out_channels, **kwargs),
        )
    )


def upsample_block(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """x2 up-sampling from ``in_channels`` to ``out_channels``: (N, in, h, w) -> (N, out, 2h, 2w).

    ``deconv`` is a ``ConvTranspose2d(kernel 2, stride 2)``; ``nontrainable`` a 1x1 conv then bilinear
    interpolation (cheaper, no checkerboard artefacts).
    """
    if mode == "deconv":
        return UpSample(2, in_channels, out_channels, scale_factor=2, mode="deconv")
    return UpSample(
        2,
        in_channels,
        out_channels,
        scale_factor=2,
        mode="nontrainable",
        interp_mode="bilinear",
        align_corners=False,
    )


class UNet2D(nn.Module):
    """2D U-Net with configurable depth, widths, norm, activation, dropout and residual blocks.

    Level ``i`` (0 = full resolution) has encoder ``encoders.i`` (conv block), then a 2x2 max-pool;
    after the deepest level comes ``bottleneck``. On the way up, ``upsamples.i`` doubles the resolution
    of the deeper map to ``features[i]`` channels and ``decoders.i`` fuses ``cat((skip_i, up), dim=1)``
    (skip first, ``2 * features[i]`` channels) back to ``features[i]``. ``head`` is a 1x1 conv to the
    class logits. Block-wise pruning ratios are keyed by these names.

    Args:
        in_channels: input channels (1 for cine MRI).
        out_channels: classes including background.
        features: width of each encoder level; ``len(features)`` levels, so the total stride is
            ``2 ** len(features)``.
        bottleneck: bottleneck width; ``None`` = twice ``features[-1]``.
        norm: ``"batch"``, ``"instance"`` (affine) or ``"group"`` (up to 8 groups).
        act: ``"relu"``, ``"leakyrelu"`` or ``"prelu"`` (one slope per channel).
        dropout: dropout probability after each conv's norm; 0 = none.
        residual: MONAI ``ResidualUnit`` blocks instead of plain double convs.
        upsample: ``"deconv"`` (transposed conv) or ``"nontrainable"`` (1x1 conv + bilinear).

    Shapes: input (N, in_channels, H, W), output logits (N, out_channels, H, W); any H, W >= the
    total stride work (sizes not divisible by it are handled by resizing in the decoder).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        bottleneck: int | None = None,
        norm: str = "batch",
        act: str = "relu",
        dropout: float = 0.0,
        residual: bool = False,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if not features or min(features) < 1:
            raise ValueError(f"features must be a non-empty list of positive widths, got {features}")
        for value, choices, what in (
            (norm, NORMS, "norm"),
            (act, ACTIVATIONS, "act"),
            (upsample, UPSAMPLES, "upsample"),
        ):
            if value not in choices:
                raise ValueError(f"{what} '{value}' is not one of {', '.join(choices)}")
        bottleneck = bottleneck or 2 * features[-1]
        self.features = tuple(features)
        self.bottleneck_width = bottleneck

        block = {"norm": norm, "act": act, "dropout": dropout, "residual": residual}
        widths_in = [in_channels, *features[:-1]]
        self.encoders = nn.ModuleList(
            conv_block(c_in, c, **block) for c_in, c in zip(widths_in, features, strict=True)
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = conv_block(features[-1], bottleneck, **block)
        deeper = [*features[1:], bottleneck]
        self.upsamples = nn.ModuleList(
            upsample_block(d, c, upsample) for d, c in zip(deeper, features, strict=True)
        )
        self.decoders = nn.ModuleList(conv_block(2 * c, c, **block) for c in features)
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)

    @classmethod
    def classic(cls, in_channels: int = 1, out_channels: int = 4) -> UNet2D:
        """The configuration of the original basic_UNet work (43,886,340 parameters for 1 -> 4 channels).

        Features 64, 128, 256, 512, 512 and a 1024-wide bottleneck; double 3x3 conv without bias +
        BatchNorm + ReLU, max-pool, ``ConvTranspose2d(k=2, s=2)``, skip-first concatenation, 1x1 head.
        """
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            features=(64, 128, 256, 512, 512),
            bottleneck=1024,
            norm="batch",
            act="relu",
            upsample="deconv",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of slices: (N, in_channels, H, W) -> logits (N, out_channels, H, W)."""
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for level in range(len(self.decoders) - 1, -1, -1):
            skip = skips[level]
            up = match_spatial(self.upsamples[level](x), skip)
            x = self.decoders[level](torch.cat((skip, up), dim=1))
        return self.head(x)
