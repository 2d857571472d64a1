"""Export a network to a file (ONNX, TorchScript, torch.export or weights alone), checked against PyTorch."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_prune.engine.formats import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    RUNNERS,
    error_reason,
    export_example,
    export_onnx,
    export_program,
    export_torchscript,
)
from acdc_prune.errors import ConfigError, ExportError, Hint
from acdc_prune.io import atomic_write_bytes, atomic_write_json

SUFFIXES: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "exported": ".pt2",
    "weights": ".pt",
}
"""File suffix of each export format: :func:`export_model` writes the first three, :func:`export_weights`
the last (a checkpoint without training state, as the MONAI bundle ships)."""
TOLERANCE = 1e-4
"""Largest absolute difference from eager PyTorch, over every logit of every check input, accepted."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        format: ``onnx``, ``torchscript`` or ``exported``.
        path: the exported file.
        size_bytes: its size.
        max_deviation: largest absolute logit difference from eager PyTorch over every check input.
        checks: one entry per check input: ``input_shape`` and its ``max_abs_deviation``.
        total_stride: H and W of an input must be multiples of it.
        input_shape: the accepted input shape, e.g. ``["batch", 1, "32*h", "32*w"]``.
        output_shape: the output shape in the same symbols, e.g. ``["batch", 4, "32*h", "32*w"]``.
        details: format-specific facts (exporter, opset, runtime and torch versions, source checkpoint).
    """

    format: str
    path: Path
    size_bytes: int
    max_deviation: float
    checks: list[dict[str, Any]]
    total_stride: int
    input_shape: list[int | str]
    output_shape: list[int | str]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def json_path(self) -> Path:
        """The JSON file written beside the export: ``<file>.json``."""
        return sidecar_path(self.path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the content of :attr:`json_path`)."""
        return {
            "format": self.format,
            "file": str(self.path),
            "size_bytes": self.size_bytes,
            "max_abs_deviation": self.max_deviation,
            "tolerance": TOLERANCE,
            "checks": self.checks,
            "total_stride": self.total_stride,
            "input_shape": self.input_shape,
            "output_shape": self.output_shape,
            **self.details,
        }


def sidecar_path(path: Path) -> Path:
    """``<path>.json``: where the export's summary goes."""
    return path.with_name(path.name + ".json")


def check_format(fmt: str) -> str:
    """Return ``fmt`` if it is an export format.

    Raises:
        ConfigError: unknown format (the message lists the formats).
    """
    if fmt not in SUFFIXES:
        raise ConfigError(f"unknown export format '{fmt}': choose one of {', '.join(SUFFIXES)}")
    return fmt


def default_export_path(checkpoint: Path, fmt: str) -> Path:
    """``<checkpoint folder>/export/<checkpoint stem><suffix>``, e.g. ``run/export/best.onnx``."""
    return checkpoint.parent / "export" / f"{checkpoint.stem}{SUFFIXES[check_format(fmt)]}"


