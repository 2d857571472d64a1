"""Model cost: parameters, multiply-accumulates, latency and peak memory of one forward pass.

Methods (also in ``docs/evaluation.md``):

* Parameters: every element of every distinct parameter tensor (trainable or not); buffers such as
  BatchNorm running statistics are not parameters.
* MACs: ``torch.utils.flop_counter.FlopCounterMode`` FLOPs of one eval-mode forward divided by 2
  (it counts a multiply-accumulate as 2 FLOPs; bias adds, norms and activations are not counted).
* ONNX models run by onnxruntime (:class:`acdc_prune.engine.quantize.OnnxModel`, int8 or float) have
  no torch parameters and run no torch operators, so both come from the ONNX graph instead: MACs
  from its convolution and matrix-product shapes at the input shape (:func:`onnx_macs`, the same
  rules as ``FlopCounterMode``, so an int8 model has exactly its float network's MACs); parameters
  are the float network's count recorded in the model's summary (``acdc-prune quantize`` records
  it), else the weight elements of the graph (:func:`onnx_parameters`). An int8 weight counts as
  many parameters as the float weight it replaces (its number of elements).
* Latency: wall-clock time of eval-mode forward passes under ``torch.inference_mode`` after
  untimed warm-up passes, divided by the batch size; median and inter-quartile range over repeats.
  CUDA timings synchronise the device before reading the clock.
* Peak memory: bytes of parameters, buffers and the input, plus the peak of tensor memory allocated
  during one forward pass. On CUDA the peak comes from ``torch.cuda.max_memory_allocated``; on the
  CPU from a dispatch mode that adds the storage size of every tensor an operator creates and
  subtracts it when the storage is freed. Neither counts allocator caching or library scratch
  buffers (e.g. oneDNN or cuDNN workspaces).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from acdc_prune.config import EvaluationConfig
from acdc_prune.errors import ExportError

#: ONNX operators whose initializer inputs after the data input are parameters: weights and biases of
#: convolutions and matrix products, scales and shifts of norms (not their running statistics), slopes.
_ONNX_PARAMETER_INPUTS: dict[str, slice] = {
    "Conv": slice(1, 3),
    "ConvTranspose": slice(1, 3),
    "Gemm": slice(1, 3),
    "MatMul": slice(1, 2),
    "BatchNormalization": slice(1, 3),
    "InstanceNormalization": slice(1, 3),
    "LayerNormalization": slice(1, 3),
    "GroupNormalization": slice(1, 3),
    "PRelu": slice(1, 2),
}


def _onnx_proto(model: nn.Module) -> Any | None:
    """The ``onnx.ModelProto`` of a model that onnxruntime runs, ``None`` for a PyTorch network."""
    from acdc_prune.engine.quantize import OnnxModel

    if not isinstance(model, OnnxModel):
        return None
    import onnx

    return onnx.load_model_from_string(model.data)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once).

    For an :class:`acdc_prune.engine.quantize.OnnxModel`: the float network's count recorded in its
    summary (``source.params``, written by ``acdc-prune quantize``), else :func:`onnx_parameters`.
    """
    proto = _onnx_proto(model)
    if proto is None:
        return sum(p.numel() for p in model.parameters())
    recorded = model.info.get("source", {}).get("params")
    return int(recorded) if recorded is not None else onnx_parameters(proto)


def onnx_parameters(proto: Any) -> int:
    """Parameters of an ONNX graph: the elements of every distinct initializer that is a weight or bias.

    Counted: weights and biases of ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` (and a bias
    added to a ``MatMul`` result), scales and shifts of norms, ``PRelu`` slopes. A quantized weight
    or bias (an initializer read through ``DequantizeLinear``) counts its elements, as the float one
    does; quantization scales and zero points, like norm running statistics, are not parameters.
    An exporter that folds a BatchNorm into the convolution before it leaves that convolution's
    ``C`` biases for the ``2 C`` BatchNorm scales and shifts of the PyTorch network.

    Args:
        proto: an ``onnx.ModelProto``.
    """
    graph = proto.graph
    sizes = {tensor.name: math.prod(tensor.dims) for tensor in graph.initializer}
    dequantized = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    products = {node.output[0] for node in graph.node if node.op_type == "MatMul"}
    counted: set[str] = set()
    for node in graph.node:
        if node.op_type == "Add" and products.intersection(node.input):
            inputs = list(node.input)
        else:
            inputs = list(node.input[_ONNX_PARAMETER_INPUTS.get(node.op_type, slice(0))])
        counted.update(dequantized.get(name, name) for name in inputs)
    return sum(sizes[name] for name in counted if name in sizes)


