"""End to end on a tiny phantom: prune under each mode, inspect, evaluate a pruned folder, resume a sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import config_from_dict, save_config
from acdc_prune.engine.checkpoints import Checkpoint, load_model
from acdc_prune.engine.cost import count_parameters
from acdc_prune.engine.trainer import train
from acdc_prune.errors import CheckpointError, ConfigError
from acdc_prune.experiments.evaluation import evaluate_folder
from acdc_prune.experiments.inspect import inspect_run
from acdc_prune.experiments.prune import prune_run, read_ratios
from acdc_prune.experiments.sweep import SweepConfig, load_sweep, run_sweep
from acdc_prune.pruning import PruningError, PruningPlan, apply_plan

HALF = {"default": 0.5}


def tiny_config(runs, cache):
    """Four phantom patients, 64x64 crops at 3 mm, a 3-level U-Net of widths 8-32, 2 short epochs."""
    return config_from_dict(
        {
            "data": {
                "phantom_patients": 4,
                "val_fraction": 0.25,
                "cache_dir": str(cache),
                "target_spacing": [3.0, 3.0],
                "patch_size": [64, 64],
            },
            "model": {"features": [8, 16, 32]},
            "training": {
                "epochs": 2,
                "batch_size": 4,
                "iterations_per_epoch": 3,
                "lr": 3e-3,
                "checkpoint_epochs": [1],
                "num_threads": 1,
            },
            "pruning": {"retrain_epochs": 1, "rewind_to": "epoch1"},
            "evaluation": {"batch_size": 8, "overlays": 1, "latency_repeats": 2, "latency_warmup": 1},
            "logging": {"runs_dir": str(runs), "experiment": "t", "progress": False, "tensorboard": False},
        }
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A baseline run folder with epoch1.pt, best.pt and last.pt."""
    root = tmp_path_factory.mktemp("workflow")
    config = tiny_config(root / "runs", root / "cache")
    return train(config).run_dir


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_prune_none_writes_a_complete_child_folder(trained_run):
    result = prune_run(trained_run, HALF, reinit="none")
    out = result.out_dir
    assert out.parent == trained_run / "pruned"
    expected = ("plan.json", "masks.json", "meta.json", "widths.png", "result.json", "best.pt", "metrics.csv")
    for name in expected:
        assert (out / name).is_file(), name
    assert (out / "eval_before" / "summary.json").is_file()
    assert (out / "eval_after" / "summary.json").is_file()
    meta = json.loads((out / "meta.json").read_text())
    model, _, _ = load_model(out)
    assert count_parameters(model) == meta["params"]["after"] < meta["params"]["before"]
    assert meta["macs"]["after"] < meta["macs"]["before"]
    masks = json.loads((out / "masks.json").read_text())
    plan = PruningPlan.load(out / "plan.json")
    kept = plan.layers["encoders.1.conv1.conv"].kept_out
    assert sum(masks["encoders.1.conv1.conv"]) == len(kept)
    assert [i for i, keep in enumerate(masks["encoders.1.conv1.conv"]) if keep] == kept
    assert masks["head"] == [True] * 4


def test_rewind_loads_the_early_weights_and_random_differs(trained_run, tmp_path):
    trained, _, _ = load_model(trained_run)
    early, _, _ = load_model(trained_run, "epoch1")
    results = {
        mode: prune_run(
            trained_run,
            HALF,
            reinit=mode,
            retrain_epochs=0,
            out_dir=tmp_path / mode,
            overrides=["pruning.calibration_batches=0"],  # the weights as re-initialised, not recalibrated
        )
        for mode in ("none", "random", "rewind")
    }
    plan = PruningPlan.load(results["none"].out_dir / "plan.json")
    weights = {mode: load_model(result.out_dir)[0].state_dict() for mode, result in results.items()}
    expected_rewind = apply_plan(early, plan).state_dict()
    expected_none = apply_plan(trained, plan).state_dict()
    conv = "encoders.1.conv1.conv.weight"
    assert torch.equal(weights["rewind"][conv], expected_rewind[conv])
    assert torch.equal(weights["none"][conv], expected_none[conv])
    assert not torch.equal(weights["rewind"][conv], weights["none"][conv])
    assert not torch.equal(weights["random"][conv], weights["none"][conv])
    assert weights["random"][conv].shape == weights["none"][conv].shape
    norm_mean = "encoders.1.conv1.adn.N.running_mean"
    assert torch.equal(weights["random"][norm_mean], torch.zeros_like(weights["random"][norm_mean]))


