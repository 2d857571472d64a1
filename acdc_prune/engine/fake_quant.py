"""Fake quantization for QAT: convolutions seeing their inputs and weights rounded as int8 inference will."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _observe(module: nn.Module, x: torch.Tensor) -> None:
    """Update ``module``'s activation range: running min/max while calibrating, an EMA while training."""
    low, high = x.detach().min().float(), x.detach().max().float()
    if module.fq_calibrating or not torch.isfinite(module.fq_min):
        module.fq_min.copy_(torch.minimum(module.fq_min, low))
        module.fq_max.copy_(torch.maximum(module.fq_max, high))
    else:
        module.fq_min.add_(0.01 * (low - module.fq_min))
        module.fq_max.add_(0.01 * (high - module.fq_max))


def fake_quant_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to uint8 with ``module``'s observed range (asymmetric, 0 included, as onnxruntime does).

    The gradient passes straight through inside the range and is zero outside it.
    """
    if module.training or module.fq_calibrating:
        with torch.no_grad():
            _observe(module, x)
    if not torch.isfinite(module.fq_min):
        return x
    low, high = module.fq_min.clamp(max=0.0), module.fq_max.clamp(min=0.0)
    scale = ((high - low) / 255.0).clamp(min=1e-8)
    zero_point = (-low / scale).round().clamp(0, 255).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, 0, 255).to(x.dtype)


def fake_quant_weight(weight: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``weight`` rounded to int8 per output channel ``axis`` (symmetric, range +-127), straight-through."""
    dims = [d for d in range(weight.dim()) if d != axis]
    scale = (weight.detach().abs().amax(dim=dims).float() / 127.0).clamp(min=1e-8)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, axis, -127, 127)


class FakeQuantConv2d(nn.Conv2d):
    """A ``Conv2d`` that sees its input and weight as int8 inference will; same shapes as ``Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias)


class FakeQuantConvTranspose2d(nn.ConvTranspose2d):
    """A ``ConvTranspose2d`` whose input is rounded to uint8; its weights stay float, as in the int8 model."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return super().forward(fake_quant_input(self, x), output_size)


_FAKE = {nn.Conv2d: FakeQuantConv2d, nn.ConvTranspose2d: FakeQuantConvTranspose2d}
_REAL = {fake: real for real, fake in _FAKE.items()}


def output_conv(model: nn.Module, in_channels: int, size: int) -> str:
    """Name of the last convolution ``model`` runs: its output head (stays in float).

    Args:
        model: the network; run once in eval mode on a zero ``(1, in_channels, size, size)`` input.
        in_channels: its input channels.
        size: an input side its total stride divides.
    """
    order: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, module in model.named_modules()
        if type(module) in _FAKE
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, size, size))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return order[-1]


def enable_fake_quant(model: nn.Module, float_names: Sequence[str]) -> list[str]:
    """Make every ``Conv2d`` / ``ConvTranspose2d`` of ``model`` fake-quantize, in place.

    The state dict keeps its keys (observed ranges are non-persistent buffers), so the trainer's
    checkpoints of a fake-quantized model load into the plain network.

    Args:
        model: the float network.
        float_names: module-path prefixes to leave in float (the output head among them).

    Returns:
        The names of the modules now fake-quantized.
    """
    changed = []
    for name, module in model.named_modules():
        kept = any(name == prefix or name.startswith(prefix + ".") for prefix in float_names)
        if type(module) in _FAKE and not kept:
            module.__class__ = _FAKE[type(module)]
            module.register_buffer("fq_min", torch.tensor(math.inf), persistent=False)
            module.register_buffer("fq_max", torch.tensor(-math.inf), persistent=False)
            module.fq_calibrating = False
            changed.append(name)
    return changed


def disable_fake_quant(model: nn.Module) -> None:
    """Undo :func:`enable_fake_quant`: plain float convolutions with the same weights."""
    for module in model.modules():
        if type(module) in _REAL:
            module.__class__ = _REAL[type(module)]
            for attribute in ("fq_min", "fq_max", "fq_calibrating"):
                delattr(module, attribute)


def calibrate_fake_quant(model: nn.Module, slices: Sequence[torch.Tensor]) -> None:
    """Set the observed input ranges of ``model``'s fake-quantized modules to the min/max over ``slices``.

    Args:
        model: a network after :func:`enable_fake_quant`; run in eval mode, one ``(1, C_in, H, W)``
            slice at a time, on its parameters' device.
    """
    fakes = [m for m in model.modules() if type(m) in _REAL]
    device = next(model.parameters()).device
    was_training = model.training
    for module in fakes:
        module.fq_calibrating = True
    try:
        with torch.no_grad():
            model.eval()
            for x in slices:
                model(x.to(device))
    finally:
        model.train(was_training)
        for module in fakes:
            module.fq_calibrating = False
