"""The device a job runs on, from the ``training.device`` setting."""

from __future__ import annotations

import torch

from acdc_prune.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device (checked to exist).

    Raises:
        ConfigError: CUDA requested but not available, or an unknown device string.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"training.device: '{spec}' is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device: '{spec}' requested but CUDA is not available (use auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"training.device: '{spec}' is not supported (use auto, cpu, cuda or cuda:N)")
    return device
