"""Segmentation (MONAI SliceInferer) and the evaluate pipeline, end to end on a small phantom data set."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from acdc_prune.config import DataConfig, EvaluationConfig
from acdc_prune.data import VolumeDataset, discover
from acdc_prune.data.nifti import read_volume
from acdc_prune.engine import segment as segment_module
from acdc_prune.engine.evaluate import evaluate_model, summarize
from acdc_prune.engine.segment import predict_probabilities
from acdc_prune.errors import AcdcPruneError, Hint
from acdc_prune.render import error_text, evaluation_summary_table, print_evaluation

EVAL_CFG = EvaluationConfig(overlays=2, latency_repeats=2, latency_warmup=0, latency_size=[32, 32])


def _tiny_net(out_channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, out_channels, 1))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, make_phantom):
    root = make_phantom(tmp_path_factory.mktemp("eval_phantom"), 2, 0)
    data_cfg = DataConfig(cache="none", patch_size=[64, 64])
    dataset = VolumeDataset(discover(root), data_cfg, divisor=4)
    # evaluate_model takes any sequence of items: preprocess once for the whole module.
    return [dataset[i] for i in range(len(dataset))]


def test_slice_probabilities_match_a_per_slice_forward():
    net = _tiny_net().train()
    image = torch.randn(1, 12, 10, 5)
    probs = predict_probabilities(net, image, batch_size=2, device="cpu")
    assert probs.shape == (4, 12, 10, 5)
    torch.testing.assert_close(probs.sum(0), torch.ones(12, 10, 5))
    with torch.no_grad():
        net.eval()
        expected = net(image[None, :, :, :, 3]).softmax(1)[0]
    torch.testing.assert_close(probs[..., 3], expected)
    torch.testing.assert_close(predict_probabilities(net.train(), image, batch_size=5), probs)
    assert net.training


def test_mirroring_averages_the_four_flipped_predictions():
    net = _tiny_net().eval()
    image = torch.randn(1, 12, 10, 3)
    probs = predict_probabilities(net, image, batch_size=2, device="cpu", mirror=True)
    slices = image.permute(3, 0, 1, 2)  # (D, C, H, W)
    with torch.no_grad():
        flipped = [net(slices.flip(dims)).softmax(1).flip(dims) for dims in ((), (2,), (3,), (2, 3))]
    expected = (sum(flipped) / 4).permute(1, 2, 3, 0)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(0), torch.ones(12, 10, 3))
    assert not torch.allclose(probs, predict_probabilities(net, image, batch_size=2, device="cpu"))


def test_postprocessing_is_chosen_where_it_raises_the_mean_dice():
    from acdc_prune.engine.validation import postprocessing_choice

    assert postprocessing_choice({"epoch": 4, "dice_mean": 0.90, "dice_mean_largest": 0.91}) == {
        "largest_component": True,
        "epoch": 4,
        "dice_mean": 0.90,
        "dice_mean_largest": 0.91,
    }
    assert (
        postprocessing_choice({"epoch": 4, "dice_mean": 0.90, "dice_mean_largest": 0.90})["largest_component"]
        is False
    )
    assert postprocessing_choice({"epoch": 3, "dice_mean": None, "dice_mean_largest": None}) is None


def test_summary_excludes_and_counts_undefined_values():
    rows = []
    for patient, phase, rv, lv in (("a", "ED", 0.8, 0.9), ("a", "ES", math.nan, 0.7), ("b", "ED", 0.6, 0.95)):
        row = {"patient": patient, "phase": phase}
        for name, dice in (("RV", rv), ("MYO", 0.5), ("LV", lv)):
            row |= {f"{name}_{m}": dice for m in ("dice", "iou", "precision", "recall", "slice_dice")}
            row |= {f"{name}_hd": math.nan if math.isnan(dice) else 5.0}
            row |= {f"{name}_volume_pred_ml": 10.0, f"{name}_volume_gt_ml": 10.0}
        rows.append(row)
    summary = summarize(pd.DataFrame(rows), hd_percentile=95.0)
    rv = summary["all"]["RV"]["dice"]
    assert rv["mean"] == pytest.approx(0.7) and rv["n"] == 2 and rv["excluded"] == 1
    assert summary["phases"]["ES"]["RV"]["dice"] == {
        "mean": None,
        "std": None,
        "median": None,
        "n": 0,
        "excluded": 1,
    }
    assert summary["mean_dice"] == pytest.approx((0.7 + 0.5 + (0.9 + 0.7 + 0.95) / 3) / 3)
    assert summary["phases"]["ES"]["mean_dice"] == pytest.approx((0.5 + 0.7) / 2)
    assert (summary["n_volumes"], summary["n_patients"]) == (3, 2)
    json.dumps(summary, allow_nan=False)


def test_evaluate_writes_every_output(phantom, tmp_path):
    cfg = dataclasses.replace(EVAL_CFG, save_predictions=True)
    result = evaluate_model(_tiny_net(), phantom, cfg, tmp_path, "cpu")
    table = pd.read_csv(tmp_path / "per_volume.csv")
    assert len(table) == 4 and set(table["phase"]) == {"ED", "ES"}
    for column in ("RV_dice", "MYO_hd", "LV_slice_dice", "LV_volume_gt_ml", "mean_dice", "case"):
        assert column in table.columns
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["phases"]) == {"ED", "ES"}
    assert summary["cost"]["params"] == 4 * 9 + 4 + 4 * 4 + 4
    assert summary["cost"]["macs"] == (9 * 4 + 4 * 4) * 32 * 32
    assert len(pd.read_csv(tmp_path / "clinical.csv")) == 2
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2
    for row in result.per_volume.itertuples():
        pred, pred_affine = read_volume(tmp_path / "predictions" / f"{row.case}.nii.gz")
        record = next(
            item["record"]
            for item in phantom
            if item["record"].patient == row.patient and item["record"].phase == row.phase
        )
        gt, gt_affine = read_volume(record.label)
        assert pred.shape == gt.shape
        np.testing.assert_allclose(pred_affine, gt_affine, atol=1e-4)
        assert set(np.unique(pred)) <= {0, 1, 2, 3}
    console = Console(record=True, width=160)
    print_evaluation(result, console)
    text = console.export_text()
    assert "HD95 (mm)" in text and "LV_EF" in text and "Parameters" in text


def test_oracle_probabilities_score_near_perfect_in_original_geometry(phantom, monkeypatch):
    """One-hot of the preprocessed label, mapped back, must agree with the original label file."""

    def oracle(model, image, batch_size, device, precision, mirror):
        label = next(item["label"] for item in phantom if item["image"] is image)
        return F.one_hot(label[0].as_tensor().long(), 4).permute(3, 0, 1, 2).float()

    monkeypatch.setattr(segment_module, "predict_probabilities", oracle)
    result = evaluate_model(_tiny_net(), phantom, EVAL_CFG, None, "cpu")
    for name in ("RV", "MYO", "LV"):
        assert result.per_volume[f"{name}_dice"].min() > 0.9
    assert result.summary["clinical"]["LV_EF"]["mae"] < 5.0
    assert evaluation_summary_table(result).row_count == 9


def test_model_with_wrong_classes_is_refused(phantom):
    with pytest.raises(AcdcPruneError, match="predicts 3 classes but segmentation needs 4"):
        evaluate_model(_tiny_net(out_channels=3), phantom, EVAL_CFG, None, "cpu")


def test_keep_largest_components_removes_islands_per_structure():
    from acdc_prune.engine.segment import keep_largest_components

    labels = np.zeros((12, 12, 4), dtype=np.uint8)
    labels[2:6, 2:6, :] = 3  # the LV, through all slices
    labels[10, 10, 1] = 3  # a stray LV island
    labels[6:8, 2:6, 1:3] = 2  # myocardium touching the LV: a component of its own label
    labels[0, 11, 3] = 2  # a stray myocardium voxel
    labels[9:11, 0:2, 0] = 1  # an RV with no rival stays
    kept = keep_largest_components(labels)
    expected = labels.copy()
    expected[10, 10, 1] = 0
    expected[0, 11, 3] = 0
    np.testing.assert_array_equal(kept, expected)
    assert kept.dtype == labels.dtype
    np.testing.assert_array_equal(keep_largest_components(np.zeros((3, 3, 3), np.uint8)), 0)


def test_out_of_memory_during_inference_names_the_batch_size_to_lower():
    from acdc_prune.errors import ResourceError

    class OutOfMemory(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(ResourceError, match=r"evaluation.batch_size 16 .*lower it") as caught:
        predict_probabilities(OutOfMemory(), torch.zeros(1, 32, 32, 3), batch_size=16)
    assert caught.value.hint == Hint("evaluation.batch_size", 8)
    assert error_text(caught.value).endswith("lower it; e.g. --set evaluation.batch_size=8")
