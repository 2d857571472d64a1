"""Build the project's U-Net or a MONAI 2D segmentation network by name from a ``ModelConfig``."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus, DynUNet, SegResNet, UNet
from torch import nn

from acdc_prune.config import ModelConfig
from acdc_prune.errors import ConfigError
from acdc_prune.models.unet import UNet2D
from acdc_prune.names import NETWORK_NAMES


class UNetPlusPlus(BasicUNetPlusPlus):
    """MONAI's ``BasicUNetPlusPlus`` (UNet++) returning one logits tensor, like every other network here.

    MONAI's forward returns a list: the last head's logits, or all four heads' with
    ``deep_supervision=True``. This subclass (same arguments and module names) returns the last
    head's logits (N, out_channels, H, W) in eval mode; in training mode with deep supervision, the
    mean of the four heads' logits, so that one loss trains every head (a simple stand-in for the
    paper's mean of per-head losses).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, out_channels, H, W) of an input (N, in_channels, H, W), H and W multiples of 16."""
        outputs = super().forward(x)
        if self.training and len(outputs) > 1:
            return torch.stack(outputs).mean(dim=0)
        return outputs[-1]


def _monai_norm(norm: str, widths: list[int]) -> tuple[str, dict]:
    """MONAI norm spec; group norm takes as many of 8 groups as every width in ``widths`` allows."""
    if norm == "batch":
        return ("batch", {})
    if norm == "instance":
        return ("instance", {"affine": True})
    return ("group", {"num_groups": math.gcd(8, *widths)})


def _monai_act(cfg: ModelConfig) -> tuple[str, dict]:
    """MONAI activation spec for ``cfg.act``."""
    return {
        "relu": ("relu", {"inplace": True}),
        "leakyrelu": ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        "prelu": ("prelu", {}),
    }[cfg.act]


def _unet_defaults(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "features": tuple(cfg.features),
        "bottleneck": cfg.bottleneck,
        "norm": cfg.norm,
        "act": cfg.act,
        "dropout": cfg.dropout,
        "residual": cfg.residual,
        "upsample": cfg.upsample,
    }


def _io_2d(cfg: ModelConfig) -> dict[str, Any]:
    """The arguments every MONAI 2D network shares: dimensions and input/output channels."""
    return {"spatial_dims": 2, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels}


def _monai_unet_defaults(cfg: ModelConfig) -> dict[str, Any]:
    # MONAI's UNet down-samples with strided convs between its levels: len(features) - 1 of them.
    return {
        **_io_2d(cfg),
        "channels": tuple(cfg.features),
        "strides": (2,) * (len(cfg.features) - 1),
        "num_res_units": 2 if cfg.residual else 0,
        "norm": _monai_norm(cfg.norm, [*cfg.features, cfg.out_channels]),
        "act": _monai_act(cfg),
        "dropout": cfg.dropout,
    }


def _basic_unet_defaults(cfg: ModelConfig, name: str = "basic_unet") -> dict[str, Any]:
    # BasicUNet (and UNet++) always has five levels; its sixth width is that of the last up-sampling.
    features = tuple(cfg.features) + (cfg.features[0],) if len(cfg.features) == 5 else None
    defaults = {
        **_io_2d(cfg),
        "norm": _monai_norm(cfg.norm, cfg.features),
        "act": _monai_act(cfg),
        "dropout": cfg.dropout,
        "upsample": cfg.upsample,
    }
    if features is not None:
        defaults["features"] = features
    elif "features" not in cfg.kwargs:
        raise ConfigError(
            f"model '{name}' has 5 levels: set model.features to 5 widths (got {len(cfg.features)}) "
            "or model.kwargs.features to 6"
        )
    return defaults


def _attention_unet_defaults(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_io_2d(cfg),
        "channels": tuple(cfg.features),
        "strides": (2,) * (len(cfg.features) - 1),
        "dropout": cfg.dropout,
    }


def _dynunet_defaults(cfg: ModelConfig) -> dict[str, Any]:
    # nnU-Net's 2D plan: 3x3 kernels everywhere, full resolution at the first level, then stride 2.
    levels = len(cfg.features)
    return {
        **_io_2d(cfg),
        "kernel_size": [3] * levels,
        "strides": [1] + [2] * (levels - 1),
        "upsample_kernel_size": [2] * (levels - 1),
        "filters": list(cfg.features),
        "dropout": cfg.dropout or None,
        "norm_name": _monai_norm(cfg.norm, cfg.features),
        "act_name": _monai_act(cfg),
        "res_block": cfg.residual,
    }


