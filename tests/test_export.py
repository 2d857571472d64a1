"""Export to ONNX, TorchScript and torch.export: reloaded files equal eager PyTorch, refusals are one line."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import config_from_dict
from acdc_prune.engine.checkpoints import Checkpoint, load_model
from acdc_prune.engine.export import export_checkpoint, export_model
from acdc_prune.errors import ExportError
from acdc_prune.models import build_model
from acdc_prune.pruning import PruningPlan, apply_plan, plan_pruning, randomise_norm_statistics

runner = CliRunner()
# Two batch sizes x two spatial sizes, H and W multiples of the tiny U-Net's stride (4), none of them
# the export's example shape.
SHAPES = [(1, 1, 16, 24), (5, 1, 16, 24), (1, 1, 36, 12), (5, 1, 36, 12)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the test machine has 2 cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A baseline run folder (tiny U-Net, widths 4-8, bottleneck 8) and its 50% pruned child folder."""
    root = tmp_path_factory.mktemp("export")
    config = config_from_dict(
        {"model": {"features": [4, 8], "bottleneck": 8}, "data": {"patch_size": [20, 28]}}
    )
    torch.manual_seed(0)
    model = randomise_norm_statistics(build_model(config.model)).eval()
    Checkpoint.of(model, config, epoch=2).save(root / "run" / "best.pt")
    plan = plan_pruning(model, torch.randn(1, 1, 16, 16), ratios={"default": 0.5})
    pruned = apply_plan(model, plan)
    pruned_dir = root / "run" / "pruned" / "none-1"
    Checkpoint.of(pruned, config, epoch=1, plan=plan).save(pruned_dir / "best.pt")
    return {"baseline": root / "run", "pruned": pruned_dir}


def _eager(folder, x):
    model = load_model(folder)[0].eval()
    with torch.no_grad():
        return model(x)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


@pytest.fixture(scope="module")
def onnx_exports(runs):
    """The ONNX export of each run, at its default place."""
    return {which: export_checkpoint(folder, "onnx") for which, folder in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["baseline", "pruned"])
def test_onnx_runs_in_onnxruntime_at_other_batch_and_spatial_sizes(runs, onnx_exports, which):
    import onnxruntime

    result = onnx_exports[which]
    assert result.path == runs[which] / "export" / "best.onnx"
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape == ["batch", 1, "4*h", "4*w"]
    for x in _inputs():
        (logits,) = session.run(None, {"image": x.numpy()})
        assert logits.shape == (x.shape[0], 4, *x.shape[2:])
        assert np.abs(logits - _eager(runs[which], x).numpy()).max() < 1e-4
    summary = json.loads(result.json_path.read_text())
    assert summary["file"] == str(result.path) and summary["opset"] == 18
    assert summary["size_bytes"] == result.path.stat().st_size
    assert summary["max_abs_deviation"] == max(c["max_abs_deviation"] for c in summary["checks"]) < 1e-4
    assert summary["checks"][0]["input_shape"] == [1, 1, 20, 28]


@pytest.mark.slow
def test_pruned_onnx_file_is_smaller(onnx_exports):
    assert onnx_exports["pruned"].size_bytes < onnx_exports["baseline"].size_bytes


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_reloaded_torchscript_and_exported_programs_equal_eager(runs, tmp_path, fmt):
    result = export_checkpoint(runs["pruned"], fmt, out=tmp_path)
    if fmt == "torchscript":
        assert result.path == tmp_path / "best.torchscript.pt"
        loaded = torch.jit.load(str(result.path))
    else:
        assert result.path == tmp_path / "best.pt2"
        loaded = torch.export.load(result.path).module()
    for x in _inputs():
        with torch.no_grad():
            assert torch.allclose(loaded(x), _eager(runs["pruned"], x), rtol=0, atol=1e-5)


class BatchScaled(nn.Module):
    """Scales by the batch size through a Python float: tracing freezes it to the example's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * float(x.shape[0])


def test_an_export_that_deviates_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match=r"torchscript export of BatchScaled deviates .* nothing written"):
        export_model(
            BatchScaled(), "torchscript", tmp_path / "m.pt", stride=1, in_channels=1, check_size=(8, 8)
        )
    assert list(tmp_path.iterdir()) == []


class BatchReshaped(nn.Module):
    """Reshapes by the batch size through a Python int: the trace keeps the example's batch of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(int(x.shape[0]), -1, *x.shape[2:])


