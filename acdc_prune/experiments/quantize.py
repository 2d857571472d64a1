"""Quantize a trained or pruned run to int8 (post-training, or after quantization-aware fine-tuning)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_prune.config import Config, apply_overrides, config_from_dict
from acdc_prune.engine.progress import Reporter
from acdc_prune.errors import ConfigError, ExportError

CHECK_SLICES = 4
"""Calibration slices on which the int8 logits are compared with the float model's."""


@dataclass
class QuantizeResult:
    """What :func:`quantize_run` wrote.

    Attributes:
        path: the int8 ONNX model (``<out>/model.int8.onnx``).
        summary: the content of its ``.json`` summary (calibration, settings, check, source, the
            post-processing choice of the source checkpoint, config).
    """

    path: Path
    summary: dict[str, Any]


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden staging folder that becomes ``out`` only when the block succeeds.

    Args:
        out: the result folder.
        force: replace an existing ``out`` (only once the new one is complete).

    Raises:
        ConfigError: ``out`` exists and ``force`` is not set.
    """
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield staging
        if out.exists():
            retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, retired / out.name)
            shutil.rmtree(retired)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def logit_check(model: nn.Module, quantized: nn.Module, slices: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Compare the int8 model's logits with the float model's on ``slices``.

    Args:
        model: the float network.
        quantized: the int8 model, same input and output.
        slices: inputs ``(1, C_in, H, W)``.

    Returns:
        ``slices``, ``max_abs_logit_deviation`` and ``label_agreement`` (share of pixels whose argmax
        class is the same).

    Raises:
        ExportError: non-finite int8 logits or another output shape.
    """
    worst, agree, pixels = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for x in slices:
            expected, got = model(x), quantized(x)
            if got.shape != expected.shape or not torch.isfinite(got).all():
                raise ExportError(
                    f"the int8 model returns {tuple(got.shape)} or non-finite logits for {tuple(x.shape)}"
                )
            worst = max(worst, float((got - expected).abs().max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            pixels += expected[:, 0].numel()
    return {"slices": len(slices), "max_abs_logit_deviation": worst, "label_agreement": agree / pixels}


def shape_check(quantized: nn.Module, config: Config) -> list[list[int]]:
    """Run the int8 model on other batch and spatial sizes, as the export check does; return the shapes.

    Raises:
        ExportError: it fails or returns another batch or size for one of them.
    """
    from acdc_prune.engine.export import check_shapes
    from acdc_prune.models import total_stride

    shapes = check_shapes(total_stride(config.model), config.model.in_channels, config.data.patch_size)
    for shape in shapes:
        try:
            got = quantized(torch.randn(shape))
        except Exception as err:  # onnxruntime raises its own types
            raise ExportError(f"the int8 model does not run on input {shape}: {err}") from None
        if got.shape[0] != shape[0] or got.shape[2:] != shape[2:]:
            raise ExportError(f"the int8 model returns {tuple(got.shape)} for input {shape}")
    return [list(shape) for shape in shapes]


def qat_finetune(
    model: nn.Module,
    config: Config,
    slices: Sequence[torch.Tensor],
    *,
    epochs: int,
    lr: float | None,
    float_names: Sequence[str],
    run_dir: Path,
    plan: Any,
    reporter: Reporter | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantization-aware fine-tuning with the project's trainer; returns the float network to quantize.

    Convolutions outside ``float_names`` see int8-rounded inputs and weights (straight-through
    gradients); their input ranges start from the calibration slices and follow an EMA. Training
    and validation run in fp32 for ``epochs`` epochs without warm-up at ``lr`` (default a tenth of
    ``training.lr``), validating on the run's validation patients, into ``run_dir``. The weights
    of the best validation epoch are loaded back and the rounding removed.

    Args:
        model: the trained float network (changed in place).
        config: the run's config.
        slices: calibration slices ``(1, C_in, H, W)``.
        epochs: fine-tuning epochs (at least 1).
        lr: peak learning rate, or ``None``.
        float_names: module-path prefixes that stay in float (the output head included).
        run_dir: the fine-tuning run folder (checkpoints load as a plain float run).
        plan: the pruning plan of a pruned network (or ``None``), stored in its checkpoints.
        reporter: receives the trainer's progress.

    Returns:
        The fine-tuned float network and facts for the summary (epochs, lr, best Dice and epoch, folder).
    """
    from acdc_prune.engine.checkpoints import Checkpoint
    from acdc_prune.engine.fake_quant import calibrate_fake_quant, disable_fake_quant, enable_fake_quant
    from acdc_prune.engine.trainer import train

    settings = config.to_dict()
    lr = lr if lr is not None else config.training.lr / 10
    settings["training"].update(epochs=epochs, lr=lr, warmup_epochs=0, precision="fp32", channels_last=False)
    settings["evaluation"].update(precision="fp32", channels_last=False)  # validation sees the int8 rounding
    qat_config = config_from_dict(settings)
    enable_fake_quant(model, float_names)
    calibrate_fake_quant(model, slices)
    try:
        result = train(
            qat_config,
            model=model,
            run_dir=run_dir,
            plan=plan,
            init_checkpoint_epochs=False,
            reporter=reporter,
        )
    finally:
        disable_fake_quant(model)
    model.load_state_dict(Checkpoint.open(run_dir / "best.pt").weights)
    facts = {"epochs": epochs, "lr": lr, "best_dice": result.best_dice, "best_epoch": result.best_epoch}
    return model.cpu().eval(), facts


def _fine_tune(
    model: nn.Module,
    config: Config,
    source: Any,
    slices: list[torch.Tensor],
    staging: Path,
    out: Path,
    keep_float: Sequence[str],
    epochs: int,
    lr: float | None,
    reporter: Reporter | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`qat_finetune` of a checkpoint's network into ``<staging>/qat``, its head kept in float."""
    from acdc_prune.engine.fake_quant import output_conv
    from acdc_prune.models import total_stride

    head = output_conv(model, config.model.in_channels, total_stride(config.model))
    model, facts = qat_finetune(
        model,
        config,
        slices,
        epochs=epochs,
        lr=lr,
        float_names=[head, *keep_float],
        run_dir=staging / "qat",
        plan=source.plan,
        reporter=reporter,
    )
    return model, {**facts, "run_dir": str(out / "qat")}


def default_output(source: Path, qat_epochs: int) -> Path:
    """``<checkpoint folder>/quantized``, or ``.../quantized-qat`` after quantization-aware fine-tuning."""
    return source.parent / ("quantized-qat" if qat_epochs else "quantized")


def _source_facts(model: nn.Module, config: Config, source: Any) -> dict[str, Any]:
    """Where the float model came from and its size, for the summary."""
    from acdc_prune.engine.cost import count_macs, count_parameters
    from acdc_prune.models import total_stride

    stride = total_stride(config.model)
    return {
        "checkpoint": str(source.path),
        "epoch": source.epoch,
        "pruned": source.plan is not None,
        "params": count_parameters(model),
        "macs_224": count_macs(model, (1, config.model.in_channels, 224, 224)),
        "total_stride": stride,
        "input_shape": ["batch", config.model.in_channels, f"{stride}*h", f"{stride}*w"],
        "output_shape": ["batch", config.model.out_channels, f"{stride}*h", f"{stride}*w"],
    }


def _quantize_model(
    model: nn.Module, config: Config, slices: list[torch.Tensor], keep_float: Sequence[str], method: str
) -> tuple[bytes, dict[str, Any]]:
    """Export ``model`` to ONNX, quantize and check it; return the bytes and the quantization facts."""
    import onnxruntime

    from acdc_prune.engine.formats import export_example, export_onnx
    from acdc_prune.engine.quantize import OnnxModel, quantize_onnx
    from acdc_prune.models import total_stride

    stride = total_stride(config.model)
    model.eval()
    float_bytes = export_onnx(model, export_example(config.model.in_channels, stride), stride)
    data, kept = quantize_onnx(float_bytes, slices, keep_float=keep_float, method=method)
    int8 = OnnxModel(data)
    facts = {
        "toolchain": "onnxruntime.quantization.quantize_static, QDQ format",
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor",
        "keep_float": list(keep_float),
        "float_nodes": kept,
        "size_bytes": len(data),
        "float_size_bytes": len(float_bytes),
        "check": logit_check(model, int8, slices[:CHECK_SLICES]),
        "shapes_checked": shape_check(int8, config),
    }
    return data, facts


def quantize_run(
    model_path: str | Path,
    *,
    out: Path | None = None,
    checkpoint: str = "best",
    calibration_slices: int = 128,
    keep_float: Sequence[str] = (),
    method: str = "minmax",
    qat_epochs: int = 0,
    qat_lr: float | None = None,
    force: bool = False,
    overrides: list[str] | None = None,
    reporter: Reporter | None = None,
) -> QuantizeResult:
    """Quantize the model of a run folder, pruned child folder or checkpoint to an int8 ONNX model.

    Writes ``<out>/model.int8.onnx`` and ``<out>/model.int8.onnx.json`` (and, after QAT, the
    fine-tuning run in ``<out>/qat``); ``out`` appears only once everything in it is written.

    Args:
        model_path: a run folder, a pruned child folder or a ``.pt`` checkpoint.
        out: result folder; default :func:`default_output`.
        checkpoint: checkpoint name inside a folder.
        calibration_slices: training slices the activation ranges are calibrated on.
        keep_float: module-path prefixes left in float besides the output head.
        method: calibration method (``minmax``, ``entropy``, ``percentile``).
        qat_epochs: quantization-aware fine-tuning epochs before quantizing; 0 = none.
        qat_lr: their peak learning rate; default a tenth of ``training.lr``.
        force: replace an existing ``out``.
        overrides: dotted overrides of the stored config (e.g. ``data.root=...`` when the data moved).
        reporter: receives the fine-tuning's progress.

    Returns:
        The :class:`QuantizeResult`.

    Raises:
        CheckpointError: no usable checkpoint; ConfigError: bad options, too few calibration slices,
            or ``out`` exists without ``force``; ExportError: onnxruntime is missing or fails.
    """
    from acdc_prune.engine.checkpoints import Checkpoint
    from acdc_prune.engine.quantize import (
        MODEL_FILE,
        check_calibration_count,
        refuse_onnx_model,
        require_quantization_stack,
    )
    from acdc_prune.engine.quantize import calibration_slices as gather
    from acdc_prune.io import atomic_write_bytes, atomic_write_json

    require_quantization_stack()
    check_calibration_count(calibration_slices)
    if qat_epochs < 0:
        raise ConfigError(f"--qat-epochs must be 0 or more, not {qat_epochs}")
    refuse_onnx_model(model_path)
    source = Checkpoint.open(model_path, checkpoint)
    model = source.build_model()
    config = config_from_dict(apply_overrides(source.config.to_dict(), overrides or []))
    out = Path(out) if out is not None else default_output(source.path, qat_epochs)
    with staged_output(out, force) as staging:
        slices, cases = gather(config, calibration_slices)
        summary: dict[str, Any] = {"format": "onnx-int8-qdq", "file": str(out / MODEL_FILE)}
        summary["source"] = _source_facts(model, config, source)
        if qat_epochs:
            model, summary["qat"] = _fine_tune(
                model, config, source, slices, staging, out, keep_float, qat_epochs, qat_lr, reporter
            )
        data, summary["quantization"] = _quantize_model(model, config, slices, keep_float, method)
        summary["calibration"] = {
            "slices": len(slices),
            "method": method,
            "cases": cases,
            "split": "training",
        }
        summary["postprocessing"] = source.state.get("postprocessing", {})
        summary["config"] = config.to_dict()
        atomic_write_bytes(staging / MODEL_FILE, data)
        atomic_write_json(staging / f"{MODEL_FILE}.json", summary)
    return QuantizeResult(path=out / MODEL_FILE, summary=summary)
