"""Model cost counters: exact parameters, MACs and memory of tiny networks (PyTorch and ONNX); latency."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from acdc_prune.config import EvaluationConfig
from acdc_prune.engine.cost import (
    count_macs,
    count_parameters,
    measure_latency,
    model_cost,
    onnx_parameters,
    peak_memory_bytes,
)
from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import randomise_norm_statistics


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_parameters_are_counted_exactly():
    # conv 4*1*3*3 + 4, BatchNorm weight and bias 4 + 4 (running stats are buffers), conv 2*4 + 2.
    assert count_parameters(_tiny_net()) == 40 + 8 + 10


def test_shared_parameters_are_counted_once():
    conv = nn.Conv2d(2, 2, 1)
    assert count_parameters(nn.Sequential(conv, conv)) == 6


def test_macs_of_one_convolution():
    k, cin, cout, h, w = 3, 3, 5, 16, 12
    conv = nn.Conv2d(cin, cout, k, padding=1)
    assert count_macs(conv, (1, cin, h, w)) == k * k * cin * cout * h * w


def test_macs_scale_with_batch_and_restore_training_mode():
    net = _tiny_net().train()
    single = count_macs(net, (1, 1, 8, 8))
    assert single == (9 * 1 * 4 + 1 * 4 * 2) * 8 * 8
    assert count_macs(net, (2, 1, 8, 8)) == 2 * single
    assert net.training


def test_peak_memory_of_a_conv_chain_is_the_largest_live_pair():
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False)
    )
    resident = (8 * 9 + 4 * 8 * 9) * 4 + 32 * 32 * 4  # float32 weights + input
    # The first conv's output and the ReLU's output are alive together (8 channels of 32x32 each).
    assert peak_memory_bytes(net, (1, 1, 32, 32)) == resident + 2 * 8 * 32 * 32 * 4


def test_latency_reports_median_and_spread_per_slice():
    net = _tiny_net()
    result = measure_latency(net, (2, 1, 16, 16), repeats=5, warmup=1)
    assert result["repeats"] == 5 and result["batch"] == 2 and result["device"] == "cpu"
    assert result["median_ms"] > 0 and result["iqr_ms"] >= 0
    assert result["threads"] == torch.get_num_threads()
    assert net.training


def test_model_cost_combines_the_counters():
    cfg = EvaluationConfig(latency_repeats=3, latency_warmup=1, latency_size=[16, 16])
    net = _tiny_net()
    cost = model_cost(net, cfg, in_channels=1, device="cpu")
    assert cost["params"] == 58
    assert cost["macs"] == count_macs(net, (1, 1, 16, 16))
    assert cost["input_shape"] == [1, 1, 16, 16]
    assert cost["latency_cpu"]["repeats"] == 3
    assert cost["peak_memory"]["bytes"] == peak_memory_bytes(net, (1, 1, 16, 16))
    assert cost["peak_memory"]["device"] == "cpu"
    assert "latency_cuda" not in cost


@pytest.fixture(scope="module")
def tiny_unet_onnx():
    """A tiny UNet2D (stride 4, batch norm), its float ONNX export and its int8 QDQ model."""
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package)
    from acdc_prune.engine.formats import export_onnx
    from acdc_prune.engine.quantize import quantize_onnx

    torch.manual_seed(0)
    model = randomise_norm_statistics(UNet2D(features=(4, 8), bottleneck=8)).eval()
    float_bytes = export_onnx(model, torch.randn(2, 1, 12, 16), 4)
    generator = torch.Generator().manual_seed(0)
    int8_bytes, _ = quantize_onnx(
        float_bytes, [torch.randn(1, 1, 16, 24, generator=generator) for _ in range(8)]
    )
    return model, float_bytes, int8_bytes


def test_an_int8_onnx_model_counts_the_macs_and_parameters_of_its_float_network(tiny_unet_onnx):
    from acdc_prune.engine.quantize import OnnxModel

    model, float_bytes, int8_bytes = tiny_unet_onnx
    float_onnx, int8 = OnnxModel(float_bytes), OnnxModel(int8_bytes)
    for shape in [(1, 1, 16, 24), (3, 1, 20, 28)]:
        assert count_macs(int8, shape) == count_macs(float_onnx, shape) == count_macs(model, shape) > 0
    # Without a recorded count, the graph's weights: int8 ones count their elements as float ones do.
    # The exporter folded each of the 10 BatchNorms into the conv before it: C biases for 2 C parameters.
    folded = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert count_parameters(int8) == count_parameters(float_onnx) == count_parameters(model) - folded == 4836
    # `acdc-prune quantize` records the float network's count in the summary; the cost report takes it.
    recorded = OnnxModel(int8_bytes, {"source": {"params": count_parameters(model)}})
    cfg = EvaluationConfig(latency_repeats=1, latency_warmup=0, latency_size=[16, 24])
    cost = model_cost(recorded, cfg, in_channels=1, device="cpu")
    assert (cost["params"], cost["macs"]) == (count_parameters(model), count_macs(model, (1, 1, 16, 24)))


def test_onnx_parameters_count_weights_biases_and_norm_scales_once():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def initializer(name, dims, dtype=TensorProto.FLOAT):
        return helper.make_tensor(name, dtype, dims, [0] * math.prod(dims))

    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]),
        helper.make_node("Conv", ["n", "w", "b"], ["c2"]),  # shares the first conv's weights
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["m"]),
        helper.make_node("Add", ["m", "fc_bias"], ["y"]),
    ]
    inits = [
        initializer("w_q", [4, 4, 3, 3], TensorProto.INT8),
        initializer("w_scale", [4]),
        initializer("w_zero", [4], TensorProto.INT8),
        initializer("b", [4]),
        *(initializer(name, [4]) for name in ("gamma", "beta", "mean", "var")),
        initializer("fc", [64, 2]),
        initializer("fc_bias", [2]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    # int8 weight 144 + bias 4, BatchNorm scale and shift 8 (not its statistics), linear 128 + 2.
    assert onnx_parameters(helper.make_model(graph)) == 144 + 4 + 8 + 128 + 2