def _segresnet_defaults(cfg: ModelConfig) -> dict[str, Any]:
    # SegResNet doubles its width per level from init_filters; the level count follows len(features).
    levels = len(cfg.features)
    blocks_down = (1, 2, 2, 4, 4, 4, 4)[:levels]
    return {
        **_io_2d(cfg),
        "init_filters": cfg.features[0],
        "dropout_prob": cfg.dropout or None,
        "act": _monai_act(cfg),
        "norm": _monai_norm(cfg.norm, [cfg.features[0]]),
        "blocks_down": blocks_down,
        "blocks_up": (1,) * (levels - 1),
        "upsample_mode": cfg.upsample,
    }


def _strides(kwargs: dict[str, Any]) -> int:
    """Product over levels of ``kwargs["strides"]``, whose items are ints or per-axis sequences (largest)."""
    total = 1
    for stride in kwargs["strides"]:
        total *= max(stride) if isinstance(stride, (list, tuple)) else int(stride)
    return total


@dataclass(frozen=True)
class Network:
    """A network the registry builds by name.

    Attributes:
        cls: the network class (its constructor's arguments are the valid ``model.kwargs``).
        defaults: the 2D constructor arguments derived from a ``ModelConfig``.
        stride: the total stride (input sides must be multiples of it) from the final arguments.
    """

    cls: Callable[..., nn.Module]
    defaults: Callable[[ModelConfig], dict[str, Any]]
    stride: Callable[[dict[str, Any]], int]


NETWORKS: dict[str, Network] = {
    "unet": Network(UNet2D, _unet_defaults, lambda kwargs: 2 ** len(kwargs["features"])),
    "monai_unet": Network(UNet, _monai_unet_defaults, _strides),
    "basic_unet": Network(BasicUNet, _basic_unet_defaults, lambda _kwargs: 16),
    "basic_unet_plus_plus": Network(
        UNetPlusPlus, functools.partial(_basic_unet_defaults, name="basic_unet_plus_plus"), lambda _kwargs: 16
    ),
    "attention_unet": Network(AttentionUnet, _attention_unet_defaults, _strides),
    "dynunet": Network(DynUNet, _dynunet_defaults, _strides),
    "segresnet": Network(
        SegResNet, _segresnet_defaults, lambda kwargs: 2 ** (len(kwargs["blocks_down"]) - 1)
    ),
}
"""The networks by ``model.name``; their names are :data:`acdc_prune.names.NETWORK_NAMES`, in order."""


def network_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """The constructor arguments ``build_model`` uses: 2D defaults from the config, then ``kwargs``.

    Raises:
        ConfigError: unknown network name, or a ``kwargs`` key the network's constructor does not take.
    """
    if model_cfg.name not in NETWORKS:
        raise ConfigError(f"unknown model '{model_cfg.name}': choose one of {', '.join(NETWORK_NAMES)}")
    cls, defaults = NETWORKS[model_cfg.name].cls, NETWORKS[model_cfg.name].defaults
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key in model_cfg.kwargs:
        if key not in accepted:
            raise ConfigError(
                f"model.kwargs.{key}: '{model_cfg.name}' ({cls.__name__}) takes no argument '{key}'; "
                f"valid: {', '.join(sorted(accepted))}"
            )
    return {**defaults(model_cfg), **model_cfg.kwargs}


def build_model(model_cfg: ModelConfig) -> nn.Module:
    """Instantiate the network named by ``model_cfg.name`` for 2D slices.

    Args:
        model_cfg: name, channels, widths (``features``), norm, activation, dropout, residual and
            up-sampling; ``kwargs`` override or extend the derived constructor arguments.

    Returns:
        A module mapping (N, in_channels, H, W) to logits (N, out_channels, H, W) for H, W divisible
        by :func:`total_stride`.

    Raises:
        ConfigError: unknown name or argument, or arguments the network refuses (message names it).
    """
    kwargs = network_kwargs(model_cfg)
    cls = NETWORKS[model_cfg.name].cls
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise ConfigError(f"cannot build model '{model_cfg.name}' ({cls.__name__}): {err}") from None


def total_stride(model_cfg: ModelConfig) -> int:
    """The divisor input sides must be padded to for the network named by ``model_cfg`` (e.g. 16, 32)."""
    kwargs = network_kwargs(model_cfg)
    return NETWORKS[model_cfg.name].stride(kwargs)
