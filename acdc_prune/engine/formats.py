"""Serialise a network to ONNX, TorchScript or a torch.export program, and load each back to run it."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from acdc_prune.errors import ExportError

OPSET = 18
"""Default ONNX opset: the one torch's ONNX functions are written in (no version conversion), run by
onnxruntime 1.14 and later."""
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXTRA_HINT = "pip install 'acdc-prune[export]'"


@contextlib.contextmanager
def needs_export_extra(purpose: str) -> Iterator[None]:
    """Turn an ``ImportError`` raised inside into an :class:`ExportError` naming the package and the extra.

    Args:
        purpose: what needs the packages imported inside, e.g. ``"ONNX export"``.

    Raises:
        ExportError: a package imported inside is not installed.
    """
    try:
        yield
    except ImportError as err:
        raise ExportError(f"{purpose} needs the package '{err.name}', not installed: {EXTRA_HINT}") from None


def require_onnx_stack() -> Any:
    """Import what ONNX export needs (onnx, onnxscript for torch's exporter, onnxruntime for the check).

    Returns:
        The ``onnxruntime`` module.

    Raises:
        ExportError: one of them is not installed (the message says how to install them).
    """
    with needs_export_extra("ONNX export"):
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    return onnxruntime


def error_reason(err: Exception) -> str:
    """The first non-empty line of an exception's message, with its type."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' warnings and logs: tracer notes on shape tests, deprecations, and
    torch.onnx listing torchvision operators it skips. The check against eager output is what counts."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_example(in_channels: int, stride: int) -> torch.Tensor:
    """The seeded ``(2, C_in, 3 * stride, 4 * stride)`` input every export is traced on.

    Its batch and its two sides (in strides) differ from each other and from 1, so that no
    dimension of the export is specialised to its example value.
    """
    return torch.randn(2, in_channels, 3 * stride, 4 * stride, generator=torch.Generator().manual_seed(0))


def dynamic_shapes(stride: int) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes of a ``(B, C, H, W)`` input: any batch, H and W multiples of ``stride``.

    Args:
        stride: the network's total stride (:func:`acdc_prune.models.total_stride`).

    Returns:
        A one-element tuple (the model's single positional input) mapping dims 0, 2 and 3 to
        ``Dim("batch")``, ``stride * Dim("h")`` and ``stride * Dim("w")``.
    """
    batch, height, width = (torch.export.Dim(name, min=1) for name in ("batch", "h", "w"))
    return ({0: batch, 2: stride * height, 3: stride * width},)


def export_onnx(model: nn.Module, example: torch.Tensor, stride: int, opset: int = OPSET) -> bytes:
    """Serialise ``model`` to ONNX with torch's torch.export-based exporter (``dynamo=True``).

    Args:
        model: eval-mode network ``(B, C_in, H, W) -> (B, C_out, H, W)``.
        example: a ``(B, C_in, H, W)`` example input with B >= 2 and distinct H / stride, W / stride
            >= 2, so that no dimension is specialised to its example value (:func:`export_example`).
        stride: H and W of the exported model are ``stride * h`` and ``stride * w``.
        opset: ONNX operator set version.

    Returns:
        The ONNX model (weights included) with input ``image`` and output ``logits`` whose batch, H
        and W are symbolic (``batch``, ``<stride>*h``, ``<stride>*w``).

    Raises:
        ExportError: the model cannot be exported (the message gives torch's reason).
    """
    require_onnx_stack()
    try:
        with quiet_exporters():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(stride),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                verbose=False,
            )
            return program.model_proto.SerializeToString()
    except Exception as err:  # torch.export and the ONNX translator raise many types; all mean "cannot"
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {error_reason(err)}") from None


def export_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    """Serialise ``model`` with ``torch.jit.trace`` and ``torch.jit.save``.

    Tracing records the operations run on ``example``; convolutions generalise to other batch and
    spatial sizes, while Python tests on shapes are frozen to their outcome on ``example`` (true for
    every input whose H and W are multiples of the total stride, like the example).

    Args:
        model: eval-mode network ``(B, C_in, H, W) -> (B, C_out, H, W)``.
        example: ``(B, C_in, H, W)`` input with H and W multiples of the total stride.

    Raises:
        ExportError: tracing or saving failed.
    """
    buffer = io.BytesIO()
    try:
        with quiet_exporters(), torch.no_grad():
            torch.jit.save(torch.jit.trace(model, (example,), check_trace=False), buffer)
    except Exception as err:  # the tracer raises many types; all mean "cannot be traced"
        raise ExportError(
            f"cannot trace {type(model).__name__} to TorchScript: {error_reason(err)}"
        ) from None
    return buffer.getvalue()


def export_program(model: nn.Module, example: torch.Tensor, stride: int) -> bytes:
    """Serialise ``model`` with ``torch.export.export`` (dynamic batch, H, W) and ``torch.export.save``.

    Args:
        model: eval-mode network ``(B, C_in, H, W) -> (B, C_out, H, W)``.
        example: as for :func:`export_onnx`.
        stride: H and W of the program are ``stride * h`` and ``stride * w``.

    Returns:
        The ``.pt2`` archive.

    Raises:
        ExportError: torch.export refused the model (the message gives its reason).
    """
    buffer = io.BytesIO()
    try:
        with quiet_exporters():
            torch.export.save(
                torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(stride)), buffer
            )
    except Exception as err:  # torch.export raises many types; all mean "cannot be exported"
        raise ExportError(
            f"cannot export {type(model).__name__} with torch.export: {error_reason(err)}"
        ) from None
    return buffer.getvalue()


def onnx_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the serialised ONNX model on onnxruntime's CPU provider, tensor in, tensor out."""
    session = require_onnx_stack().InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def torchscript_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The TorchScript module ``torch.jit.load`` reads from ``data``."""
    with quiet_exporters():
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def program_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module of the program ``torch.export.load`` reads from ``data``."""
    with quiet_exporters():
        return torch.export.load(io.BytesIO(data)).module()


RUNNERS: dict[str, Callable[[bytes], Callable[[torch.Tensor], torch.Tensor]]] = {
    "onnx": onnx_runner,
    "torchscript": torchscript_runner,
    "exported": program_runner,
}
"""For each format: a function turning the serialised bytes into a runnable ``(B, C_in, H, W)`` model."""