def _onnx_shapes(proto: Any, input_shape: tuple[int, ...]) -> dict[str, list[int | None]]:
    """Shape of every value of an ONNX graph when its first input has ``input_shape`` (onnx inference).

    Raises:
        ExportError: the graph's shapes cannot be inferred at this input shape.
    """
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for dim, size in zip(fixed.graph.input[0].type.tensor_type.shape.dim, input_shape, strict=True):
        dim.Clear()
        dim.dim_value = size
    # The exporter's symbolic intermediate shapes would be kept as they are: infer them afresh.
    del fixed.graph.value_info[:]
    for output in fixed.graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=True).graph
    except Exception as err:  # onnx raises its own error types for inconsistent shapes
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(
            f"cannot infer the ONNX model's shapes at input {list(input_shape)}: {reason}"
        ) from None
    shapes: dict[str, list[int | None]] = {tensor.name: list(tensor.dims) for tensor in inferred.initializer}
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def onnx_macs(proto: Any, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one run of an ONNX graph, counted as :func:`count_macs` counts them.

    ``Conv``: batch x output positions x weight elements; ``ConvTranspose``: batch x input positions x
    weight elements; ``Gemm`` and ``MatMul``: output elements x the inner dimension. Whether a
    weight is int8 or float does not change the count.

    Args:
        proto: an ``onnx.ModelProto`` whose first input is the image.
        input_shape: that input's shape, e.g. ``(1, 1, 224, 224)``.

    Raises:
        ExportError: a counted operator's shapes cannot be inferred at ``input_shape``.
    """
    shapes = _onnx_shapes(proto, input_shape)

    def shape(name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or None in dims:
            raise ExportError(f"the ONNX model's shape of '{name}' at input {list(input_shape)} is unknown")
        return dims

    macs = 0
    for node in proto.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            positions = shape(node.output[0] if node.op_type == "Conv" else node.input[0])
            macs += positions[0] * math.prod(positions[2:]) * math.prod(shape(node.input[1]))
        elif node.op_type in ("Gemm", "MatMul"):
            left = shape(node.input[0])
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            inner = left[0] if node.op_type == "Gemm" and transposed else left[-1]
            macs += math.prod(shape(node.output[0])) * inner
    return macs


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without either)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _eval_on(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode on ``device`` (a copy when it lives elsewhere); restore its mode."""
    device = torch.device(device)
    current = _model_device(model)
    same = current.type == device.type and (device.index is None or current.index == device.index)
    target = model if same else copy.deepcopy(model).to(device)
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward pass of a zero input.

    Args:
        model: the network; it runs where its parameters are.
        input_shape: full input shape including the batch, e.g. ``(1, 1, 224, 224)``.

    Returns:
        ``FlopCounterMode`` total FLOPs // 2; for an :class:`acdc_prune.engine.quantize.OnnxModel`,
        :func:`onnx_macs` of its graph.
    """
    proto = _onnx_proto(model)
    if proto is not None:
        return onnx_macs(proto, input_shape)
    with _eval_on(model, _model_device(model)) as net, torch.no_grad():
        x = torch.zeros(input_shape, device=_model_device(net))
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
    return counter.get_total_flops() // 2


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    repeats: int,
    warmup: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Time eval-mode forward passes of a zero input on ``device``.

    Args:
        model: the network (copied to ``device`` if it lives elsewhere; the original is not moved).
        input_shape: ``(B, C, H, W)``; the reported times are per slice, i.e. divided by ``B``.
        repeats: timed passes (at least 1).
        warmup: untimed passes before timing.
        device: where to run.

    Returns:
        ``median_ms`` and ``iqr_ms`` (per slice), ``repeats``, ``warmup``, ``batch``, ``device`` and,
        on the CPU, ``threads`` (``torch.get_num_threads()``) and ``load_average`` (the system's
        1-minute load average after timing, where the OS has one: above the core count, other
        processes competed for the cores).
    """
    device = torch.device(device)
    batch = input_shape[0]
    times_ms = []
    with _eval_on(model, device) as net, torch.inference_mode():
        x = torch.zeros(input_shape, device=device)
        for _ in range(warmup):
            net(x)
        _synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            _synchronize(device)
            times_ms.append((time.perf_counter() - start) * 1000.0 / batch)
    quartiles = statistics.quantiles(times_ms, n=4, method="inclusive") if repeats > 1 else [times_ms[0]] * 3
    result: dict[str, Any] = {
        "median_ms": statistics.median(times_ms),
        "iqr_ms": quartiles[2] - quartiles[0],
        "repeats": repeats,
        "warmup": warmup,
        "batch": batch,
        "device": str(device),
    }
    if device.type == "cpu":
        # Other processes competing for the cores distort CPU timings; the load shows when they did.
        result["threads"] = torch.get_num_threads()
        if hasattr(os, "getloadavg"):
            result["load_average"] = os.getloadavg()[0]
    return result


class _LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created by operators while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            # Views and in-place results share a storage that is already counted.
            if size == 0 or key in self._sizes:
                continue
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key)
        return out