def test_an_export_with_other_output_shapes_writes_nothing(tmp_path):
    with pytest.raises(
        ExportError, match=r"for input \(1, 1, 8, 8\) the export returns \(2, 2, 8, 8\), PyTorch"
    ):
        export_model(
            BatchReshaped(), "torchscript", tmp_path / "m.pt", stride=1, in_channels=1, check_size=(8, 8)
        )
    assert list(tmp_path.iterdir()) == []


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_a_model_torch_export_refuses_is_a_one_line_error(tmp_path):
    with pytest.raises(ExportError) as info:
        export_model(
            DataDependent(), "exported", tmp_path / "m.pt2", stride=1, in_channels=1, check_size=(4, 4)
        )
    message = str(info.value)
    assert message.startswith("cannot export DataDependent with torch.export: ") and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def _one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_refuses_to_overwrite_without_force(runs, tmp_path):
    out = tmp_path / "model.ts"
    args = ["export", str(runs["baseline"]), "--format", "torchscript", "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "Max |deviation|" in first.output and (tmp_path / "model.ts.json").is_file()
    written = out.read_bytes()
    _one_line_error(runner.invoke(app, args), str(out), "--force")
    assert out.read_bytes() == written
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts", "model.ts.json"]


def test_cli_errors_for_bad_sources_are_one_line(runs, tmp_path):
    _one_line_error(runner.invoke(app, ["export", str(tmp_path)]), str(tmp_path), "has no best.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    _one_line_error(runner.invoke(app, ["export", str(text)]), "cannot load checkpoint", "notes.pt")
    missing = runner.invoke(app, ["export", str(runs["baseline"]), "--checkpoint", "epoch9"])
    _one_line_error(missing, "no epoch9.pt", "best")
    _one_line_error(
        runner.invoke(app, ["export", str(runs["baseline"]), "--format", "tflite"]),
        "unknown export format 'tflite'",
        "onnx, torchscript, exported",
    )


def test_missing_onnxruntime_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(
        ExportError, match=re.escape("'onnxruntime', not installed: pip install 'acdc-prune[export]'")
    ):
        export_checkpoint(runs["baseline"], "onnx", out=tmp_path / "m.onnx")
    result = runner.invoke(app, ["export", str(runs["baseline"]), "--out", str(tmp_path / "m.onnx")])
    _one_line_error(result, "onnxruntime", "pip install 'acdc-prune[export]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["baseline", "pruned"])
def test_weights_export_drops_training_state_and_rebuilds_the_same_network(runs, tmp_path, which):
    source = runs[which] / "best.pt"
    stored = torch.load(source, weights_only=True)
    stored["optimizer"] = {"state": {0: {"exp_avg": torch.ones(1000)}}, "param_groups": []}
    stored["postprocessing"] = {
        "largest_component": True,
        "epoch": 2,
        "dice_mean": 0.5,
        "dice_mean_largest": 0.6,
    }
    training = tmp_path / "src" / "training.pt"
    training.parent.mkdir()
    torch.save(stored, training)
    out = tmp_path / "model.pt"
    result = runner.invoke(app, ["export", str(training), "--format", "weights", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = torch.load(out, weights_only=True)
    assert "optimizer" not in written
    assert written["postprocessing"] == stored["postprocessing"]  # inference metadata stays
    assert out.stat().st_size < training.stat().st_size
    x = _inputs()[0]
    torch.testing.assert_close(_eager(out, x), _eager(runs[which], x), rtol=0, atol=0)
    plan_file = tmp_path / "plan.json"
    if which == "pruned":
        assert PruningPlan.load(plan_file).to_json() == PruningPlan.from_json(stored["plan"]).to_json()
    else:
        assert not plan_file.exists()
    assert json.loads((tmp_path / "model.pt.json").read_text())["max_abs_deviation"] == 0.0