def test_masks_come_from_the_trained_model_in_every_mode(trained_run, tmp_path):
    folders = [
        prune_run(trained_run, HALF, reinit=mode, retrain_epochs=0, out_dir=tmp_path / mode).out_dir
        for mode in ("none", "rewind")
    ]
    plans = [PruningPlan.load(folder / "plan.json") for folder in folders]
    assert plans[0].to_dict() == plans[1].to_dict()


def test_evaluate_accepts_a_pruned_folder(trained_run, tmp_path):
    pruned = prune_run(trained_run, HALF, reinit="none", retrain_epochs=0, out_dir=tmp_path / "p").out_dir
    _, config, _ = load_model(pruned)
    data = tmp_path.parent  # not a data set: evaluation must name the problem
    with pytest.raises(Exception, match="data|folder|layout|patient"):
        evaluate_folder(pruned, data / "missing-folder", out=tmp_path / "e0")
    from acdc_prune.data import phantom_root

    root = phantom_root(config.data.cache_dir, config.data.phantom_patients, config.data.phantom_seed)
    result = evaluate_folder(pruned, root, out=tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (tmp_path / "eval" / "config.yaml").is_file()
    assert summary["n_volumes"] == 8
    assert summary["mean_dice"] == pytest.approx(result.summary["mean_dice"])
    assert not (tmp_path / "e0").exists()
    own_split = evaluate_folder(pruned, None, out=tmp_path / "val")
    assert own_split.summary["n_volumes"] == 2
    assert own_split.summary["mean_dice"] == pytest.approx(
        json.loads((pruned / "eval_before" / "summary.json").read_text())["mean_dice"]
    )


def test_predict_writes_a_label_volume_per_image_in_its_own_geometry(trained_run, tmp_path):
    import nibabel as nib

    from acdc_prune.data import discover, phantom_root
    from acdc_prune.data.nifti import open_nifti, true_affine

    _, config, _ = load_model(trained_run)
    root = phantom_root(config.data.cache_dir, config.data.phantom_patients, config.data.phantom_seed)
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(trained_run), "--data", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = [record.image for record in discover(root)]
    assert len(list(out.glob("*.nii.gz"))) == len(images) == 8
    for image in images:
        written = nib.load(out / image.name)
        assert written.shape == open_nifti(image).shape
        np.testing.assert_allclose(written.affine, true_affine(open_nifti(image)), atol=1e-4)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}
    again = CliRunner().invoke(app, ["predict", str(trained_run), "--data", str(root), "--out", str(out)])
    assert again.exit_code == 2
    assert "already exists" in again.output


