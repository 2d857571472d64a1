"""Sweeps over criteria, scopes and budget targets: parsing, one-line errors, names, report, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sweep_workspace import trained_baseline
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import PruningConfig, from_mapping, load_config
from acdc_prune.errors import ConfigError
from acdc_prune.experiments import report
from acdc_prune.experiments.report_plots import CRITERION_COLORS, MODE_STYLES, pareto_series
from acdc_prune.experiments.sweep import SweepConfig, load_sweep, plan_sweep, run_sweep, sweep_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BUNDLE_RECIPE = CONFIGS.parent / "bundles" / "acdc_unet_prune" / "configs" / "recipe.yaml"


def _plan(tmp_path, **keys):
    """The plan of a sweep writing under ``tmp_path/runs`` with the given keys."""
    raw = {"name": "s", "overrides": [f"logging.runs_dir={tmp_path / 'runs'}"], "modes": ["none"], **keys}
    return plan_sweep(from_mapping(SweepConfig, raw), tmp_path)


def test_criteria_scopes_and_targets_cross_into_readable_arm_names(tmp_path):
    plan = _plan(
        tmp_path,
        uniform=[0.5],
        criteria=["l1"],
        scopes=["block", "global"],
        grids=[{"criteria": ["taylor", "bn_scale"], "targets": {"macs": [0.1], "params": [0.25]}}],
        modes=["none", "lr_rewind"],
        seeds=[0],
    )
    assert [arm.name for arm in plan.arms] == [
        "l1-block-uniform-0.5-none-s0",
        "l1-block-uniform-0.5-lr_rewind-s0",
        "l1-global-uniform-0.5-none-s0",
        "l1-global-uniform-0.5-lr_rewind-s0",
        "taylor-global-macs0.1-none-s0",
        "taylor-global-macs0.1-lr_rewind-s0",
        "taylor-global-params0.25-none-s0",
        "taylor-global-params0.25-lr_rewind-s0",
        "bn_scale-global-macs0.1-none-s0",
        "bn_scale-global-macs0.1-lr_rewind-s0",
        "bn_scale-global-params0.25-none-s0",
        "bn_scale-global-params0.25-lr_rewind-s0",
    ]
    target = plan.arms[4]
    assert target.group == "taylor-global-macs0.1-none"
    assert target.prune_kwargs["ratios"] is None and target.prune_kwargs["reinit"] == "none"
    assert target.overrides[-6:] == [
        'pruning.importance="taylor"',
        'pruning.scope="global"',
        "pruning.target=0.1",
        'pruning.target_metric="macs"',
        "pruning.steps=1",
        "training.seed=0",
    ]
    uniform = plan.arms[2]
    assert uniform.prune_kwargs["ratios"] == {"default": 0.5}
    assert uniform.overrides[-4:] == [
        'pruning.importance="l1"',
        'pruning.scope="global"',
        "pruning.target=null",
        "training.seed=0",
    ]
    assert target.entry() | {"dir": None, "overrides": None} == {
        "name": "taylor-global-macs0.1-none-s0",
        "group": "taylor-global-macs0.1-none",
        "mode": "none",
        "seed": 0,
        "setting": "taylor-global-macs0.1",
        "criterion": "taylor",
        "scope": "global",
        "ratios": None,
        "target_metric": "macs",
        "target": 0.1,
        "steps": 1,
        "dir": None,
        "overrides": None,
    }


def test_steps_cross_with_targets_into_one_shot_and_iterative_arms(tmp_path):
    plan = _plan(tmp_path, targets={"macs": [0.1]}, steps=[1, 3])
    assert [arm.name for arm in plan.arms] == ["l1-global-macs0.1-none", "l1-global-macs0.1-3steps-none"]
    assert plan.arms[1].overrides[-1] == "pruning.steps=3"
    assert plan.arms[1].setting.labels()["steps"] == 3
    from_config = _plan(tmp_path, targets={"macs": [0.1]}, overrides=["pruning.steps=2"])
    assert [arm.name for arm in from_config.arms] == ["l1-global-macs0.1-2steps-none"]
    with pytest.raises(ConfigError, match=r"^grids\[0\]\.steps: steps lead to a target; give targets"):
        _plan(tmp_path, grids=[{"uniform": [0.5], "steps": [2]}])


def test_ratios_only_sweeps_keep_their_names_and_take_the_base_configs_criterion(tmp_path):
    plan = _plan(tmp_path, ratios={"blockwise": {"default": 0.5, "encoders.0": 0.25}}, uniform=[0.25])
    assert [arm.name for arm in plan.arms] == ["blockwise-none", "uniform-0.25-none"]
    assert [arm.name for arm in _plan(tmp_path).arms] == ["half-none"]
    taylor = _plan(tmp_path, overrides=[f"logging.runs_dir={tmp_path}", "pruning.importance=taylor"])
    setting = taylor.arms[0].setting
    assert (setting.name, setting.criterion, setting.scope, setting.ratios) == (
        "half",
        "taylor",
        "block",
        {"default": 0.5},
    )
    only_grids = _plan(tmp_path, grids=[{"targets": {"latency": [0.5]}}])
    assert [arm.name for arm in only_grids.arms] == ["l1-global-latency0.5-none"]


def test_the_example_criteria_study_compares_uniform_l1_with_global_criteria_at_equal_budgets(tmp_path):
    sweep, base_dir = load_sweep(CONFIGS / "sweep-criteria.yaml")
    sweep.overrides = [f"logging.runs_dir={tmp_path}"]
    plan = plan_sweep(sweep, base_dir)
    names = [arm.name for arm in plan.arms]
    uniform = [f"l1-block-uniform-{r}-lr_rewind" for r in (0.5, 0.7, 0.8)]
    targets = [
        f"{c}-global-macs{t}-lr_rewind"
        for c in ("l1", "taylor", "bn_scale", "redundancy")
        for t in (0.25, 0.1, 0.05)
    ]
    assert names == uniform + targets
    assert plan.base.logging.experiment == "acdc-cpu" and plan.base.model.features == [16, 32, 64, 128, 256]
    assert {arm.prune_kwargs["retrain_epochs"] for arm in plan.arms} == {8}


def test_the_short_acdc_study_names_its_arms_and_its_sensitivity_ratios_name_real_blocks():
    import torch

    from acdc_prune.experiments.sensitivity import prunable_blocks
    from acdc_prune.models.registry import build_model

    sweep, _ = load_sweep(CONFIGS / "acdc-criteria-short.yaml")
    names = [setting.name for setting in sweep_settings(sweep)]
    global_arms = [
        f"{c}-global-macs{t}" for c in ("l1", "taylor", "bn_scale", "redundancy") for t in (0.25, 0.1, 0.05)
    ]
    sensitivity = [f"l1-block-sens-macs{t}" for t in (0.25, 0.1, 0.05)]
    uniform = [f"l1-block-uniform-{r}" for r in (0.5, 0.7, 0.78)]
    assert names == [*sensitivity, *uniform, *global_arms]
    recipe = load_config(BUNDLE_RECIPE)
    blocks = prunable_blocks(build_model(recipe.model), torch.zeros(1, 1, 32, 32))
    for ratios in sweep.ratios.values():
        assert sorted(ratios) == sorted(blocks)


@pytest.mark.parametrize(
    ("config", "arms", "modes", "seeds"),
    [
        ("acdc-smallest.yaml", ["taylor-global-macs0.1", "taylor-global-macs0.05"], ["lr_rewind"], []),
        ("acdc-fastest.yaml", ["taylor-global-macs0.085"], ["lr_rewind"], []),
        ("acdc-modes-full.yaml", ["taylor-global-macs0.1"], ["lr_rewind", "none", "random"], [0, 1, 2]),
        ("acdc-finetune.yaml", ["taylor-global-macs0.1"], ["none"], [0, 1]),
    ],
)
def test_the_smallest_network_studies_retrain_for_the_baselines_whole_schedule(config, arms, modes, seeds):
    sweep, _ = load_sweep(CONFIGS / config)
    assert [setting.name for setting in sweep_settings(sweep)] == arms
    recipe = load_config(BUNDLE_RECIPE)
    assert (sweep.modes, sweep.seeds) == (modes, seeds)
    assert sweep.retrain_epochs == recipe.training.epochs == 16
    assert sweep.baseline == "runs/bundle-base/v1"


def test_the_fine_tuning_study_retrains_at_a_tenth_of_the_baselines_peak_rate():
    sweep, _ = load_sweep(CONFIGS / "acdc-finetune.yaml")
    assert sweep.retrain_lr == pytest.approx(load_config(BUNDLE_RECIPE).training.lr / 10)


def test_the_demo_prunes_to_a_mac_target_and_rewinds_to_a_checkpoint_its_baseline_keeps(tmp_path):
    sweep, base_dir = load_sweep(CONFIGS / "demo-sweep.yaml")
    sweep.overrides = [f"logging.runs_dir={tmp_path}"]
    plan = plan_sweep(sweep, base_dir)
    assert [arm.name for arm in plan.arms] == [
        f"l1-global-macs0.4-{m}" for m in ("none", "lr_rewind", "rewind")
    ]
    training, pruning = plan.base.training, plan.base.pruning
    assert pruning.rewind_to == f"epoch{training.checkpoint_epochs[0]}"
    assert pruning.retrain_epochs == training.epochs - training.checkpoint_epochs[0]  # rewind: the rest


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"criteria": ["l1", "l3"]},
            "criteria[1]: 'l3' is not one of l1, l2, bn_scale, taylor, redundancy (register new criteria "
            "with acdc_prune.pruning.register_importance)",
        ),
        ({"targets": {"macs": [0.0]}}, "targets.macs[0]: 0.0 is out of range (must be > 0.0)"),
        ({"targets": {"macs": [0.1, 1.5]}}, "targets.macs[1]: 1.5 is out of range (must be <= 1.0)"),
        (
            {"grids": [{"targets": {"flops": [0.1]}}]},
            "grids[0].targets: 'flops' is not one of macs, params, latency",
        ),
        ({"scopes": ["row"]}, "scopes[0]: 'row' is not one of block, global"),
        (
            {"ratios": {"mixed": {"default": 0.5, "encoders.1": 0.7}}, "scopes": ["global"]},
            "ratios.mixed: global scope takes one ratio for the whole network (default only), not block keys",
        ),
        (
            {"grids": [{"targets": {"macs": [0.1]}, "scopes": ["block"]}]},
            "grids[0].scopes: targets always rank channels globally; scopes apply to ratios and uniform",
        ),
        (
            {"targets": {"macs": [0.1, 0.1]}},
            "setting 'l1-global-macs0.1' comes twice; list each criterion, scope, ratio and target once",
        ),
        ({"grids": [{"criteria": ["l1"]}]}, "grids[0] names no ratios, uniform or targets; give one"),
        (
            {"criteria": ["l1"], "grids": [{"targets": {"macs": [0.1]}}]},
            "the top level of the sweep file names no ratios, uniform or targets; give one",
        ),
        ({"grids": [{"criterion": ["l1"]}]}, "unknown config key 'grids[0].criterion': did you mean"),
    ],
)
def test_bad_keys_are_one_line_and_nothing_is_written(tmp_path, keys, message):
    sweep_file = tmp_path / "sweep.yaml"
    raw = {"name": "s", "overrides": [f"logging.runs_dir={tmp_path / 'runs'}"], "modes": ["none"], **keys}
    sweep_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["sweep", "-c", str(sweep_file)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {message}"), lines[0]
    assert not (tmp_path / "runs").exists()


def test_an_unknown_criterion_of_the_base_config_is_refused_before_anything_runs():
    sweep = from_mapping(SweepConfig, {"name": "s"})
    with pytest.raises(ConfigError, match=r"pruning.importance of the base config: 'magic' is not one of l1"):
        sweep_settings(sweep, PruningConfig(importance="magic"))


def _run(tmp_path, arm, setting, mode, volume_dice, params, **labels):
    """A ReportRun of one seed with a per-volume table of 6 patients x (ED, ES) and a matching summary."""
    patients = [f"patient{i:03d}" for i in range(1, 7)]
    table = pd.DataFrame({"patient": [p for p in patients for _ in range(2)], "mean_dice": volume_dice})
    path = tmp_path / f"{arm}.csv"
    table.to_csv(path, index=False)
    summary = {"mean_dice": float(np.mean(volume_dice)), "cost": {"params": params, "macs": 10 * params}}
    before = None if mode == "baseline" else {"mean_dice": 0.1}
    return report.ReportRun(arm, arm, setting, mode, None, summary, before, path, **labels)


def test_the_report_names_criterion_scope_and_target_and_pairs_criteria_at_one_budget(tmp_path):
    base = np.linspace(0.80, 0.91, 12)
    global_macs = {"scope": "global", "target_metric": "macs", "target": 0.1, "steps": 1}
    runs = [
        _run(tmp_path, "baseline", "-", "baseline", base, 1000),
        _run(tmp_path, "l1-block-uniform-0.7-none", "l1-block-uniform-0.7", "none", base - 0.04, 110,
             criterion="l1", scope="block", ratios="uniform-0.7"),
        _run(tmp_path, "l1-global-macs0.1-none", "l1-global-macs0.1", "none", base - 0.03, 100,
             criterion="l1", **global_macs),
        _run(tmp_path, "taylor-global-macs0.1-none", "taylor-global-macs0.1", "none", base - 0.01, 100,
             criterion="taylor", **global_macs),
    ]  # fmt: skip
    out = tmp_path / "report"
    report.write_report(runs, out)
    summary = pd.read_csv(out / "summary.csv")
    assert summary.columns[:10].tolist() == [
        "arm",
        "setting",
        "mode",
        "criterion",
        "scope",
        "ratios",
        "target_metric",
        "target",
        "steps",
        "n_seeds",
    ]
    rows = summary.set_index("arm")
    assert rows.loc["taylor-global-macs0.1-none", ["criterion", "scope", "target_metric"]].tolist() == [
        "taylor",
        "global",
        "macs",
    ]
    assert rows.loc["taylor-global-macs0.1-none", "target"] == pytest.approx(0.1)
    assert rows.loc["taylor-global-macs0.1-none", "steps"] == 1
    assert rows.loc["l1-block-uniform-0.7-none", "ratios"] == "uniform-0.7"
    assert pd.isna(rows.loc["l1-block-uniform-0.7-none", "target"])
    assert rows.loc[["baseline"], ["criterion", "scope", "ratios", "target"]].isna().all(axis=None)
    assert rows.loc["taylor-global-macs0.1-none", "macs_pct"] == pytest.approx(10.0)
    significance = pd.read_csv(out / "significance.csv")
    assert [tuple(r) for r in significance[["setting", "a", "b"]].to_numpy()] == [
        ("l1-block-uniform-0.7", "l1-block-uniform-0.7-none", "baseline"),
        ("l1-global-macs0.1", "l1-global-macs0.1-none", "baseline"),
        ("taylor-global-macs0.1", "taylor-global-macs0.1-none", "baseline"),
        ("macs0.1", "l1-global-macs0.1-none", "taylor-global-macs0.1-none"),
    ]
    assert significance["diff"].iloc[-1] == pytest.approx(-0.02)
    comparison = pd.read_csv(out / "comparison.csv")
    assert comparison.columns[:5].tolist() == ["arm", "setting", "mode", "params", "params_pct"]
    assert comparison["criterion"].tolist()[1:] == ["l1", "l1", "taylor"]
    baseline_md = next(line for line in (out / "summary.md").read_text().splitlines() if "| baseline" in line)
    assert "nan" not in baseline_md
    assert (out / "pareto.png").stat().st_size > 1000


def test_the_pareto_plot_colours_criteria_and_joins_a_criterions_targets(tmp_path):
    summary = pd.DataFrame(
        {
            "arm": ["baseline", "l1-a-none", "l1-b-none", "taylor-a-none", "l1-u-none"],
            "mode": ["baseline", "none", "none", "none", "none"],
            "criterion": [None, "l1", "l1", "taylor", "l1"],
            "scope": [None, "global", "global", "global", "block"],
        }
    )
    series = pareto_series(summary)
    assert [(label, len(rows)) for label, _, rows in series] == [
        ("baseline", 1),
        ("l1 global, none", 2),
        ("taylor global, none", 1),
        ("l1 block, none", 1),
    ]
    styles = [style for _, style, _ in series]
    assert styles[0] == {"color": MODE_STYLES["baseline"][0], "marker": "*", "linestyle": "none"}
    assert styles[1] == {"color": CRITERION_COLORS["l1"], "marker": "o", "linestyle": "-"}
    assert styles[2]["color"] == CRITERION_COLORS["taylor"] and styles[3]["color"] == CRITERION_COLORS["l1"]
    one_criterion = pareto_series(summary[summary["criterion"] != "taylor"].assign(scope="block"))
    assert [label for label, _, _ in one_criterion] == ["baseline", "none"]
    assert one_criterion[1][1] == {"color": MODE_STYLES["none"][0], "marker": "o", "linestyle": "--"}


def test_the_pareto_plot_joins_uniform_ratios_but_not_other_named_ratios():
    summary = pd.DataFrame(
        {
            "arm": ["baseline", "u5", "sens", "u7", "t"],
            "mode": ["baseline", "none", "none", "none", "none"],
            "criterion": [None, "l1", "l1", "l1", "l1"],
            "scope": [None, "block", "block", "block", "global"],
            "ratios": [None, "uniform-0.5", "sens-macs0.25", "uniform-0.7", None],
        }
    )
    series = pareto_series(summary)
    assert [(label, rows["arm"].tolist(), style["linestyle"]) for label, style, rows in series] == [
        ("baseline", ["baseline"], "none"),
        ("l1 block uniform, none", ["u5", "u7"], "--"),
        ("l1 block sens-macs0.25, none", ["sens"], "none"),
        ("l1 global, none", ["t"], "none"),
    ]


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory, tiny_phantom):
    """A tiny trained baseline pruned by a sweep to half its MACs, once by L1 and once by BN scale."""
    root = tmp_path_factory.mktemp("sweep-criteria")
    training = {"epochs": 1, "iterations_per_epoch": 2}
    baseline = trained_baseline(root, tiny_phantom, training=training, pruning={"calibration_batches": 2})
    sweep = {
        "name": "budget",
        "config": "base.yaml",
        "baseline": str(baseline),
        "criteria": ["l1", "bn_scale"],
        "targets": {"macs": [0.5]},
        "modes": ["none"],
        "retrain_epochs": 0,
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return run_sweep(*load_sweep(root / "sweep.yaml"), on_event=lambda event: None)


def test_a_budget_sweep_prunes_each_arm_to_its_target_with_its_criterion(budget_sweep):
    arms = budget_sweep.parent / "arms"
    names = ["l1-global-macs0.5-none", "bn_scale-global-macs0.5-none"]
    assert sorted(p.name for p in arms.iterdir()) == sorted(names)
    metas = {name: json.loads((arms / name / "meta.json").read_text()) for name in names}
    for name, criterion in zip(names, ("l1", "bn_scale"), strict=True):
        meta = metas[name]
        assert (meta["importance"], meta["scope"], meta["target_metric"], meta["target"]) == (
            criterion,
            "global",
            "macs",
            0.5,
        )
        assert meta["ratios"] is None
        assert 0.98 * 0.5 <= meta["macs_fraction_of_original"] <= 0.5
    assert metas[names[0]]["widths"] != metas[names[1]]["widths"]  # the criteria chose other channels
    summary = pd.read_csv(budget_sweep / "summary.csv").set_index("arm")
    assert summary.index.tolist() == ["baseline", *names]
    assert summary.loc[names, "criterion"].tolist() == ["l1", "bn_scale"]
    assert summary.loc[names, "scope"].tolist() == ["global", "global"]
    assert summary.loc[names, "target_metric"].tolist() == ["macs", "macs"]
    assert summary.loc[names, "target"].tolist() == [0.5, 0.5]
    for name in names:
        assert summary.loc[name, "macs_pct"] == pytest.approx(100 * metas[name]["macs_fraction_of_original"])
    significance = pd.read_csv(budget_sweep / "significance.csv")
    pairs = [tuple(row) for row in significance[["setting", "a", "b"]].to_numpy()]
    assert pairs[-1] == ("macs0.5", *names)
    manifest = json.loads((budget_sweep / "sweep.json").read_text())
    entries = {model["name"]: model for model in manifest["models"]}
    assert entries["bn_scale-global-macs0.5-none"]["criterion"] == "bn_scale"
    assert entries["baseline"]["criterion"] is None
