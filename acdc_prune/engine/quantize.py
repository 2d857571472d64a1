"""int8 quantization: calibration slices, onnxruntime static QDQ quantization, ONNX models as modules."""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import json
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from acdc_prune.config import Config
from acdc_prune.engine.export import sidecar_path
from acdc_prune.engine.formats import error_reason, needs_export_extra
from acdc_prune.engine.segment import resolve_largest_component
from acdc_prune.errors import CheckpointError, ConfigError, ExportError

MODEL_FILE = "model.int8.onnx"
"""File name of a quantized model in its folder; its summary is ``model.int8.onnx.json`` beside it."""
DEFAULT_CALIBRATION_SLICES = 128
MIN_CALIBRATION_SLICES = 8
SLICES_PER_VOLUME = 4
"""Calibration slices taken from each training volume (more when the volumes are too few)."""
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Relu", "MaxPool", "Concat")
"""ONNX operators given int8 inputs and outputs. ``ConvTranspose`` is left out: onnxruntime's CPU
provider has no int8 kernel for it, so quantizing its weights would add error and no speed."""
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
"""Node metadata in which torch's ONNX exporter records the module path of each node."""


def require_quantization_stack() -> Any:
    """Import onnx and onnxruntime (with its quantization tools).

    Returns:
        The ``onnxruntime`` module.

    Raises:
        ExportError: a package is missing (the message names the extra to install).
    """
    with needs_export_extra("int8 quantization"):
        import onnx  # noqa: F401
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    return onnxruntime


def check_calibration_count(count: int) -> int:
    """Return ``count`` if it is a usable number of calibration slices.

    Raises:
        ConfigError: fewer than :data:`MIN_CALIBRATION_SLICES`.
    """
    if count < MIN_CALIBRATION_SLICES:
        raise ConfigError(
            f"{count} calibration slices are too few to estimate activation ranges; "
            f"give at least {MIN_CALIBRATION_SLICES}, e.g. --calibration-slices {DEFAULT_CALIBRATION_SLICES}"
        )
    return count


def calibration_slices(config: Config, count: int) -> tuple[list[torch.Tensor], list[str]]:
    """Preprocessed slices of the run's training patients (no augmentation), spread over volumes.

    The training volumes of the run's split are visited in a seeded order (``training.seed``), taking
    :data:`SLICES_PER_VOLUME` slices (or ``ceil(count / volumes)`` if more) evenly spaced along Z from
    each, until ``count`` are gathered: 128 slices come from 32 volumes, loaded one at a time. Should
    thin volumes leave the count short, a second pass takes every slice of every volume.

    Args:
        config: the run's config (data, split and model stride).
        count: slices wanted, at least :data:`MIN_CALIBRATION_SLICES`.

    Returns:
        ``count`` tensors ``(1, C_in, H, W)`` (H, W multiples of the total stride, differing between
        volumes) and the names of the cases they come from.

    Raises:
        ConfigError: ``count`` is too small, or the training patients hold fewer slices.
    """
    from acdc_prune.data import VolumeDataset, load_records, split_records
    from acdc_prune.models import total_stride

    check_calibration_count(count)
    train_records = split_records(load_records(config.data, config.cache_dir), config.data)[0]
    order = [
        train_records[int(i)]
        for i in np.random.default_rng(config.training.seed).permutation(len(train_records))
    ]
    lazy = dataclasses.replace(config.data, cache="none") if config.data.cache == "memory" else config.data
    dataset = VolumeDataset(order, lazy, total_stride(config.model), config.cache_dir)
    slices: list[torch.Tensor] = []
    # A second pass takes every slice, in case volumes thinner than the first pass's share fell short.
    for take in (max(SLICES_PER_VOLUME, math.ceil(count / len(order))), math.inf):
        slices, cases = [], []
        for index, record in enumerate(order):
            slices.extend(_spread_slices(dataset[index]["image"], take))
            cases.append(record.image.name)
            if len(slices) >= count:
                return slices[:count], cases
    raise ConfigError(
        f"asked for {count} calibration slices but the {len(order)} training volumes hold only "
        f"{len(slices)}; lower --calibration-slices"
    )


def _spread_slices(volume: torch.Tensor, take: float) -> list[torch.Tensor]:
    """Up to ``take`` slices ``(1, C, H, W)`` evenly spaced along Z of a ``(C, H, W, D)`` volume."""
    image = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
    depth = image.shape[-1]
    chosen = np.unique(np.linspace(0, depth - 1, int(min(take, depth))).round().astype(int))
    return [image[..., int(z)].unsqueeze(0).float().contiguous() for z in chosen]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence onnxruntime.quantization's root-logger advice (pre-processing hints) while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def node_scopes(node: Any) -> list[str]:
    """Module paths (``encoders.0``, ``encoders.0.conv1``...) a node of torch's ONNX export belongs to."""
    for entry in node.metadata_props:
        if entry.key == _NAME_SCOPES:
            return [scope for scope in ast.literal_eval(entry.value) if scope]
    return []


