"""Training on a tiny phantom: loss goes down, outputs exist, runs repeat, resume is exact, NaN stops."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from acdc_prune.config import config_from_dict, load_config
from acdc_prune.engine.checkpoints import load_model, read_checkpoint
from acdc_prune.engine.precision import native_bf16
from acdc_prune.engine.steps import lr_factor
from acdc_prune.engine.trainer import train
from acdc_prune.errors import AcdcPruneError, ConfigError
from acdc_prune.models import build_model, total_stride
from acdc_prune.render import RichReporter


def tiny_config(tmp_path, phantom, **training):
    """The 5-patient test phantom, 64x64 crops at 3 mm, a 2-level U-Net of widths 8 and 16, 3 steps/epoch."""
    return config_from_dict(
        {
            "data": {
                "root": str(phantom),
                "val_fraction": 0.2,
                "target_spacing": [3.0, 3.0],
                "patch_size": [64, 64],
                "cache": "memory",
            },
            "model": {"features": [8, 16]},
            "training": {
                "epochs": 2,
                "batch_size": 4,
                "iterations_per_epoch": 3,
                "lr": 3e-3,
                "warmup_epochs": 1,
                "checkpoint_epochs": [1],
                "num_threads": 1,
                **training,
            },
            "evaluation": {"batch_size": 8},
            "logging": {"runs_dir": str(tmp_path / "runs"), "experiment": "t", "progress": False},
        }
    )


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _without_times(history):
    return [{k: v for k, v in row.items() if k not in ("time_s", "slices_per_s")} for row in history]


@pytest.mark.parametrize("name", ["demo.yaml", "acdc.yaml"])
def test_shipped_configs_load_and_their_patches_fit_the_network(name):
    config = load_config(Path(__file__).parents[1] / "configs" / name)
    stride = total_stride(config.model)
    assert all(side % stride == 0 for side in config.data.patch_size)
    assert set(config.training.checkpoint_epochs) <= set(range(1, config.training.epochs + 1))
    assert config.pruning.rewind_to in {f"epoch{e}" for e in config.training.checkpoint_epochs}


def test_lr_factor_warms_up_then_decays():
    assert [lr_factor(s, 4, 20, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    cosine = [lr_factor(s, 4, 20, "cosine") for s in range(4, 21)]
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    assert lr_factor(12, 4, 20, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(19, 0, 20, "none") == 1.0


def test_training_writes_its_outputs_and_the_loss_decreases(tmp_path, tiny_phantom):
    config = tiny_config(tmp_path, tiny_phantom, epochs=3, val_every=2, checkpoint_epochs=[1, 2])
    result = train(config)
    run = result.run_dir
    assert run.parent == tmp_path / "runs" / "t"
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    # Validated at epoch 2 (val_every) and at the last epoch; Dice is None elsewhere.
    assert [row["dice_mean"] is not None for row in result.history] == [False, True, True]
    assert 0.0 <= result.best_dice <= 1.0 and result.best_epoch in (2, 3)
    for name in ("config.yaml", "split.json", "metrics.json", "metrics.csv", "curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "epoch1.pt", "epoch2.pt", "last.pt"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.best_epoch and len(metrics["epochs"]) == 3
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["epoch", "train_loss", "lr"] and "dice_MYO" in header
    _, best_config, best = load_model(run)
    assert best.epoch == result.best_epoch and best_config == config
    assert read_checkpoint(run / "epoch1.pt")["epoch"] == 1
    assert read_checkpoint(run / "last.pt")["epoch"] == 3
    # Post-processing is chosen for the best epoch on the validation patients, and resolves "auto".
    best_row = result.history[result.best_epoch - 1]
    choice = best.state["postprocessing"]
    assert choice["dice_mean"] == best_row["dice_mean"] and choice["epoch"] == result.best_epoch
    assert choice["dice_mean_largest"] == best_row["dice_mean_largest"] is not None
    assert choice["largest_component"] == (best_row["dice_mean_largest"] > best_row["dice_mean"])
    assert best.largest_component("auto") is choice["largest_component"]
    assert best.largest_component(False) is False and best.largest_component(True) is True


def _same_tree(a, b) -> bool:
    """Equal nested dicts/lists whose tensors are equal element for element (torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_tree, a, b))
    return a == b


def test_same_config_twice_gives_identical_weights_and_metrics(tmp_path, tiny_phantom):
    config = tiny_config(tmp_path, tiny_phantom, scheduler="poly")
    first, second = train(config), train(config)
    assert first.run_dir != second.run_dir
    assert _without_times(first.history) == _without_times(second.history)
    metrics = [json.loads((result.run_dir / "metrics.json").read_text()) for result in (first, second)]
    assert [_without_times(m.pop("epochs")) for m in metrics] == [_without_times(first.history)] * 2
    assert metrics[0] == metrics[1]
    names = sorted(p.name for p in first.run_dir.glob("*.pt"))
    assert names == sorted(p.name for p in second.run_dir.glob("*.pt")) == ["best.pt", "epoch1.pt", "last.pt"]
    for name in names:
        ours, theirs = (read_checkpoint(result.run_dir / name) for result in (first, second))
        assert _without_times(ours.pop("history")) == _without_times(theirs.pop("history"))
        assert _same_tree(ours, theirs), name  # weights, optimiser, scheduler and scaler states


def test_progress_bars_and_epoch_lines_go_to_the_console(tmp_path, tiny_phantom):
    config = tiny_config(tmp_path, tiny_phantom, epochs=1)
    config.logging.progress = True
    config.logging.tensorboard = False
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system=None, width=200)
    with RichReporter(console) as reporter:
        train(config, reporter=reporter)
    text = buffer.getvalue()
    assert "epoch 1/1  loss" in text and "Dice RV" in text  # the per-epoch line
    assert "epochs" in text and "3/3" in text and "slices/s" in text  # the live bars


@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="CPU without native bf16"),
        ),
    ],
)
def test_resume_ends_identical_to_an_uninterrupted_run(tmp_path, tiny_phantom, ctrl_c_in_epoch, precision):
    config = tiny_config(tmp_path, tiny_phantom, optimizer="sgd", momentum=0.9, precision=precision)
    full = train(config)

    restore = ctrl_c_in_epoch(2)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    restore()
    partial_dir = sorted((tmp_path / "runs" / "t").iterdir())[-1]
    assert read_checkpoint(partial_dir / "last.pt")["epoch"] == 1

    resumed = train(config, resume=partial_dir)
    assert resumed.run_dir == partial_dir
    assert _without_times(resumed.history) == _without_times(full.history)
    assert _same_weights(load_model(full.run_dir, "last")[0], load_model(partial_dir, "last")[0])
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        train(config, resume=partial_dir)


class _PoisonAfter(nn.Module):
    """Wraps a network and turns its training output into NaN after ``calls`` forward passes."""

    def __init__(self, inner: nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls -= 1
            if self.calls < 0:
                out = out * math.nan
        return out


def test_nan_loss_stops_with_one_line_error_and_keeps_the_last_good_checkpoint(tmp_path, tiny_phantom):
    config = tiny_config(tmp_path, tiny_phantom)
    model = _PoisonAfter(build_model(config.model), calls=4)
    run_dir = tmp_path / "poisoned"
    with pytest.raises(AcdcPruneError) as info:
        train(config, model=model, run_dir=run_dir)
    message = str(info.value)
    assert "\n" not in message and "epoch 2" in message and "nan" in message and "last.pt" in message
    assert read_checkpoint(run_dir / "last.pt")["epoch"] == 1
