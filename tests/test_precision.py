"""Precision and memory format: resolution on mocked CPUs, bf16 steps close to fp32, the choice recorded."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from test_training import tiny_config

from acdc_prune.config import config_from_dict
from acdc_prune.engine import precision as precision_module
from acdc_prune.engine.precision import FP32, Precision, native_bf16, resolve_precision
from acdc_prune.engine.steps import build_train_step
from acdc_prune.engine.trainer import train
from acdc_prune.errors import ConfigError
from acdc_prune.models import build_model

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not native_bf16(CPU), reason="this CPU has no native bfloat16")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags PyTorch reports: ``cpu_flags(avx512_bf16=True)``."""

    def set_flags(**flags: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: flags)

    return set_flags


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512_bf16": True}, Precision("bf16", True)),
        ({"amx_bf16": True, "avx512_bf16": False}, Precision("bf16", True)),
        ({"avx2": True}, Precision("fp32", False)),
    ],
)
def test_auto_follows_the_detected_cpu_flags(cpu_flags, flags, expected):
    cpu_flags(**flags)
    resolved = resolve_precision("auto", "auto", CPU)
    assert (resolved.name, resolved.channels_last) == (expected.name, expected.channels_last)
    assert resolved.reason.startswith("auto:")


def test_explicit_settings_win_over_auto(cpu_flags):
    cpu_flags(avx512_bf16=True)
    assert resolve_precision("fp32", "auto", CPU) == Precision("fp32", False, "as configured")
    assert resolve_precision("fp32", True, CPU).channels_last is True
    assert resolve_precision("bf16", False, CPU) == Precision("bf16", False, "as configured")


def test_bf16_without_support_and_fp16_on_cpu_are_one_line_errors(cpu_flags):
    cpu_flags(avx2=True)
    with pytest.raises(
        ConfigError, match=r"^training.precision: bf16 was asked for .* auto would pick fp32$"
    ):
        resolve_precision("bf16", "auto", CPU)
    with pytest.raises(ConfigError, match=r"^evaluation.precision: fp16 needs a CUDA GPU; .* pick fp32$"):
        resolve_precision("fp16", "auto", CPU, "evaluation")


def test_configs_of_version_0_1_still_load():
    assert config_from_dict({"training": {"amp": True}}).training.precision == "auto"
    assert config_from_dict({"training": {"amp": False}}).training.precision == "fp32"
    assert config_from_dict({"training": {"channels_last": True}}).training.channels_last is True


@needs_bf16
def test_a_bf16_step_is_finite_and_close_to_fp32():
    config = config_from_dict({"model": {"features": [8, 16]}, "training": {"grad_clip": None}})
    torch.manual_seed(0)
    model = build_model(config.model)
    image = torch.randn(4, 1, 32, 32)
    label = torch.randint(0, 4, (4, 1, 32, 32))
    losses, weights = {}, {}
    for precision in (FP32, Precision("bf16", True)):
        step = build_train_step(copy.deepcopy(model), config.training, CPU, 10, precision)
        losses[precision.name] = step(image, label).item()
        weights[precision.name] = torch.cat([p.detach().flatten() for p in step.model.parameters()])
    assert all(map(torch.isfinite, map(torch.tensor, losses.values())))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    moved = (weights["bf16"] - weights["fp32"]).abs().max().item()
    assert moved < 0.1 * config.training.lr * 10  # AdamW moves each weight by about lr per step


@needs_bf16
def test_the_run_config_records_the_resolved_choice(tmp_path, tiny_phantom):
    config = tiny_config(tmp_path, tiny_phantom, epochs=1)
    result = train(config)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["training"]["precision"] == "bf16" and saved["training"]["channels_last"] is True
    assert saved["evaluation"]["precision"] == "bf16"
