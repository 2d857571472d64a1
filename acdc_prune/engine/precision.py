"""Numeric precision and memory format of training and inference: detected, resolved once, recorded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from acdc_prune.config import PRECISIONS
from acdc_prune.errors import ConfigError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved choice: the autocast dtype of the forward pass and the memory format.

    Losses, metrics and probabilities stay in float32 whatever the choice; only the network's
    forward (and its backward) runs under autocast.

    Attributes:
        name: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (CUDA only, with gradient scaling).
        channels_last: convolutions see NHWC tensors (oneDNN on CPUs, tensor cores on GPUs).
        reason: why this was chosen, for the one line a run prints.
    """

    name: str
    channels_last: bool
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or ``None`` for plain float32."""
        return _DTYPES[self.name]

    @property
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` or ``torch.contiguous_format``."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def scales_gradients(self) -> bool:
        """Whether training needs a gradient scaler (float16 only: bfloat16 has float32's range)."""
        return self.name == "fp16"

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """Run the enclosed forward pass in this precision on ``device`` (a no-op for fp32)."""
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            yield

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Move ``model`` to ``device`` in this memory format (in place; returned for chaining)."""
        return model.to(device, memory_format=self.memory_format)

    def describe(self) -> str:
        """One line for the run's log, e.g. ``precision bf16 + channels-last (auto: ...)``."""
        layout = " + channels-last" if self.channels_last else ""
        return f"precision {self.name}{layout}" + (f" ({self.reason})" if self.reason else "")


FP32 = Precision("fp32", channels_last=False)
"""Plain float32 in the default memory format."""


def cpu_capabilities() -> dict[str, bool]:
    """The instruction-set flags PyTorch detected on this CPU (``avx512_bf16``, ``amx_bf16``, ...)."""
    return {key: bool(value) for key, value in torch._C._cpu._get_cpu_capability().items()}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (fast), not by emulation.

    On a CPU that means AVX-512 BF16 or AMX-BF16 as detected by PyTorch (``cpu_capabilities``),
    with oneDNN's bfloat16 path available; on CUDA, ``torch.cuda.is_bf16_supported()``.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_capabilities()
    native = flags.get("avx512_bf16", False) or flags.get("amx_bf16", False)
    return native and torch.backends.mkldnn.is_available()


def _auto_name(device: torch.device) -> tuple[str, str]:
    if native_bf16(device):
        where = "GPU" if device.type == "cuda" else "CPU has AVX-512 BF16 or AMX"
        return "bf16", f"auto: {where}"
    if device.type == "cuda":
        return "fp16", "auto: GPU without bfloat16"
    return "fp32", "auto: CPU without native bfloat16"


def resolve_precision(
    precision: str, channels_last: bool | str, device: torch.device, setting: str = "training"
) -> Precision:
    """Turn the configured ``precision`` and ``channels_last`` into a :class:`Precision` for ``device``.

    ``auto`` picks bf16 where the device runs it natively (see :func:`native_bf16`), fp16 on a GPU
    without bfloat16, fp32 elsewhere; ``channels_last: auto`` turns channels-last on with any
    autocast precision and on CUDA, where it pays.

    Args:
        precision: one of :data:`PRECISIONS`.
        channels_last: ``True``, ``False`` or ``"auto"``.
        device: where the network runs.
        setting: the config section named in errors (``training`` or ``evaluation``).

    Raises:
        ConfigError: an unknown value, fp16 on a CPU, or bf16 on a device without native support
            (the message says what ``auto`` would pick).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{setting}.precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    auto_name, reason = _auto_name(device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{setting}.precision: fp16 needs a CUDA GPU; on this CPU auto would pick {auto_name}"
        )
    if precision == "bf16" and not native_bf16(device):
        raise ConfigError(
            f"{setting}.precision: bf16 was asked for but this {device.type.upper()} has no native "
            f"bfloat16 support (AVX-512 BF16 or AMX); auto would pick {auto_name}"
        )
    name = auto_name if precision == "auto" else precision
    reason = reason if precision == "auto" else "as configured"
    layout = (name != "fp32" or device.type == "cuda") if channels_last == "auto" else bool(channels_last)
    return Precision(name, layout, reason)