def test_bad_inputs_write_nothing(trained_run, tmp_path):
    before = sorted(p.name for p in trained_run.rglob("*"))
    with pytest.raises(PruningError, match="encoders.9"):
        prune_run(trained_run, {"default": 0.5, "encoders.9": 0.5}, reinit="none")
    with pytest.raises(CheckpointError, match="no epoch7.pt .*epoch1"):
        prune_run(trained_run, HALF, reinit="rewind", rewind_to="epoch7")
    with pytest.raises(ConfigError, match="not one of none, random, rewind"):
        prune_run(trained_run, HALF, reinit="rewnd")
    with pytest.raises(CheckpointError, match="has no best.pt"):
        prune_run(tmp_path, HALF)
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: 1.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.default: 1.5 is out of range \(must be < 1.0\)"):
        read_ratios(bad)
    bad.write_text("default: [0.5\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        read_ratios(bad)
    assert sorted(p.name for p in trained_run.rglob("*")) == before


def test_cli_errors_are_one_line(trained_run, tmp_path):
    ratios = tmp_path / "r.yaml"
    ratios.write_text(yaml.safe_dump({"default": 0.5, "encoder.1": 0.3}))
    result = CliRunner().invoke(app, ["prune", str(trained_run), "--ratios", str(ratios)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "encoder.1" in lines[0]
    assert "Traceback" not in result.output


def test_inspect_writes_statistics_and_a_preview(trained_run, tmp_path):
    result = inspect_run(trained_run, ratios=HALF, out=tmp_path / "inspect")
    out = result.out_dir
    assert out == tmp_path / "inspect" and result.preview["ratios"] == HALF
    for name in ("norms.csv", "blocks.csv", "norm_histograms.png", "norm_heatmap.png", "preview.json"):
        assert (out / name).is_file(), name
    preview = json.loads((out / "preview.json").read_text())
    assert preview["params"]["after"] < preview["params"]["before"]
    header = (out / "norms.csv").read_text().splitlines()[0].split(",")
    assert {"layer", "block", "l1_mean", "l2_max"} <= set(header)


def test_inspecting_a_model_file_writes_under_the_runs_folder_not_beside_the_file(trained_run, tmp_path):
    shipped = tmp_path / "bundle" / "models"
    shipped.mkdir(parents=True)
    model_file = Checkpoint.open(trained_run).save(shipped / "model.pt")
    source = Checkpoint.open(model_file)
    source.config.logging.runs_dir = str(tmp_path / "runs")
    source.save(model_file)
    out = inspect_run(model_file).out_dir
    assert out.parent == tmp_path / "runs" / "inspect" and (out / "norms.csv").is_file()
    assert sorted(p.name for p in shipped.iterdir()) == ["model.pt"]


def test_evaluation_caches_under_the_runs_folder_of_its_config(trained_run, tmp_path):
    source = Checkpoint.open(trained_run)
    runs = tmp_path / "elsewhere"
    overrides = ["data.cache=disk", "data.cache_dir=null", f"logging.runs_dir={runs}"]
    evaluate_folder(trained_run, None, out=tmp_path / "eval", overrides=overrides)
    assert list((runs / ".cache" / "preprocessed").rglob("*.pt"))
    assert source.config.data.cache == "memory" and not (tmp_path / "eval" / ".cache").exists()


def test_sweep_resume_skips_finished_arms(trained_run, tmp_path, capsys):
    _, config, _ = load_model(trained_run)
    config.logging.runs_dir = str(tmp_path / "runs")
    save_config(config, tmp_path / "base.yaml")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "config": "base.yaml",
                "baseline": str(trained_run),
                "ratios": {"half": HALF},
                "modes": ["none", "rewind"],
                "retrain_epochs": 0,
            }
        )
    )
    sweep, base_dir = load_sweep(sweep_file)
    report_dir = run_sweep(sweep, base_dir)
    arm = report_dir.parent / "arms" / "half-none" / "result.json"
    stamp = arm.stat().st_mtime_ns
    capsys.readouterr()
    run_sweep(sweep, base_dir)
    assert "half-none: finished earlier, skipped" in capsys.readouterr().out
    assert arm.stat().st_mtime_ns == stamp
    table = (report_dir / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("arm,setting,mode,params,params_pct")
    assert [line.split(",")[0] for line in table[1:]] == ["baseline", "half-none", "half-rewind"]
    for name in ("comparison.md", "pareto.png", "curves.png"):
        assert (report_dir / name).is_file()


def test_sweep_config_errors():
    from acdc_prune.config import from_mapping
    from acdc_prune.experiments.sweep import sweep_settings

    with pytest.raises(ConfigError, match="modes\\[0\\]: 'prune' is not one of none, random, rewind"):
        from_mapping(SweepConfig, {"modes": ["prune"]})
    with pytest.raises(ConfigError, match="unknown config key 'ratio': did you mean 'ratios'"):
        from_mapping(SweepConfig, {"ratio": {}})
    with pytest.raises(ConfigError, match="no arms"):
        sweep_settings(from_mapping(SweepConfig, {"modes": []}))
