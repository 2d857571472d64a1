"""The MONAI bundle in bundles/acdc_unet_prune: metadata, train/inference/prune configs, shipped models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from acdc_prune.bundle import load_network
from acdc_prune.data.nifti import open_nifti, true_affine
from acdc_prune.engine.checkpoints import load_model
from acdc_prune.engine.cost import count_macs, count_parameters
from acdc_prune.models import UNet2D
from acdc_prune.pruning import PruningPlan

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "acdc_unet_prune"
CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
SHIPPED = {
    "baseline": BUNDLE / "models" / "model.pt",
    "pruned": BUNDLE / "models" / "pruned" / "model.pt",
    "pruned10x": BUNDLE / "models" / "pruned10x" / "model.pt",
}
TINY_RECIPE = [
    "model.features=[4,8]",
    "model.bottleneck=8",
    "data.target_spacing=[3.0,3.0]",
    "data.patch_size=[64,64]",
    "data.cache=none",
    "training.epochs=1",
    "training.iterations_per_epoch=2",
    "training.batch_size=4",
    "training.checkpoint_epochs=[1]",
    "training.num_threads=1",
    "data.split=stratified",
    "evaluation.latency_repeats=2",
    "evaluation.latency_warmup=1",
    "evaluation.overlays=0",
    "logging.tensorboard=false",
]


def run_bundle(config: str, **override) -> list:
    """Run ``configs/<config>`` in this process as ``python -m monai.bundle run`` would."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / config), bundle_root=str(BUNDLE), workflow_type=None, **override
    )
    workflow.initialize()
    result = workflow.run()
    workflow.finalize()
    return result


@pytest.fixture(scope="module")
def bundle_run(tiny_phantom, tmp_path_factory):
    """A run folder written by configs/train.yaml on the tiny phantom."""
    out = tmp_path_factory.mktemp("bundle") / "runs"
    (run_dir,) = run_bundle(
        "train.yaml", dataset_dir=str(tiny_phantom), output_dir=str(out), overrides=TINY_RECIPE
    )
    return run_dir


def test_metadata_verifies_offline_against_the_shipped_schema():
    verify_metadata(meta_file=str(META), filepath=str(CONFIGS / "metadata_schema.json"))
    formats = json.loads(META.read_text())["network_data_format"]
    assert formats["inputs"]["image"]["num_channels"] == 1
    assert formats["outputs"]["pred"]["num_channels"] == 4
    assert list(formats["outputs"]["pred"]["channel_def"].values()) == ["background", "RV", "MYO", "LV"]


def test_schema_refuses_metadata_without_required_keys(tmp_path):
    metadata = json.loads(META.read_text())
    del metadata["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(CONFIGS / "metadata_schema.json"))


def test_train_config_writes_a_loadable_run(bundle_run):
    model, config, checkpoint = load_model(bundle_run)
    assert config.model.features == [4, 8]
    assert checkpoint.epoch == 1
    assert (bundle_run / "metrics.json").is_file()


def test_inference_config_writes_labels_in_the_original_geometry(bundle_run, tiny_phantom, tmp_path):
    (out,) = run_bundle(
        "inference.yaml",
        dataset_dir=str(tiny_phantom),
        model_file=str(bundle_run / "best.pt"),
        output_dir=str(tmp_path),
    )
    predictions = sorted(out.glob("*.nii.gz"))
    images = sorted(tiny_phantom.glob("patient*/patient*_frame??.nii.gz"))
    assert [p.name for p in predictions] == sorted(p.name for p in images)
    for prediction in predictions:
        image = open_nifti(tiny_phantom / prediction.name.split("_")[0] / prediction.name)
        written = nib.load(prediction)
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, true_affine(image), atol=1e-4)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}


def test_prune_config_prunes_and_retrains_a_bundle_model(bundle_run, tiny_phantom, tmp_path):
    ratios = tmp_path / "ratios.yaml"
    ratios.write_text("default: 0.5\n")
    (child,) = run_bundle(
        "prune.yaml",
        dataset_dir=str(tiny_phantom),
        model_file=str(bundle_run / "best.pt"),
        ratios_file=str(ratios),
        output_dir=str(tmp_path / "runs"),
        retrain_epochs=1,
    )
    pruned, _, checkpoint = load_model(child)
    baseline, _, _ = load_model(bundle_run)
    assert checkpoint.plan is not None
    assert json.loads((child / "meta.json").read_text())["params"]["after"] == count_parameters(pruned)
    assert count_parameters(pruned) < count_parameters(baseline) / 2
    assert (child / "eval_after" / "summary.json").is_file()