def head_nodes(graph: Any) -> list[str]:
    """Names of the nodes from the output back to the last convolution (the output head), included."""
    producers = {output: node for node in graph.node for output in node.output}
    names, tensor = [], graph.output[0].name
    while tensor in producers:
        node = producers[tensor]
        names.append(node.name)
        if node.op_type in ("Conv", "ConvTranspose") or not node.input:
            break
        tensor = node.input[0]
    return names


def float_nodes(graph: Any, keep_float: Sequence[str]) -> list[str]:
    """Nodes to leave in float: the output head and every node under a module-path prefix of ``keep_float``.

    Args:
        graph: the ONNX graph (torch's exporter records module paths in node metadata).
        keep_float: module-path prefixes such as ``decoders.3`` or ``head``.

    Raises:
        ConfigError: a prefix matches no node (the message lists the top-level modules).
    """
    names = head_nodes(graph)
    for prefix in keep_float:
        matched = [
            node.name
            for node in graph.node
            if any(s == prefix or s.startswith(prefix + ".") for s in node_scopes(node))
        ]
        if not matched:
            tops = sorted({scopes[0] for node in graph.node if (scopes := node_scopes(node))})
            raise ConfigError(
                f"--keep-float '{prefix}' matches no layer of the model; module paths start with "
                f"{', '.join(tops) or '(none recorded)'}"
            )
        names.extend(name for name in matched if name not in names)
    return names


def _calibration_reader(quantization: Any, slices: Sequence[torch.Tensor], input_name: str) -> Any:
    """An onnxruntime ``CalibrationDataReader`` feeding ``slices`` one at a time."""

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([{input_name: s.numpy()} for s in slices])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return Reader()


def quantize_onnx(
    float_model: bytes,
    slices: Sequence[torch.Tensor],
    *,
    keep_float: Sequence[str] = (),
    method: str = "minmax",
) -> tuple[bytes, list[str]]:
    """Quantize an ONNX model to int8 with onnxruntime's static QDQ quantization.

    Weights are int8, symmetric, per output channel; activations uint8, asymmetric, per tensor, with
    ranges calibrated on ``slices``. Operators outside :data:`QUANTIZED_OPS`, the output head and
    the nodes under ``keep_float`` stay in float.

    Args:
        float_model: an ONNX model from :func:`acdc_prune.engine.export.export_onnx`.
        slices: calibration inputs, each ``(1, C_in, H, W)`` float32.
        keep_float: module-path prefixes to leave in float (see :func:`float_nodes`).
        method: ``minmax``, ``entropy`` or ``percentile`` (onnxruntime's ``CalibrationMethod``).

    Returns:
        The quantized model and the names of the nodes left in float.

    Raises:
        ConfigError: unknown method or prefix; ExportError: onnxruntime is missing or fails.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"unknown calibration method '{method}': choose one of {', '.join(CALIBRATION_METHODS)}"
        )
    require_quantization_stack()
    import onnx
    from onnxruntime import quantization

    proto = onnx.load_model_from_string(float_model)
    excluded = float_nodes(proto.graph, keep_float)
    methods = dict(zip(CALIBRATION_METHODS, ("MinMax", "Entropy", "Percentile"), strict=True))
    with tempfile.TemporaryDirectory(prefix="acdc-prune-quantize-") as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(float_model)
        try:
            with _quiet_quantizer():
                quantization.quantize_static(
                    source,
                    target,
                    _calibration_reader(quantization, slices, proto.graph.input[0].name),
                    quant_format=quantization.QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True,
                    activation_type=quantization.QuantType.QUInt8,
                    weight_type=quantization.QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=getattr(quantization.CalibrationMethod, methods[method]),
                )
        except Exception as err:  # the quantizer raises many types; all mean "could not quantize"
            raise ExportError(f"onnxruntime could not quantize the model: {error_reason(err)}") from None
        return target.read_bytes(), excluded


def inference_session(data: bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``data`` on ``threads`` threads (default torch's); idle ones sleep."""
    ort = require_quantization_stack()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An ONNX model (int8 or float) run by onnxruntime's CPU provider, usable wherever a network is.

    Args:
        data: the serialised ONNX model, one input ``(N, C_in, H, W)`` and one output of logits.
        info: the model's summary (the ``.json`` beside its file), kept as :attr:`info`.
        threads: onnxruntime intra-op threads; default ``torch.get_num_threads()``.

    Shapes: input ``(N, C_in, H, W)`` of any dtype and device (any N; H, W multiples of the total
    stride), output ``(N, C, H, W)`` float32 logits on the input's device. There are no parameters:
    ``.to()``, ``.eval()`` and autocast leave the session as it is.
    """

    def __init__(self, data: bytes, info: dict[str, Any] | None = None, threads: int | None = None) -> None:
        super().__init__()
        self.data, self.info, self.threads = data, dict(info or {}), threads
        self.session = inference_session(data, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` of ``x`` ``(N, C_in, H, W)``."""
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModel:
        return OnnxModel(self.data, copy.deepcopy(self.info, memo), self.threads)