def check_shapes(stride: int, in_channels: int, size: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The inputs an export is checked on: three batch sizes, three spatial sizes.

    Args:
        stride: the network's total stride.
        in_channels: input channels.
        size: a realistic slice size (H, W), e.g. the training patch; rounded up to the stride.

    Returns:
        ``(1, C, H, W)`` at ``size``, ``(3, C, 2s, 3s)`` and ``(2, C, 3s, 2s)``.
    """
    height, width = (math.ceil(side / stride) * stride for side in size)
    return [
        (1, in_channels, height, width),
        (3, in_channels, 2 * stride, 3 * stride),
        (2, in_channels, 3 * stride, 2 * stride),
    ]


def deviations(
    model: nn.Module,
    candidate: Callable[[torch.Tensor], torch.Tensor],
    shapes: Sequence[tuple[int, ...]],
    seed: int = 0,
) -> list[float]:
    """Largest absolute difference between ``candidate`` and eval-mode ``model`` on random inputs.

    Args:
        model: the eager reference ``(B, C_in, H, W) -> (B, C_out, H, W)``.
        candidate: the exported model as a function of the same input.
        shapes: input shapes, one standard-normal input each.
        seed: seed of the inputs.

    Returns:
        One maximum per shape (NaN or inf when an output is not finite).

    Raises:
        ExportError: ``candidate`` returns another shape than ``model`` for some input.
    """
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    result = []
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, generator=generator)
            got, expected = candidate(x), model(x)
            if got.shape != expected.shape:
                raise ExportError(
                    f"for input {tuple(shape)} the export returns {tuple(got.shape)}, "
                    f"PyTorch {tuple(expected.shape)}"
                )
            result.append(float((got - expected).abs().max()))
    return result


def refuse_existing(path: Path, force: bool) -> None:
    """Raise :class:`ExportError` when ``path`` or its ``.json`` exists and ``force`` is not set."""
    for candidate in (path, sidecar_path(path)):
        if candidate.is_dir():
            raise ExportError(f"{candidate} is a folder; give a file name", Hint("out"))
        if candidate.exists() and not force:
            raise ExportError(f"{candidate} already exists", Hint("force"))


def _serialise(fmt: str, model: nn.Module, example: torch.Tensor, stride: int, opset: int) -> bytes:
    """The exported model in format ``fmt`` as bytes."""
    if fmt == "onnx":
        return export_onnx(model, example, stride, opset)
    if fmt == "torchscript":
        return export_torchscript(model, example)
    return export_program(model, example, stride)


def _format_details(fmt: str, opset: int) -> dict[str, Any]:
    """Exporter and runtime versions of an export in format ``fmt``."""
    details: dict[str, Any] = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnxruntime

        details.update(
            exporter="torch.onnx.export(dynamo=True)",
            opset=opset,
            onnxruntime=onnxruntime.__version__,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
        )
    elif fmt == "torchscript":
        details["exporter"] = "torch.jit.trace"
    else:
        details["exporter"] = "torch.export.export"
    return details


def _export_result(
    fmt: str,
    model: nn.Module,
    out: Path,
    data: bytes,
    shapes: Sequence[tuple[int, ...]],
    found: Sequence[float],
    stride: int,
    in_channels: int,
    details: dict[str, Any],
) -> ExportResult:
    """The :class:`ExportResult` of ``data`` (the bytes to write to ``out``) checked on ``shapes``."""
    with torch.no_grad():
        out_channels = model(torch.zeros(1, in_channels, stride, stride)).shape[1]
    symbols = ["batch", f"{stride}*h", f"{stride}*w"]
    return ExportResult(
        format=fmt,
        path=out,
        size_bytes=len(data),
        max_deviation=max(found),
        checks=[
            {"input_shape": list(shape), "max_abs_deviation": value}
            for shape, value in zip(shapes, found, strict=True)
        ],
        total_stride=stride,
        input_shape=[symbols[0], in_channels, *symbols[1:]],
        output_shape=[symbols[0], out_channels, *symbols[1:]],
        details=details,
    )


def export_model(
    model: nn.Module,
    fmt: str,
    out: Path,
    *,
    stride: int,
    in_channels: int,
    check_size: Sequence[int],
    force: bool = False,
    opset: int = OPSET,
    source: Path | None = None,
) -> ExportResult:
    """Export ``model``, check it against eager PyTorch, and write it and ``<out>.json`` atomically.

    The model is exported in eval mode from a ``(2, C_in, 3s, 4s)`` example, reloaded from the exact
    bytes that will be written (onnxruntime, ``torch.jit.load`` or ``torch.export.load``), and run on
    the inputs of :func:`check_shapes`. Nothing is written unless every logit is within
    :data:`TOLERANCE` of eager PyTorch.

    Args:
        model: network ``(B, C_in, H, W) -> (B, C_out, H, W)`` for H, W multiples of ``stride``; it
            is put in eval mode.
        fmt: ``onnx``, ``torchscript`` or ``exported``.
        out: the file to write.
        stride: the network's total stride.
        in_channels: ``C_in``.
        check_size: (H, W) of the largest check input (rounded up to the stride).
        force: replace ``out`` and ``<out>.json`` if they exist.
        opset: ONNX opset (``onnx`` only).
        source: the checkpoint the model came from, recorded in the JSON.

    Returns:
        The :class:`ExportResult`.

    Raises:
        ConfigError: unknown format.
        ExportError: ``out`` exists without ``force``, a dependency is missing, the model cannot be
            exported, or the export deviates from PyTorch by :data:`TOLERANCE` or more.
    """
    check_format(fmt)
    out = Path(out)
    refuse_existing(out, force)
    model.eval()
    data = _serialise(fmt, model, export_example(in_channels, stride), stride, opset)
    shapes = check_shapes(stride, in_channels, check_size)
    try:
        found = deviations(model, RUNNERS[fmt](data), shapes)
    except ExportError:
        raise
    except Exception as err:  # runtimes raise many types; all mean the exported file does not run
        raise ExportError(
            f"the {fmt} export of {type(model).__name__} does not run: {error_reason(err)}"
        ) from None
    worst = math.nan if any(math.isnan(value) for value in found) else max(found)
    if not worst < TOLERANCE:
        raise ExportError(
            f"the {fmt} export of {type(model).__name__} deviates from PyTorch by {worst:.3g} "
            f"(tolerance {TOLERANCE:g}); nothing written"
        )
    details = {**_format_details(fmt, opset), **({"checkpoint": str(source)} if source else {})}
    result = _export_result(fmt, model, out, data, shapes, found, stride, in_channels, details)
    atomic_write_bytes(out, data)
    atomic_write_json(result.json_path, result.to_dict())
    return result


def export_checkpoint(
    path_or_run_dir: str | Path,
    fmt: str,
    *,
    checkpoint: str = "best",
    out: Path | None = None,
    force: bool = False,
    opset: int = OPSET,
) -> ExportResult:
    """Export the model saved in a run folder, pruned child folder or checkpoint file.

    Args:
        path_or_run_dir: a ``.pt`` checkpoint or a folder holding ``<checkpoint>.pt``.
        fmt: ``onnx``, ``torchscript`` or ``exported``.
        checkpoint: checkpoint name inside a folder (``best``, ``last``, ``epoch5``...).
        out: the file to write; default :func:`default_export_path`. An existing folder receives the
            default file name.
        force: replace an existing file.
        opset: ONNX opset (``onnx`` only).

    Returns:
        The :class:`ExportResult`; inputs are ``(B, model.in_channels, H, W)`` with H, W multiples of
        the network's total stride, checked at the run's training patch size among others.

    Raises:
        CheckpointError: no checkpoint there, or not one of ours.
        ConfigError, ExportError: as for :func:`export_model`.
    """
    from acdc_prune.engine.checkpoints import Checkpoint
    from acdc_prune.models import total_stride

    opened = Checkpoint.open(path_or_run_dir, checkpoint)
    source = opened.path
    target = default_export_path(source, fmt)
    if out is not None:
        target = Path(out) / target.name if Path(out).is_dir() else Path(out)
    if check_format(fmt) == "weights":
        return export_weights(source, target, force=force)
    config = opened.config
    return export_model(
        opened.build_model(),
        fmt,
        target,
        stride=total_stride(config.model),
        in_channels=config.model.in_channels,
        check_size=config.data.patch_size,
        force=force,
        opset=opset,
        source=source,
    )


INFERENCE_STATE = ("best_dice", "best_epoch", "postprocessing")
"""Checkpoint entries a weights export keeps: what the model scored, and the post-processing the
validation patients chose for it (``evaluation.largest_component: auto`` reads it)."""


def export_weights(source: Path, out: Path, *, force: bool = False) -> ExportResult:
    """Write a checkpoint's network alone: weights, config, pruning plan and :data:`INFERENCE_STATE`,
    without training state.

    The result is an acdc-prune checkpoint (``Checkpoint.open``, ``acdc-prune evaluate`` and MONAI's
    ``CheckpointLoader`` with ``load_dict={"model": net}`` read it) about a third the size of a
    training checkpoint, which also holds the optimiser's moments. A pruned network's plan is also
    written as ``plan.json`` beside it, for reading. The network rebuilt from the exact bytes to be
    written must reproduce the source's logits exactly.

    Args:
        source: an acdc-prune checkpoint file.
        out: the ``.pt`` file to write.
        force: replace ``out``, its ``.json`` and ``plan.json`` if they exist.

    Returns:
        The :class:`ExportResult` (deviation 0 when the weights round-trip).

    Raises:
        CheckpointError: ``source`` is not an acdc-prune checkpoint.
        ExportError: an output exists without ``force``, or the rebuilt network differs.
    """
    from acdc_prune.engine.checkpoints import Checkpoint
    from acdc_prune.models import total_stride

    out = Path(out)
    refuse_existing(out, force)
    plan_file = out.with_name("plan.json")
    stored = Checkpoint.open(source)
    if stored.plan is not None:
        refuse_existing(plan_file, force)
    kept = {key: stored.state[key] for key in INFERENCE_STATE if key in stored.state}
    slim = Checkpoint(stored.config, stored.weights, stored.epoch, stored.plan, kept)
    with tempfile.TemporaryDirectory() as scratch:
        data = slim.save(Path(scratch) / out.name).read_bytes()
        reloaded = Checkpoint.open(Path(scratch) / out.name).build_model()
    config = stored.config
    model = stored.build_model()
    stride = total_stride(config.model)
    shapes = check_shapes(stride, config.model.in_channels, config.data.patch_size)
    found = deviations(model, reloaded.eval(), shapes)
    if max(found) != 0.0:
        raise ExportError(f"the network rebuilt from {out.name} differs from {source} by {max(found):.3g}")
    details = {
        "exporter": "acdc-prune weights-only checkpoint",
        "torch": torch.__version__,
        "checkpoint": str(source),
        "epoch": stored.epoch,
    }
    result = _export_result(
        "weights", model, out, data, shapes, found, stride, config.model.in_channels, details
    )
    atomic_write_bytes(out, data)
    if stored.plan is not None:
        stored.plan.save(plan_file)
    atomic_write_json(result.json_path, result.to_dict())
    return result
