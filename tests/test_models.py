"""The project's U-Net (shapes, names, classic size, fx trace) and the MONAI network registry."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
import torch.fx
from monai.networks.nets import BasicUNetPlusPlus

from acdc_prune.config import ModelConfig, config_from_dict
from acdc_prune.errors import ConfigError
from acdc_prune.models import UNet2D, build_model, total_stride
from acdc_prune.models.registry import NETWORKS, UNetPlusPlus, network_kwargs
from acdc_prune.names import NETWORK_NAMES
from acdc_prune.pruning import apply_plan, max_deviation, plan_pruning, randomise_norm_statistics


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_classic_has_the_original_parameter_count():
    model = UNet2D.classic()
    assert _params(model) == 43_886_340
    assert model.features == (64, 128, 256, 512, 512)
    assert model.bottleneck_width == 1024
    assert model.encoders[0].conv1.conv.bias is None
    assert isinstance(model.encoders[0].conv1.adn.N, torch.nn.BatchNorm2d)
    deconv = model.upsamples[4].deconv
    assert isinstance(deconv, torch.nn.ConvTranspose2d)
    assert (deconv.in_channels, deconv.out_channels, deconv.kernel_size, deconv.stride) == (
        1024,
        512,
        (2, 2),
        (2, 2),
    )
    assert model.head.kernel_size == (1, 1)


def test_block_names_are_the_pruning_prefixes():
    model = UNet2D(features=(8, 16, 32))
    top = [name for name, _ in model.named_children()]
    assert top == ["encoders", "pool", "bottleneck", "upsamples", "decoders", "head"]
    names = {name for name, _ in model.named_modules()}
    for level in range(3):
        assert {f"encoders.{level}", f"upsamples.{level}", f"decoders.{level}"} <= names
    assert model.decoders[1].conv1.conv.in_channels == 32  # skip (16) + up-sampled (16)
    assert model.bottleneck.conv2.conv.out_channels == 64  # default: twice the last level


@pytest.mark.parametrize("size", [(64, 64), (50, 70), (17, 33)])
def test_any_input_size_gives_logits_of_the_input_size(size):
    model = UNet2D(features=(8, 16, 32, 64)).eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        assert model(x).shape == (2, 4, *size)


def test_decoder_concatenates_the_skip_first():
    model = UNet2D(features=(4, 8)).eval()
    seen = {}
    model.decoders[0].register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    skips = {}
    model.encoders[0].register_forward_hook(lambda module, args, out: skips.setdefault("skip", out))
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16))
    assert torch.equal(seen["input"][:, :4], skips["skip"])


@pytest.mark.parametrize(
    "options",
    [
        {"residual": True, "norm": "instance", "act": "prelu", "dropout": 0.2, "upsample": "nontrainable"},
        {"norm": "group", "act": "leakyrelu", "bottleneck": 24},
        {"residual": True, "norm": "batch"},
    ],
)
def test_variants_run_forward_and_backward(options):
    model = UNet2D(in_channels=2, out_channels=3, features=(8, 16, 32), **options)
    x = torch.randn(2, 2, 40, 40)
    out = model(x)
    assert out.shape == (2, 3, 40, 40)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_prelu_has_one_slope_per_channel():
    model = UNet2D(features=(8, 16), act="prelu")
    assert model.encoders[1].conv2.adn.A.weight.shape == (16,)


@pytest.mark.parametrize("size", [(32, 32), (30, 42)])
def test_symbolic_trace_reproduces_the_output(size):
    model = UNet2D(features=(8, 16, 32)).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-6)
    assert sum(node.target is torch.cat for node in traced.graph.nodes) == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="norm 'layer'"):
        UNet2D(norm="layer")
    with pytest.raises(ValueError, match="features"):
        UNet2D(features=())


NETWORK_CASES = {
    "unet": [16, 32, 64],
    "monai_unet": [8, 16, 32, 64],
    "basic_unet": [8, 8, 16, 32, 64],
    "basic_unet_plus_plus": [8, 8, 16, 16, 32],
    "attention_unet": [8, 16, 32],
    "dynunet": [8, 16, 32, 64],
    "segresnet": [8, 16, 32],
}


@pytest.mark.parametrize("name", list(NETWORK_CASES))
def test_registry_builds_each_network_and_runs_at_its_stride(name):
    cfg = ModelConfig(name=name, features=NETWORK_CASES[name], norm="instance")
    model = build_model(cfg)
    stride = total_stride(cfg)
    x = torch.randn(2, 1, stride * 2, stride * 3)
    model.train()
    out = model(x)
    assert out.shape == (2, 4, stride * 2, stride * 3)
    out.mean().backward()


def test_total_strides_follow_the_depth():
    assert total_stride(ModelConfig(name="unet", features=[8, 16, 32, 64, 128])) == 32
    assert total_stride(ModelConfig(name="monai_unet", features=[8, 16, 32, 64])) == 8
    assert total_stride(ModelConfig(name="basic_unet", features=[8, 8, 16, 32, 64])) == 16
    assert total_stride(ModelConfig(name="basic_unet_plus_plus", features=[8, 8, 16, 32, 64])) == 16
    assert total_stride(ModelConfig(name="dynunet", features=[8, 16, 32, 64, 128])) == 16
    assert total_stride(ModelConfig(name="segresnet", features=[8, 16, 32, 64])) == 8
    assert (
        total_stride(ModelConfig(name="dynunet", kwargs={"strides": [1, 2, [2, 1]]}, features=[8, 16, 32]))
        == 4
    )


def test_unet_from_the_registry_is_the_projects_unet():
    cfg = ModelConfig(features=[8, 16], bottleneck=20, residual=True)
    model = build_model(cfg)
    assert isinstance(model, UNet2D)
    assert model.bottleneck_width == 20


def test_kwargs_override_the_derived_defaults():
    cfg = ModelConfig(name="monai_unet", features=[8, 16, 32], kwargs={"num_res_units": 1, "kernel_size": 5})
    kwargs = network_kwargs(cfg)
    assert kwargs["num_res_units"] == 1 and kwargs["kernel_size"] == 5 and kwargs["channels"] == (8, 16, 32)
    model = build_model(cfg)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 4, 16, 16)


def test_unknown_kwarg_names_the_argument_and_the_network():
    cfg = ModelConfig(name="segresnet", kwargs={"channels": [8, 16]})
    with pytest.raises(ConfigError, match=r"model\.kwargs\.channels: 'segresnet' \(SegResNet\)"):
        build_model(cfg)


def test_refused_arguments_become_a_config_error():
    with pytest.raises(ConfigError, match="basic_unet"):
        build_model(ModelConfig(name="basic_unet", features=[8, 16]))
    with pytest.raises(ConfigError, match=r"cannot build model 'dynunet' \(DynUNet\): length of kernel_size"):
        build_model(ModelConfig(name="dynunet", features=[8, 16, 32], kwargs={"kernel_size": [3, 3]}))


def test_registry_builds_exactly_the_named_networks():
    assert tuple(NETWORKS) == NETWORK_NAMES
    choices = next(f for f in fields(ModelConfig) if f.name == "name").metadata["choices"]
    assert tuple(choices) == NETWORK_NAMES


def test_config_and_network_names_load_without_torch():
    code = "import sys, acdc_prune.config, acdc_prune.names; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def test_unet_plus_plus_returns_the_last_head_and_averages_heads_when_supervised():
    cfg = ModelConfig(
        name="basic_unet_plus_plus", features=[8, 8, 16, 16, 32], kwargs={"deep_supervision": True}
    )
    model = build_model(cfg)
    assert isinstance(model, UNetPlusPlus)
    x = torch.randn(2, 1, 32, 48)
    model.eval()
    with torch.no_grad():
        heads = BasicUNetPlusPlus.forward(model, x)
        assert len(heads) == 4
        assert torch.equal(model(x), heads[-1])
        model.train()
        heads = BasicUNetPlusPlus.forward(model, x)
        assert torch.allclose(model(x), torch.stack(heads).mean(0), atol=1e-6)
    out = model(x)
    assert out.shape == (2, 4, 32, 48)
    out.mean().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "final_conv" in name)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_unet_plus_plus_prunes_exactly_and_keeps_its_heads(deep_supervision):
    cfg = ModelConfig(
        name="basic_unet_plus_plus",
        features=[8, 8, 16, 16, 32],
        kwargs={"deep_supervision": deep_supervision},
    )
    model = randomise_norm_statistics(build_model(cfg)).eval()
    x = torch.randn(1, 1, 32, 32)
    plan = plan_pruning(model, x, 0.5)
    pruned = apply_plan(model, plan)
    assert max_deviation(model, pruned, plan, x) <= 1e-5
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    for head in ("final_conv_0_1", "final_conv_0_2", "final_conv_0_3", "final_conv_0_4"):
        assert getattr(pruned, head).out_channels == 4  # every head keeps its classes
    pruned.train()
    pruned(x).mean().backward()  # the heads still line up in training mode


def test_unet_plus_plus_trains_an_epoch_on_the_phantom(tmp_path, tiny_phantom):
    from acdc_prune.engine.trainer import train

    config = config_from_dict(
        {
            "data": {
                "root": str(tiny_phantom),
                "val_fraction": 0.2,
                "target_spacing": [3.0, 3.0],
                "patch_size": [64, 64],
            },
            "model": {
                "name": "basic_unet_plus_plus",
                "features": [8, 8, 16, 16, 32],
                "kwargs": {"deep_supervision": True},
            },
            "training": {"epochs": 1, "batch_size": 4, "iterations_per_epoch": 2, "num_threads": 1},
            "evaluation": {"batch_size": 8},
            "logging": {"runs_dir": str(tmp_path / "runs"), "experiment": "upp", "progress": False},
        }
    )
    result = train(config)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert 0.0 <= result.best_dice <= 1.0
