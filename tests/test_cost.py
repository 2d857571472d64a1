"""Model cost counters: exact parameters, MACs and tensor memory on tiny networks; latency bookkeeping."""

from __future__ import annotations

import torch
from torch import nn

from acdc_prune.config import EvaluationConfig
from acdc_prune.engine.cost import (
    count_macs,
    count_parameters,
    measure_latency,
    model_cost,
    peak_memory_bytes,
)


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
