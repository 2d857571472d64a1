"""int8 quantization: close to float, evaluable like any model, QAT, and one-line refusals."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import config_from_dict
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.fake_quant import (
    calibrate_fake_quant,
    disable_fake_quant,
    enable_fake_quant,
    output_conv,
)
from acdc_prune.engine.formats import export_onnx
from acdc_prune.engine.quantize import MODEL_FILE, OnnxModel, calibration_slices, open_source, quantize_onnx
from acdc_prune.engine.trainer import train
from acdc_prune.errors import ConfigError, ExportError
from acdc_prune.experiments.evaluation import evaluate_folder
from acdc_prune.experiments.predict import predict_folder
from acdc_prune.experiments.quantize import quantize_run
from acdc_prune.models import build_model
from acdc_prune.pruning import randomise_norm_statistics

runner = CliRunner()
TINY = {"features": [4, 8], "bottleneck": 8}
# int8 logits of the tiny random U-Net stay within 5% of the float logits' range, and the argmax
# label of at least 98% of the pixels is unchanged (measured: about 0.2% and 100%).
RELATIVE_TOLERANCE = 0.05
MIN_AGREEMENT = 0.98


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the test machine has 2 cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model():
    torch.manual_seed(0)
    return randomise_norm_statistics(build_model(config_from_dict({"model": TINY}).model)).eval()


def _slices(count, size=(16, 24), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, *size, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny_int8():
    """The tiny U-Net (stride 4) and its int8 ONNX model calibrated on 8 random slices."""
    model = _tiny_model()
    data, kept = quantize_onnx(export_onnx(model, torch.randn(2, 1, 12, 16), 4), _slices(8))
    return model, data, kept


@pytest.mark.parametrize("shape", [(1, 1, 16, 24), (5, 1, 36, 12)])
def test_int8_logits_are_close_to_float_at_any_batch_and_size(tiny_int8, shape):
    model, data, kept = tiny_int8
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    got = OnnxModel(data)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    span = float(expected.max() - expected.min())
    assert float((got - expected).abs().max()) <= RELATIVE_TOLERANCE * span
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= MIN_AGREEMENT
    assert kept == ["node_conv2d_10"]  # the output head stays in float


def test_onnx_model_takes_other_dtypes_and_survives_a_deep_copy(tiny_int8):
    import copy

    _, data, _ = tiny_int8
    module = OnnxModel(data)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(copy.deepcopy(module)(x), module(x))
    torch.testing.assert_close(module(x.to(torch.bfloat16)), module(x.to(torch.bfloat16).float()))
    assert list(module.parameters()) == []


def test_keep_float_prefixes_and_unknown_ones():
    model = _tiny_model()
    exported = export_onnx(model, torch.randn(2, 1, 12, 16), 4)
    _, kept = quantize_onnx(exported, _slices(8), keep_float=["decoders.0"])
    assert "node_conv2d_10" in kept and len(kept) > 3
    with pytest.raises(ConfigError, match="'decoder.0' matches no layer.*decoders.0"):
        quantize_onnx(exported, _slices(8), keep_float=["decoder.0"])
    with pytest.raises(ConfigError, match="unknown calibration method"):
        quantize_onnx(exported, _slices(8), method="mse")


def test_fake_quant_keeps_state_dict_keys_trains_and_matches_int8(tiny_int8):
    model, data, _ = tiny_int8
    model = _tiny_model()
    keys = list(model.state_dict())
    assert output_conv(model, 1, 4) == "head"
    changed = enable_fake_quant(model, ["head"])
    assert "head" not in changed and "encoders.0.conv1.conv" in changed
    assert list(model.state_dict()) == keys
    calibrate_fake_quant(model, _slices(8))
    x = torch.randn(2, 1, 16, 24)
    with torch.no_grad():
        simulated = model(x)
    assert float((simulated - OnnxModel(data)(x)).abs().max()) < 0.05 * float(simulated.abs().max())
    model.train()
    model(x).sum().backward()
    assert model.encoders[0].conv1.conv.weight.grad.abs().sum() > 0
    disable_fake_quant(model)
    assert type(model.encoders[0].conv1.conv) is torch.nn.Conv2d


def test_missing_onnxruntime_names_the_extra(monkeypatch, tiny_int8):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(
        ExportError, match=r"'onnxruntime', not installed: pip install 'acdc-prune\[export\]'"
    ):
        OnnxModel(tiny_int8[1])


def tiny_run_config(root, phantom):
    """The tiny phantom, 64x64 crops at 3 mm, a 2-level U-Net of widths 4-8, one short epoch."""
    return config_from_dict(
        {
            "data": {
                "root": str(phantom),
                "cache": "none",
                "target_spacing": [3.0, 3.0],
                "patch_size": [64, 64],
            },
            "model": TINY,
            "training": {
                "epochs": 2,
                "batch_size": 4,
                "iterations_per_epoch": 3,
                "lr": 3e-3,
                "num_threads": 1,
            },
            "evaluation": {"batch_size": 8, "overlays": 0, "latency_repeats": 2, "latency_warmup": 1},
            "logging": {
                "runs_dir": str(root / "runs"),
                "experiment": "q",
                "progress": False,
                "tensorboard": False,
            },
        }
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_phantom):
    """A trained tiny run folder (best.pt) on the tiny phantom."""
    root = tmp_path_factory.mktemp("quantize")
    return train(tiny_run_config(root, tiny_phantom), run_dir=root / "run").run_dir


@pytest.fixture(scope="module")
def quantized(trained_run):
    """The run quantized into its default folder, on 8 calibration slices."""
    return quantize_run(trained_run, calibration_slices=8)


@pytest.mark.slow
def test_quantize_writes_the_model_and_its_summary(trained_run, quantized):
    assert quantized.path == trained_run / "quantized" / MODEL_FILE
    summary = json.loads((trained_run / "quantized" / f"{MODEL_FILE}.json").read_text())
    assert summary["calibration"]["slices"] == 8 and summary["calibration"]["split"] == "training"
    assert summary["source"]["checkpoint"] == str(trained_run / "best.pt")
    assert summary["config"]["model"]["features"] == TINY["features"]
    check = summary["quantization"]["check"]
    assert check["label_agreement"] >= MIN_AGREEMENT and check["max_abs_logit_deviation"] < 1.0
    assert sorted(p.name for p in (trained_run / "quantized").iterdir()) == [MODEL_FILE, f"{MODEL_FILE}.json"]


@pytest.mark.slow
def test_evaluate_and_predict_take_the_quantized_folder(trained_run, quantized, tiny_phantom, tmp_path):
    float_result = evaluate_folder(trained_run, None, out=tmp_path / "float")
    int8_result = evaluate_folder(quantized.path.parent, None, out=tmp_path / "int8")
    float_dice, int8_dice = (r.summary["mean_dice"] for r in (float_result, int8_result))
    assert abs(float_dice - int8_dice) < 0.05
    assert isinstance(open_source(quantized.path).build_model(), OnnxModel)
    written = predict_folder(quantized.path, tiny_phantom, out=tmp_path / "labels")
    assert len(list(written.glob("*.nii.gz"))) == 10


@pytest.mark.slow
def test_too_few_calibration_slices_is_one_line_and_writes_nothing(trained_run, tmp_path):
    with pytest.raises(ConfigError, match="4 calibration slices are too few.*at least 8"):
        quantize_run(trained_run, calibration_slices=4, out=tmp_path / "q")
    with pytest.raises(ConfigError, match="asked for 100000 calibration slices but the .* hold only"):
        quantize_run(trained_run, calibration_slices=100_000, out=tmp_path / "q")
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []
    config = Checkpoint.open(trained_run).config
    slices, cases = calibration_slices(config, 9)
    assert len(slices) == 9 and all(s.shape[:2] == (1, 1) and s.shape[2] % 4 == 0 for s in slices)
    assert cases


@pytest.mark.slow
def test_cli_quantize_end_to_end(trained_run, tmp_path):
    out = tmp_path / "int8"
    args = [
        "quantize",
        str(trained_run),
        "--out",
        str(out),
        "--calibration-slices",
        "8",
        "--keep-float",
        "decoders.0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Label agreement" in result.output and (out / MODEL_FILE).is_file()
    assert json.loads((out / f"{MODEL_FILE}.json").read_text())["quantization"]["keep_float"] == [
        "decoders.0"
    ]
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    assert len(again.output.strip().splitlines()) == 1
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    twice = runner.invoke(app, ["quantize", str(out), "--out", str(tmp_path / "twice")])
    assert twice.exit_code == 2 and "is an ONNX model, not a PyTorch checkpoint" in twice.output
    assert str(trained_run / "best.pt") in twice.output and not (tmp_path / "twice").exists()
    evaluated = runner.invoke(app, ["evaluate", str(out / MODEL_FILE), "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "eval" / "summary.json").is_file()


@pytest.mark.slow
def test_qat_fine_tunes_then_quantizes(trained_run, tmp_path):
    result = quantize_run(trained_run, calibration_slices=8, qat_epochs=1, out=tmp_path / "qat-int8")
    qat = result.summary["qat"]
    assert qat["epochs"] == 1 and qat["lr"] == pytest.approx(3e-4)
    fine_tuned = Checkpoint.open(tmp_path / "qat-int8" / "qat")
    assert fine_tuned.epoch == 1
    assert fine_tuned.config.training.precision == fine_tuned.config.evaluation.precision == "fp32"
    fine_tuned.build_model()  # a plain float checkpoint of the same network
    assert (
        result.path.is_file() and result.summary["quantization"]["check"]["label_agreement"] >= MIN_AGREEMENT
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prune", "export", "inspect"])
def test_a_quantized_model_given_to_prune_export_or_inspect_is_one_line(trained_run, quantized, command):
    from typer.testing import CliRunner

    from acdc_prune.cli import app

    extra = ["--target-macs", "0.5"] if command == "prune" else []
    result = CliRunner().invoke(app, [command, str(quantized.path.parent), *extra])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "is an ONNX model, not a PyTorch checkpoint; give the checkpoint it came from" in line
    assert str(trained_run / "best.pt") in line