def _resident_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the model's parameters and buffers plus the input tensor."""
    tensors = (*model.parameters(), *model.buffers(), x)
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_bytes(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> int:
    """Peak memory of one eval-mode, no-grad forward pass (method in the module docstring).

    Args:
        model: the network (copied to ``device`` if it lives elsewhere).
        input_shape: ``(B, C, H, W)`` of the zero input.
        device: ``"cpu"`` or a CUDA device.

    Returns:
        Parameters + buffers + input bytes, plus the peak of tensor bytes allocated during the pass.
    """
    device = torch.device(device)
    with _eval_on(model, device) as net, torch.no_grad():
        x = torch.zeros(input_shape, device=device)
        resident = _resident_bytes(net, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            net(x)
            torch.cuda.synchronize(device)
            return resident + torch.cuda.max_memory_allocated(device) - before
        tracker = _LiveTensorBytes()
        with tracker:
            net(x)
        return resident + tracker.peak


def model_cost(
    model: nn.Module, eval_cfg: EvaluationConfig, in_channels: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Parameters, MACs, CPU latency and peak memory of ``model`` for one slice at ``latency_size``.

    Args:
        model: the network.
        eval_cfg: gives ``latency_size`` (H, W), ``latency_repeats`` and ``latency_warmup``.
        in_channels: input channels of the network.
        device: the evaluation device; on CUDA, latency there and CUDA peak memory are added.

    Returns:
        ``params``, ``macs``, ``input_shape``, ``latency_cpu`` (see :func:`measure_latency`), on CUDA
        ``latency_cuda``, and ``peak_memory`` (``bytes``, ``device``, ``method``).
    """
    device = torch.device(device)
    shape = (1, in_channels, *eval_cfg.latency_size)
    cost: dict[str, Any] = {
        "params": count_parameters(model),
        "macs": count_macs(model, shape),
        "input_shape": list(shape),
        "latency_cpu": measure_latency(
            model, shape, eval_cfg.latency_repeats, eval_cfg.latency_warmup, "cpu"
        ),
    }
    if device.type == "cuda":
        cost["latency_cuda"] = measure_latency(
            model, shape, eval_cfg.latency_repeats, eval_cfg.latency_warmup, device
        )
        method = "torch.cuda.max_memory_allocated during the forward + parameters, buffers and input"
    else:
        method = (
            "tensor storages live during the forward (dispatch-mode tracking) + parameters, buffers and input"
        )
    cost["peak_memory"] = {
        "bytes": peak_memory_bytes(model, shape, device),
        "device": str(device),
        "method": method,
    }
    return cost