def test_network_def_passes_verify_net_in_out(bundle_run):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(CONFIGS / "inference.yaml"),
        device="cpu",
        model_file=str(bundle_run / "best.pt"),
        bundle_root=str(BUNDLE),
    )


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_load_safely_and_match_the_metadata(name):
    path = SHIPPED[name]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) >= {"format", "model", "config", "epoch"}
    assert "optimizer" not in raw
    assert path.stat().st_size < 5 * 2**20
    model = load_network(path, META)
    assert model(torch.zeros(2, 1, 32, 48)).shape == (2, 4, 32, 48)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(CONFIGS / "inference.yaml"),
        device="cpu",
        model_file=str(path),
        bundle_root=str(BUNDLE),
    )


@pytest.mark.parametrize(("name", "at_most"), [("pruned", 0.3), ("pruned10x", 0.1)])
def test_shipped_pruned_models_are_their_plans_applied_to_the_baseline(name, at_most):
    baseline, _, _ = load_model(SHIPPED["baseline"])
    pruned, _, checkpoint = load_model(SHIPPED[name])
    plan = (SHIPPED[name].parent / "plan.json").read_text()
    assert PruningPlan.from_json(plan) == checkpoint.plan
    assert count_parameters(pruned) < count_parameters(baseline) * at_most
    assert count_macs(pruned, (1, 1, 224, 224)) < count_macs(baseline, (1, 1, 224, 224)) * at_most


def test_shipped_10x_copy_records_the_post_processing_its_validation_chose():
    _, _, checkpoint = load_model(SHIPPED["pruned10x"])
    choice = checkpoint.state["postprocessing"]
    assert choice["largest_component"] is (choice["dice_mean_largest"] > choice["dice_mean"])
    assert checkpoint.largest_component("auto") is True


def test_shipped_10x_copy_records_the_recipe_its_model_card_names():
    _, config, _ = load_model(SHIPPED["pruned10x"])
    pruning = config.pruning
    assert (pruning.importance, pruning.scope, pruning.target_metric, pruning.target) == (
        "taylor",
        "global",
        "macs",
        0.1,
    )
    assert (pruning.reinit, pruning.retrain_epochs) == ("lr_rewind", config.training.epochs)


def test_missing_dataset_dir_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: dataset_dir is not set: pass --dataset_dir"):
        run_bundle("train.yaml", output_dir=str(tmp_path))


def test_model_that_does_not_match_the_metadata_is_refused(tmp_path, tiny_phantom):
    from acdc_prune.config import config_from_dict
    from acdc_prune.engine.checkpoints import Checkpoint

    config = config_from_dict({"model": {"features": [4, 8], "bottleneck": 8, "out_channels": 3}})
    model_file = tmp_path / "three_classes.pt"
    Checkpoint.of(UNet2D(out_channels=3, features=(4, 8), bottleneck=8), config, epoch=1).save(model_file)
    with pytest.raises(SystemExit, match="predicts 3 classes but the bundle metadata declares 4"):
        run_bundle(
            "inference.yaml",
            dataset_dir=str(tiny_phantom),
            model_file=str(model_file),
            output_dir=str(tmp_path),
        )
    assert not list(tmp_path.glob("predictions-*"))


def test_bundle_command_line_errors_are_one_line(tmp_path):
    missing = tmp_path / "nothing.pt"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.yaml",
            "--dataset_dir",
            str(tmp_path),
            "--model_file",
            str(missing),
        ],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"error: checkpoint or run folder {missing} does not exist"
    assert "Traceback" not in done.stderr


def test_acdc_prune_evaluate_accepts_a_shipped_model(tiny_phantom, tmp_path):
    from typer.testing import CliRunner

    from acdc_prune.cli import app

    out = tmp_path / "eval"
    overrides = ["evaluation.latency_repeats=2", "evaluation.latency_warmup=0", "evaluation.overlays=0"]
    args = ["evaluate", str(SHIPPED["pruned"]), "--data", str(tiny_phantom), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *(f"--set={o}" for o in overrides)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_volumes"] == 10
    assert summary["cost"]["params"] == count_parameters(load_model(SHIPPED["pruned"])[0])
