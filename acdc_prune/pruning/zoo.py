"""The MONAI segmentation networks the pruning engine is checked on, for the tests, benchmark and docs."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

#: Input side per (spatial dims, small): the tests' small size and the benchmark's size.
DEFAULT_SIDES = {(2, True): 32, (2, False): 128, (3, True): 16, (3, False): 32}


@dataclass(frozen=True)
class ZooNetwork:
    """One MONAI network of the catalogue; MONAI is imported only when a network is built.

    Attributes:
        name: the MONAI class (and variant) name, e.g. ``"UNet"``.
        build: ``build(spatial_dims, small)`` -> the network (1 input channel, 3 classes); ``small``
            gives narrow widths for the tests, otherwise MONAI's defaults (or the benchmark's).
        dims: the spatial dimensionalities it supports (2, 3).
        sides: input shape overrides, ``{(spatial_dims, small): spatial shape}``.
        requires: an optional package it needs (``"einops"``), or ``None``.
        large_only: dimensionalities whose smallest valid input is too large for the tests' budget
            (benchmarked only).
    """

    name: str
    build: Callable[[int, bool], nn.Module]
    dims: tuple[int, ...] = (2, 3)
    sides: dict[tuple[int, bool], tuple[int, ...]] | None = None
    requires: str | None = None
    large_only: tuple[int, ...] = ()

    def input_shape(self, spatial_dims: int, small: bool) -> tuple[int, ...]:
        """The example input's shape (1, 1, *spatial) for a dimensionality and size profile."""
        spatial = (self.sides or {}).get((spatial_dims, small))
        return (1, 1, *(spatial or (DEFAULT_SIDES[(spatial_dims, small)],) * spatial_dims))

    def available(self) -> bool:
        """Whether the optional package it needs is installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


def _nets() -> Any:
    """``monai.networks.nets``, imported on first use."""
    import monai.networks.nets as nets

    return nets


def _widths(small: bool, narrow: tuple[int, ...], wide: tuple[int, ...]) -> tuple[int, ...]:
    return narrow if small else wide


def _unet(d: int, small: bool) -> nn.Module:
    channels = _widths(small, (8, 16, 32), (16, 32, 64, 128, 256))
    return _nets().UNet(d, 1, 3, channels, (2,) * (len(channels) - 1), num_res_units=2)


def _basic_unet(d: int, small: bool) -> nn.Module:
    return _nets().BasicUNet(
        d, 1, 3, features=_widths(small, (8, 8, 16, 16, 32, 8), (32, 32, 64, 128, 256, 32))
    )


def _basic_unet_plus_plus(d: int, small: bool) -> nn.Module:
    features = _widths(small, (8, 8, 16, 16, 32, 8), (32, 32, 64, 128, 256, 32))
    return _nets().BasicUNetPlusPlus(d, 1, 3, features=features)


def _attention_unet(d: int, small: bool) -> nn.Module:
    channels = _widths(small, (8, 16, 32), (16, 32, 64, 128, 256))
    return _nets().AttentionUnet(d, 1, 3, channels, (2,) * (len(channels) - 1))


def _dynunet(d: int, small: bool) -> nn.Module:
    filters = _widths(small, (8, 16, 32), (32, 64, 128, 256, 320))
    levels = len(filters)
    return _nets().DynUNet(
        d, 1, 3, [3] * levels, [1] + [2] * (levels - 1), [2] * (levels - 1), filters=filters, res_block=True
    )


def _segresnet(d: int, small: bool) -> nn.Module:
    return _nets().SegResNet(d, init_filters=8 if small else 16, in_channels=1, out_channels=3)


def _segresnet_ds(d: int, small: bool) -> nn.Module:
    return _nets().SegResNetDS(d, init_filters=8 if small else 32, in_channels=1, out_channels=3)


def _segresnet_ds2(d: int, small: bool) -> nn.Module:
    return _nets().SegResNetDS2(d, init_filters=8 if small else 32, in_channels=1, out_channels=3)


def _segresnet_vae(d: int, small: bool) -> nn.Module:
    side = DEFAULT_SIDES[(d, small)]
    return _nets().SegResNetVAE(
        (side,) * d, spatial_dims=d, init_filters=8 if small else 16, in_channels=1, out_channels=3
    )


def _vnet(d: int, small: bool) -> nn.Module:
    return _nets().VNet(d, 1, 3)


def _unetr(d: int, small: bool) -> nn.Module:
    side = DEFAULT_SIDES[(d, small)]
    sizes = {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4} if small else {}
    return _nets().UNETR(1, 3, (side,) * d, spatial_dims=d, **sizes)


def _swin_unetr(d: int, small: bool) -> nn.Module:
    sizes = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)} if small else {}
    return _nets().SwinUNETR(in_channels=1, out_channels=3, spatial_dims=d, window_size=4, **sizes)


def _highresnet(d: int, small: bool) -> nn.Module:
    return _nets().HighResNet(d, 1, 3)


def _flexible_unet(d: int, small: bool) -> nn.Module:
    decoder = _widths(small, (32, 16, 16, 8, 8), (256, 128, 64, 32, 16))
    return _nets().FlexibleUNet(1, 3, "resnet10", decoder_channels=decoder, spatial_dims=d)


def _flexible_unet_efficientnet(d: int, small: bool) -> nn.Module:
    decoder = _widths(small, (32, 16, 16, 8, 8), (256, 128, 64, 32, 16))
    return _nets().FlexibleUNet(1, 3, "efficientnet-b0", decoder_channels=decoder, spatial_dims=d)


def _ahnet(d: int, small: bool) -> nn.Module:
    return _nets().AHNet(layers=(1, 1, 1, 1) if small else (3, 4, 6, 3), spatial_dims=d, out_channels=3)


def _mednext(d: int, small: bool) -> nn.Module:
    blocks = {"blocks_down": (1, 1, 1, 1), "blocks_bottleneck": 1, "blocks_up": (1, 1, 1, 1)} if small else {}
    return _nets().MedNeXt(
        d, init_filters=8 if small else 32, in_channels=1, out_channels=3, kernel_size=3, **blocks
    )


def _quicknat(d: int, small: bool) -> nn.Module:
    return _nets().Quicknat(num_classes=3, num_channels=1, num_filters=16 if small else 64)


def _hovernet(d: int, small: bool) -> nn.Module:
    return _nets().HoVerNet(in_channels=1, np_out_channels=2, out_classes=3)


def _dints(d: int, small: bool) -> nn.Module:
    nets = _nets()
    with warnings.catch_warnings():  # MONAI's default architecture code is the one wanted here
        warnings.filterwarnings("ignore", "arch_code not provided")
        space = nets.TopologyInstance(
            channel_mul=0.25 if small else 1.0, num_blocks=3, num_depths=3, spatial_dims=d
        )
    return nets.DiNTS(space, in_channels=1, num_classes=3, spatial_dims=d)


#: SwinUNETR down-samples 32 times and normalises per instance: 64 is its smallest side.
_SWIN_SIDES = {(d, small): (64,) * d for d in (2, 3) for small in (True, False)}

#: Networks that down-sample 16 times and normalise per instance need 32 in 3D too.
_SIDE_32 = {(3, True): (32, 32, 32)}

#: Every network of the catalogue, in the order of the docs' table.
ZOO: tuple[ZooNetwork, ...] = (
    ZooNetwork("UNet", _unet),
    ZooNetwork("BasicUNet", _basic_unet, sides=_SIDE_32),
    ZooNetwork("BasicUNetPlusPlus", _basic_unet_plus_plus, sides=_SIDE_32),
    ZooNetwork("AttentionUnet", _attention_unet),
    ZooNetwork("DynUNet (residual)", _dynunet),
    ZooNetwork("SegResNet", _segresnet),
    ZooNetwork("SegResNetDS", _segresnet_ds),
    ZooNetwork("SegResNetDS2", _segresnet_ds2),
    ZooNetwork("SegResNetVAE", _segresnet_vae),
    ZooNetwork("VNet", _vnet, sides={(3, True): (32, 32, 32)}),
    ZooNetwork("UNETR", _unetr, requires="einops"),
    ZooNetwork("SwinUNETR", _swin_unetr, sides=_SWIN_SIDES, requires="einops"),
    ZooNetwork("HighResNet", _highresnet),
    ZooNetwork(
        "FlexibleUNet (ResNet-10)", _flexible_unet, sides={(2, True): (64, 64), (3, True): (32, 32, 32)}
    ),
    ZooNetwork(
        "FlexibleUNet (EfficientNet-B0)", _flexible_unet_efficientnet, dims=(2,), sides={(2, True): (64, 64)}
    ),
    ZooNetwork("AHNet", _ahnet, sides={(2, True): (128, 128), (3, False): (128, 128, 32)}, large_only=(3,)),
    ZooNetwork("MedNeXt", _mednext, sides={(3, True): (32, 32, 32)}),
    ZooNetwork("Quicknat", _quicknat, dims=(2,)),
    ZooNetwork("HoVerNet", _hovernet, dims=(2,), sides={(2, False): (256, 256)}, large_only=(2,)),
    ZooNetwork("DiNTS", _dints, sides={(3, True): (32, 32, 32)}),
)

#: MONAI segmentation networks left out of the catalogue, and why.
NOT_COVERED: dict[str, str] = {
    "DAF3D": "its ResNeXt backbone needs torchvision",
    "HyenaNDUNETR": "its Hyena operators need the nvsubquadratic package",
    "VISTA3D": "a promptable model built from separate encoder and heads, not one segmentation network",
    "FlexibleUNet (pretrained)": "downloads backbone weights",
    "DiffusionModelUNet, ControlNet, SPADE networks": "generative models taking timesteps, not segmentation",
    "RegUNet, LocalNet, GlobalNet, VoxelMorph": "image registration networks",
}
