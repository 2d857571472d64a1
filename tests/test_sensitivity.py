"""Sensitivity analysis on a tiny phantom run: the table, the ratios for a MAC target, resuming, bad input."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import config_from_dict
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.cost import count_macs
from acdc_prune.engine.trainer import train
from acdc_prune.errors import ConfigError
from acdc_prune.experiments import sensitivity
from acdc_prune.experiments.planning import example_input
from acdc_prune.experiments.prune import read_ratios
from acdc_prune.experiments.scoring import Scorer, TrainingSlices, spread
from acdc_prune.experiments.sensitivity import COLUMNS, run_sensitivity
from acdc_prune.experiments.sensitivity_ratios import greedy_ratios, parse_ratio_list
from acdc_prune.pruning import PruningError, apply_plan, plan_pruning

RATIOS = [0.25, 0.5]
TARGET = 0.6
# Two calibration batches keep the test fast; the default is 16.
CALIBRATION = ["pruning.calibration_batches=2"]


def tiny_raw(root, data):
    """A one-epoch U-Net of widths 8-16 on the 5-patient phantom (one validation patient: ED and ES)."""
    return {
        "data": {
            "root": str(data),
            "val_fraction": 0.2,
            "target_spacing": [3.0, 3.0],
            "patch_size": [64, 64],
            "cache_dir": str(root / "cache"),
        },
        "model": {"features": [8, 16]},
        "training": {"epochs": 1, "batch_size": 4, "iterations_per_epoch": 2, "num_threads": 1},
        "evaluation": {"batch_size": 8, "overlays": 0},
        "logging": {
            "runs_dir": str(root / "runs"),
            "experiment": "t",
            "progress": False,
            "tensorboard": False,
        },
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_phantom):
    """A trained run folder."""
    root = tmp_path_factory.mktemp("sensitivity")
    return train(config_from_dict(tiny_raw(root, tiny_phantom))).run_dir


@pytest.fixture(scope="module")
def analysis(trained, tmp_path_factory):
    """A finished analysis at two ratios with a MAC target."""
    out = tmp_path_factory.mktemp("analysis") / "sens"
    return run_sensitivity(trained, RATIOS, volumes=2, target_macs=TARGET, out=out, overrides=CALIBRATION)


def test_the_table_has_one_row_per_block_and_ratio(analysis):
    table = pd.read_csv(analysis.out_dir / "sensitivity.csv")
    assert list(table.columns) == list(COLUMNS)
    blocks = analysis.meta["blocks"]
    assert blocks[:2] == ["encoders.0", "encoders.1"] and "bottleneck" in blocks and "head" not in blocks
    assert sorted(zip(table.block, table.ratio, strict=True)) == sorted(
        (b, r) for b in blocks for r in RATIOS
    )
    reference = analysis.meta["reference"]["dice_mean"]
    assert table.dice_loss.to_numpy() == pytest.approx(reference - table.dice.to_numpy(), abs=1e-12)
    for _, rows in table.groupby("block"):
        rows = rows.sort_values("ratio")
        assert rows.macs_saved.is_monotonic_increasing and rows.macs_saved.iloc[0] > 0
        assert (rows.channels_kept < rows.channels_total).all()
        assert rows.channels_kept.is_monotonic_decreasing
    enc0 = table[(table.block == "encoders.0") & (table.ratio == 0.5)].iloc[0]
    assert (enc0.channels_kept, enc0.channels_total) == (8, 16)
    meta = analysis.meta
    assert meta["complete"] and meta["settings"]["volumes"] == ["patient003 ED", "patient003 ES"]
    assert meta["settings"]["calibration_batches"] == 2 and meta["batchnorm_recalibrated"]
    assert "fixed subset" in meta["proxy"]
    # The reference is the network as trained; recalibrating it alone is recorded beside it.
    assert meta["reference_recalibrated"]["dice_mean"] != meta["reference"]["dice_mean"]
    for name in ("sensitivity_ratio.png", "sensitivity_macs.png", "ratios.yaml", "meta.json"):
        assert (analysis.out_dir / name).stat().st_size > 0, name


def test_ratios_file_meets_the_mac_target_and_its_real_macs_are_recorded(analysis, trained):
    ratios = read_ratios(analysis.out_dir / "ratios.yaml")
    assert ratios == analysis.ratios and ratios["default"] == 0.0 and len(ratios) > 1
    target = json.loads((analysis.out_dir / "meta.json").read_text())["target"]
    model = Checkpoint.open(trained).build_model()
    config = Checkpoint.open(trained).config
    shape = tuple(example_input(config).shape)
    pruned = apply_plan(model, plan_pruning(model, example_input(config), ratios))
    real = count_macs(pruned, shape) / count_macs(model, shape)
    assert target["real_macs_fraction"] == pytest.approx(real, abs=1e-9)
    assert target["macs_fraction"] == TARGET
    assert TARGET - 0.25 < real <= TARGET and target["predicted_macs_fraction"] <= TARGET
    table = analysis.table.set_index(["block", "ratio"])
    chosen = [(block, ratio) for block, ratio in ratios.items() if block != "default"]
    assert target["predicted_dice_loss"] == pytest.approx(table.loc[chosen, "dice_loss"].sum())


GREEDY_TABLE = pd.DataFrame(
    {
        "block": ["a", "a", "b", "b"],
        "ratio": [0.5, 0.9, 0.5, 0.9],
        "macs_saved": [0.2, 0.3, 0.2, 0.3],
        "dice_loss": [0.01, 0.10, 0.001, 0.002],
    }
)


def _additive(ratios, lag=0.0):
    """MACs kept by ``ratios`` on GREEDY_TABLE, plus ``lag`` (blocks pruned together save less)."""
    table = GREEDY_TABLE
    saved = {(b, r): s for b, r, s in zip(table.block, table.ratio, table.macs_saved, strict=True)}
    chosen = {k: v for k, v in ratios.items() if k != "default"}
    return 1.0 - sum(saved[item] for item in chosen.items()) + (lag if chosen else 0.0)


def test_greedy_takes_the_least_loss_per_mac_saved_first():
    # b at 0.5 costs 0.005 per MAC, then b 0.5 -> 0.9 costs 0.01, a at 0.5 costs 0.05.
    ratios, predicted, real = greedy_ratios(GREEDY_TABLE, 0.7, _additive)
    assert ratios == {"default": 0.0, "b": 0.9} and predicted == pytest.approx(0.7) == real
    ratios, predicted, real = greedy_ratios(GREEDY_TABLE, 0.7, lambda r: _additive(r, lag=0.1))
    assert ratios == {"default": 0.0, "b": 0.9, "a": 0.5}
    assert predicted == pytest.approx(0.5) and real == pytest.approx(0.6)
    with pytest.raises(PruningError, match="cannot reach the MAC target 0.1"):
        greedy_ratios(GREEDY_TABLE, 0.1, _additive)


def test_recalibration_changes_the_score(trained):
    source = Checkpoint.open(trained)
    config = config_from_dict({**source.config.to_dict(), "pruning": {"calibration_batches": 2}})
    scorer = Scorer(config, 2, TrainingSlices(config))
    model = source.build_model()
    pruned = apply_plan(model, plan_pruning(model, example_input(config), {"encoders.1": 0.5}))
    stale, none = scorer(copy.deepcopy(pruned), recalibrate=False)
    fresh, norms = scorer(copy.deepcopy(pruned))
    assert none == 0 and norms == sum(isinstance(m, torch.nn.BatchNorm2d) for m in pruned.modules()) > 0
    assert fresh["dice_mean"] != stale["dice_mean"]
    assert len(scorer.calibration()) == 2 and tuple(scorer.calibration()[0].shape) == (4, 1, 64, 64)


def test_a_scorer_replaying_the_unpruned_block_outputs_gives_what_running_each_pruned_network_gives(trained):
    source = Checkpoint.open(trained)
    config = config_from_dict({**source.config.to_dict(), "pruning": {"calibration_batches": 2}})
    model = source.build_model()
    blocks = sensitivity.prunable_blocks(model, example_input(config))
    training = TrainingSlices(config)
    replaying, running = Scorer(config, 2, training, reuse_blocks=blocks[:-1]), Scorer(config, 2, training)
    assert replaying.reference(model) == running(copy.deepcopy(model))
    for index, block in enumerate(blocks):
        pruned = apply_plan(model, plan_pruning(model, example_input(config), {block: 0.5}))
        replayed, computed = copy.deepcopy(pruned), copy.deepcopy(pruned)
        assert replaying(replayed) == running(computed)
        assert replaying.skipped == blocks[:index] and running.skipped == []
        states = zip(replayed.state_dict().values(), computed.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in states)


def test_volumes_are_spread_evenly_and_ratios_parsed():
    assert spread(40, 8) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert spread(2, 8) == [0, 1] and spread(5, 1) == [0]
    assert parse_ratio_list("0.5, 0.25,0.5") == [0.25, 0.5]
    for text, phrase in (
        ("0,0.5", "not in (0, 1)"),
        ("0.5,1", "not in (0, 1)"),
        ("nan", "not in"),
        ("a", "comma"),
    ):
        with pytest.raises(ConfigError, match=re.escape(phrase)):
            parse_ratio_list(text)


def test_a_rerun_with_the_same_folder_computes_only_the_missing_rows(
    trained, analysis, tmp_path, monkeypatch
):
    out = tmp_path / "resumed"
    shutil.copytree(analysis.out_dir, out)
    full = pd.read_csv(out / "sensitivity.csv")
    full.iloc[:-1].to_csv(out / "sensitivity.csv", index=False)
    started = json.loads((out / "meta.json").read_text())["started"]
    calls = []
    real_measure = sensitivity._measure

    def counting(job, block, ratio, reference):
        calls.append((block, ratio))
        return real_measure(job, block, ratio, reference)

    monkeypatch.setattr(sensitivity, "_measure", counting)
    result = run_sensitivity(trained, RATIOS, volumes=2, target_macs=TARGET, out=out, overrides=CALIBRATION)
    last = full.iloc[-1]
    assert calls == [(last.block, last.ratio)]
    again = pd.read_csv(out / "sensitivity.csv")
    assert len(again) == len(full)
    assert again.dice.to_numpy() == pytest.approx(full.dice.to_numpy(), abs=1e-6)
    assert result.meta["started"] == started and result.ratios == analysis.ratios


def test_a_folder_of_other_settings_or_content_is_refused(trained, analysis, tmp_path):
    with pytest.raises(ConfigError, match=r"other settings \(importance\)"):
        run_sensitivity(
            trained,
            RATIOS,
            importance="l2",
            volumes=2,
            target_macs=TARGET,
            out=analysis.out_dir,
            overrides=CALIBRATION,
        )
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a sensitivity folder"):
        run_sensitivity(trained, RATIOS, volumes=2, target_macs=TARGET, out=tmp_path, overrides=CALIBRATION)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _listing(*folders):
    return {folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) for folder in folders}


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--ratios", "0,0.5"], "ratio 0.0 is not in (0, 1)"),
        (["--ratios", "0.5,one"], "not comma-separated numbers"),
        (["--importance", "nope"], "l1, l2, bn_scale"),
        (["--volumes", "0"], "at least 1"),
        (["--target-macs", "0"], "not in (0, 1]"),
        (["--target-macs", "1.5"], "not in (0, 1]"),
        (
            ["--ratios", "0.25", "--target-macs", "0.05"],
            "cannot be reached: every block at ratio 0.25 keeps 0.",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, args, phrase):
    out = tmp_path / "out"
    before = _listing(trained, tmp_path)
    result = CliRunner().invoke(
        app, ["sensitivity", str(trained), "--out", str(out), *args, "--set", *CALIBRATION]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], result.output
    assert _listing(trained, tmp_path) == before and not out.exists()


def test_cli_on_a_checkpoint_file_writes_under_the_runs_folder(trained):
    config = Checkpoint.open(trained).config
    args = [
        "sensitivity",
        str(trained / "best.pt"),
        "--ratios",
        "0.5",
        "--volumes",
        "1",
        "--target-macs",
        "0.9",
    ]
    result = CliRunner().invoke(app, [*args, "--set", "pruning.calibration_batches=1"])
    assert result.exit_code == 0, result.output
    assert (
        "Dice loss" in result.output and "encoders.0" in result.output and "sensitivity in" in result.output
    )
    (out,) = (Path(config.logging.runs_dir) / "sensitivity").iterdir()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["volumes"] == ["patient003 ED"] and meta["ratios"] == [0.5]
    assert yaml.safe_load((out / "ratios.yaml").read_text())["default"] == 0.0
    assert not (trained / "sensitivity").exists()


def test_without_replay_the_cli_writes_the_same_table(trained, analysis, tmp_path):
    args = ["sensitivity", str(trained), "--ratios", ",".join(map(str, RATIOS)), "--volumes", "2"]
    args += ["--target-macs", str(TARGET), "--out", str(tmp_path / "sens"), "--no-replay"]
    result = CliRunner().invoke(app, [*args, "--set", CALIBRATION[0]])
    assert result.exit_code == 0, result.output
    columns = ["block", "ratio", "params", "macs", "dice", "dice_RV", "dice_MYO", "dice_LV"]
    computed = pd.read_csv(tmp_path / "sens" / "sensitivity.csv")[columns]
    pd.testing.assert_frame_equal(computed, pd.read_csv(analysis.out_dir / "sensitivity.csv")[columns])