def is_onnx_model(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX file or a folder holding a quantized model (and no ``best.pt``)."""
    path = Path(path)
    if path.is_dir():
        return (path / MODEL_FILE).is_file() and not (path / "best.pt").exists()
    return path.suffix == ".onnx"


def refuse_onnx_model(path: str | Path) -> None:
    """Stop with one line when ``path`` is an ONNX model where a PyTorch checkpoint is needed.

    Pruning, training, export and quantization work on the float network; the message names the
    checkpoint the ONNX model came from when its summary records it.

    Raises:
        CheckpointError: ``path`` is an ONNX file or a folder holding :data:`MODEL_FILE`.
    """
    if not is_onnx_model(path):
        return
    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(sidecar_path(file).read_text(encoding="utf-8"))
    source = info.get("source", {}).get("checkpoint") or info.get("checkpoint")
    hint = f"give the checkpoint it came from, {source}" if source else "give the checkpoint it came from"
    raise CheckpointError(f"{path} is an ONNX model, not a PyTorch checkpoint; {hint}")


def _stored_config(info: dict[str, Any], summary: Path) -> Config:
    """The run config of an ONNX model: in its summary, or in the checkpoint the summary names."""
    from acdc_prune.config import config_from_dict
    from acdc_prune.engine.checkpoints import Checkpoint

    if "config" in info:
        try:
            return config_from_dict(info["config"])
        except ConfigError as err:
            raise CheckpointError(f"{summary}: stored config is invalid ({err})") from None
    if "checkpoint" in info:
        return Checkpoint.open(info["checkpoint"]).config
    raise CheckpointError(
        f"{summary} holds neither a config nor a source checkpoint, so the preprocessing is unknown; "
        "write the model with acdc-prune quantize or export"
    )


@dataclasses.dataclass
class OnnxSource:
    """A saved ONNX model (int8 from ``acdc-prune quantize``, or float from ``export``) and its run config.

    Opened like a :class:`acdc_prune.engine.checkpoints.Checkpoint` by evaluate and predict.

    Attributes:
        path: the ``.onnx`` file.
        config: the run's config (preprocessing, stride, evaluation settings).
        info: the model's summary, ``<file>.json``.
    """

    path: Path
    config: Config
    info: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> OnnxSource:
        """Read a ``.onnx`` file with its ``<file>.json`` summary, or a folder holding :data:`MODEL_FILE`.

        Raises:
            CheckpointError: the file or its summary is missing or unreadable.
        """
        from acdc_prune.io import read_json

        path = Path(path)
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"ONNX model {file} does not exist")
        summary = sidecar_path(file)
        info = read_json(summary, "write the model again with acdc-prune quantize (or export)")
        return cls(file, _stored_config(info, summary), info)

    @property
    def run_dir(self) -> Path:
        """The folder of the file: evaluate and predict write their results below it."""
        return self.path.parent

    def largest_component(self, setting: bool | str) -> bool:
        """``evaluation.largest_component`` resolved as
        :meth:`acdc_prune.engine.checkpoints.Checkpoint.largest_component` does.

        Args:
            setting: ``True`` or ``False`` as the user set it, or ``"auto"``: the choice recorded in the
                summary (``postprocessing``, copied from the source checkpoint), off where there is none.
        """
        return resolve_largest_component(setting, self.info.get("postprocessing"))

    def build_model(self) -> OnnxModel:
        """The :class:`OnnxModel` of the file.

        Raises:
            ExportError: onnxruntime is missing; CheckpointError: the file is not a valid ONNX model.
        """
        require_quantization_stack()
        try:
            return OnnxModel(self.path.read_bytes(), self.info)
        except Exception as err:  # onnxruntime raises its own types for unreadable models
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{self.path} is not a valid ONNX model ({first})") from None


def open_source(path: str | Path, name: str = "best") -> Any:
    """Open any saved model: an ONNX file or quantized folder, or an acdc-prune checkpoint or run folder.

    Args:
        path: a ``.onnx`` file, a folder holding :data:`MODEL_FILE`, a ``.pt`` checkpoint or a run folder.
        name: checkpoint inside a run folder (``best``, ``last``...); unused for ONNX models.

    Returns:
        An :class:`OnnxSource` or a :class:`acdc_prune.engine.checkpoints.Checkpoint`: both have
        ``config``, ``run_dir`` and ``build_model()`` (a network ``(B, C_in, H, W) -> (B, C, H, W)``).
    """
    from acdc_prune.engine.checkpoints import Checkpoint

    return OnnxSource.open(path) if is_onnx_model(path) else Checkpoint.open(path, name)
