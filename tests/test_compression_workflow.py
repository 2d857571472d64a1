"""Compression workflows on a tiny phantom run: BatchNorm recalibration, budget targets, iterative
pruning with composed plans, learning-rate rewinding, and the command line's pruning options."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from test_workflow import HALF, tiny_config
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.cost import count_macs
from acdc_prune.engine.steps import lr_factor, make_scheduler
from acdc_prune.engine.trainer import train
from acdc_prune.errors import ConfigError
from acdc_prune.experiments.prune import prune_run
from acdc_prune.models import build_model
from acdc_prune.pruning import apply_plan


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    return train(tiny_config(root / "runs", root / "cache")).run_dir


def _macs_fraction(folder):
    checkpoint = Checkpoint.open(folder)
    shape = (1, 1, *checkpoint.config.data.patch_size)
    return count_macs(checkpoint.build_model(), shape) / count_macs(
        build_model(checkpoint.config.model), shape
    )


def test_batchnorm_recalibration_changes_running_statistics_and_nothing_else(trained_run, tmp_path):
    folders = {
        count: prune_run(
            trained_run,
            HALF,
            retrain_epochs=0,
            out_dir=tmp_path / f"k{count}",
            overrides=[f"pruning.calibration_batches={count}"],
        ).out_dir
        for count in (0, 2)
    }
    plain, recalibrated = (Checkpoint.open(folders[k]).weights for k in (0, 2))
    statistics = [k for k in plain if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and any(not torch.equal(plain[k], recalibrated[k]) for k in statistics)
    assert all(torch.equal(plain[k], recalibrated[k]) for k in plain if k not in statistics)
    metas = {k: json.loads((folder / "meta.json").read_text()) for k, folder in folders.items()}
    assert metas[0]["batchnorm_recalibrated"] == 0 and metas[2]["batchnorm_recalibrated"] > 0


def test_a_mac_target_is_met_within_two_percent_and_reported(trained_run, tmp_path):
    result = prune_run(
        trained_run, retrain_epochs=0, out_dir=tmp_path / "t", overrides=["pruning.target=0.4"]
    )
    meta = result.meta
    assert meta["target"] == 0.4 and meta["target_metric"] == "macs" and meta["scope"] == "global"
    assert meta["ratios"] is None and meta["importance"] == "l1"
    assert 0.4 * 0.98 <= meta["macs_fraction_of_original"] <= 0.4
    assert _macs_fraction(result.out_dir) == pytest.approx(meta["macs_fraction_of_original"])


def test_pruning_a_pruned_run_records_one_composed_plan(trained_run, tmp_path):
    first = prune_run(trained_run, HALF, retrain_epochs=0, out_dir=tmp_path / "first")
    second = prune_run(first.out_dir, {"default": 0.5}, retrain_epochs=0, out_dir=tmp_path / "second")
    child, parent = Checkpoint.open(second.out_dir), Checkpoint.open(first.out_dir)
    original = build_model(child.config.model)
    rebuilt = apply_plan(original, child.plan)  # the original architecture and one plan rebuild it
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in child.weights.items()
    }
    assert child.plan.steps and sum(p.numel() for p in rebuilt.parameters()) < sum(
        p.numel() for p in parent.build_model().parameters()
    )
    assert second.meta["macs"]["before"] == count_macs(original, tuple(second.meta["macs"]["input_shape"]))


def test_steps_reach_the_target_through_nested_children(trained_run, tmp_path):
    steps = ["pruning.target=0.3", "pruning.steps=2"]
    result = prune_run(trained_run, retrain_epochs=1, out_dir=tmp_path / "last", overrides=steps)
    first_step = Checkpoint.open(result.meta["source_checkpoint"]).run_dir
    assert first_step == tmp_path / "last-step1"  # beside the last child, which prunes it further
    assert json.loads((first_step / "meta.json").read_text())["target"] == pytest.approx(0.3**0.5)
    assert 0.3 * 0.96 <= _macs_fraction(result.out_dir) <= 0.3
    assert not (trained_run / "pruned").exists()

    # A run stopped after step 1 resumes from it; a step toward another target is refused.
    shutil.rmtree(result.out_dir)
    again = prune_run(trained_run, retrain_epochs=1, out_dir=tmp_path / "last", overrides=steps)
    assert again.meta["source_checkpoint"] == result.meta["source_checkpoint"]  # step 1, not made again
    shutil.rmtree(again.out_dir)
    with pytest.raises(ConfigError, match="last-step1 holds a step toward another target"):
        prune_run(
            trained_run,
            retrain_epochs=1,
            out_dir=tmp_path / "last",
            overrides=["pruning.target=0.5", "pruning.steps=2"],
        )
    assert not (tmp_path / "last").exists()
    with pytest.raises(ConfigError, match="last-step1 already exists"):
        prune_run(trained_run, HALF, retrain_epochs=0, out_dir=first_step)


def test_learning_rate_rewinding_replays_the_end_of_the_original_schedule(trained_run, tmp_path):
    result = prune_run(trained_run, HALF, reinit="lr_rewind", retrain_epochs=1, out_dir=tmp_path / "lr")
    stored = yaml.safe_load((result.out_dir / "config.yaml").read_text())["training"]
    original = Checkpoint.open(trained_run).config.training
    assert stored["schedule_offset"] == original.epochs - 1 and stored["lr"] == original.lr
    steps = original.iterations_per_epoch
    retraining = Checkpoint.open(result.out_dir).config.training
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=retraining.lr)
    make_scheduler(optimizer, retraining, steps)
    total, warmup = original.epochs * steps, original.warmup_epochs * steps
    replayed = original.lr * lr_factor(steps, warmup, total, original.scheduler)  # the original's epoch 2
    fresh = original.lr * lr_factor(0, warmup, total, original.scheduler)  # a new schedule's warm-up
    assert optimizer.param_groups[0]["lr"] == pytest.approx(replayed) and replayed != pytest.approx(fresh)
    assert result.meta["reinit"] == "lr_rewind"


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--target-macs", "0"], "pruning.target: 0.0 is out of range"),
        (["--target-macs", "1.5"], "pruning.target: 1.5 is out of range"),
        (["--target-macs", "0.0001"], "cannot be met"),
        (["--steps", "3", "--ratios", "RATIOS"], "pruning.steps needs a target"),
        (["--target-macs", "0.5", "--importance", "gini"], "importance 'gini' is not one of l1, l2"),
        (["--target-macs", "0.5", "--target-params", "0.5"], "give one of --target-macs"),
    ],
)
def test_bad_pruning_options_are_one_line_and_write_nothing(trained_run, tmp_path, args, phrase):
    ratios = tmp_path / "ratios.yaml"
    ratios.write_text("default: 0.5\n")
    before = sorted(trained_run.rglob("*"))
    args = [str(ratios) if a == "RATIOS" else a for a in args]
    result = CliRunner().invoke(app, ["prune", str(trained_run), *args])
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and phrase in line, line
    assert sorted(trained_run.rglob("*")) == before


def test_the_cli_prunes_to_a_target_with_a_data_criterion(trained_run, tmp_path):
    before = set((trained_run / "pruned").glob("none-*"))
    args = [
        "prune",
        str(trained_run),
        "--target-macs",
        "0.5",
        "--importance",
        "taylor",
        "--retrain-epochs",
        "0",
    ]
    result = CliRunner().invoke(app, [*args, "--set", f"logging.runs_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "taylor, global scope, target 0.5 of macs" in result.output
    (child,) = set((trained_run / "pruned").glob("none-*")) - before
    assert json.loads((child / "meta.json").read_text())["importance"] == "taylor"


def test_pruning_scores_with_the_post_processing_each_checkpoint_chose():
    from acdc_prune.config import Config
    from acdc_prune.engine.checkpoints import Checkpoint
    from acdc_prune.experiments.prune import _resolved_postprocessing

    config = Config()
    chose = Checkpoint(config, {}, epoch=1, state={"postprocessing": {"largest_component": True}})
    assert _resolved_postprocessing(config, chose).evaluation.largest_component is True
    assert (
        _resolved_postprocessing(config, Checkpoint(config, {}, epoch=1)).evaluation.largest_component
        is False
    )
    assert config.evaluation.largest_component == "auto"  # the run's own config is left as set
    config.evaluation.largest_component = False
    assert _resolved_postprocessing(config, chose).evaluation.largest_component is False
