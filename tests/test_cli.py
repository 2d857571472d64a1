"""The command line: fast help, every command listed, one-line errors with a non-zero exit."""

import subprocess
import sys

import yaml
from typer.testing import CliRunner

from acdc_prune.cli import app

runner = CliRunner()
COMMANDS = ("demo", "train", "evaluate", "prune", "inspect", "sweep", "data", "config")


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from acdc_prune.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); print(r.output); "
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in output
    assert output.strip().endswith("NOTORCH")


def test_every_command_has_an_example():
    for command in ("demo", "train", "evaluate", "prune", "inspect", "sweep"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        assert "Example:" in result.output, command
    for group, command in (("data", "check"), ("data", "synth"), ("config", "show")):
        assert "Example:" in runner.invoke(app, [group, command, "--help"]).output


def test_config_show_applies_overrides():
    result = runner.invoke(app, ["config", "show", "--set", "training.epochs=3"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["training"]["epochs"] == 3


def test_config_typo_is_one_line_with_suggestion():
    result = runner.invoke(app, ["config", "show", "--set", "training.lrr=0.1"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: unknown config key 'training.lrr': did you mean 'training.lr'?"


def test_data_synth_then_check(tmp_path):
    out = tmp_path / "phantom"
    result = runner.invoke(app, ["data", "synth", str(out), "--patients", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["patient001", "patient002"]
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output


def test_data_check_reports_problems_and_fails(tmp_path):
    out = tmp_path / "phantom"
    runner.invoke(app, ["data", "synth", str(out), "--patients", "2"])
    label = next(out.glob("patient001/*_gt.nii.gz"))
    label.write_bytes(label.read_bytes()[:100])
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 1
    assert label.name in result.output
    assert "Traceback" not in result.output


def test_missing_data_folder_is_a_problem_not_a_crash(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert f"problem: {tmp_path / 'nope'}: data folder not found" in result.output
    assert "unexpected" not in result.output
