"""The Checkpoint type: round trip, run folders, pruned networks, one-line errors for misfit files."""

from __future__ import annotations

import pytest
import torch

from acdc_prune.config import config_from_dict
from acdc_prune.engine.checkpoints import Checkpoint, load_model, read_checkpoint, resolve_checkpoint
from acdc_prune.errors import CheckpointError
from acdc_prune.models import build_model
from acdc_prune.pruning import PruningPlan, apply_plan, plan_pruning


def _config(features=(8, 16)):
    return config_from_dict({"model": {"features": list(features)}})


def _saved(tmp_path, name="best.pt", features=(8, 16)):
    config = _config(features)
    torch.manual_seed(0)
    model = build_model(config.model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    Checkpoint.of(model, config, epoch=3, state={"best_dice": 0.5}).save(tmp_path / name)
    return model, config


def test_round_trip_from_a_file_and_from_a_run_folder(tmp_path):
    model, config = _saved(tmp_path)
    for source in (tmp_path / "best.pt", tmp_path):
        loaded, loaded_config, checkpoint = load_model(source)
        assert loaded_config == config
        assert checkpoint.epoch == 3 and checkpoint.state == {"best_dice": 0.5} and checkpoint.plan is None
        assert checkpoint.path == tmp_path / "best.pt" and checkpoint.run_dir == tmp_path
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
    x = torch.randn(1, 1, 16, 16)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_run_folder_names_a_checkpoint(tmp_path):
    _saved(tmp_path, "epoch5.pt")
    assert resolve_checkpoint(tmp_path, "epoch5") == tmp_path / "epoch5.pt"
    with pytest.raises(CheckpointError, match=r"has no best\.pt \(checkpoints there: epoch5\)"):
        load_model(tmp_path)


def test_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere.pt")


def test_other_architecture_is_refused_in_one_line(tmp_path):
    _, config = _saved(tmp_path)
    checkpoint = read_checkpoint(tmp_path / "best.pt")
    checkpoint["config"]["model"]["features"] = [8, 24]
    torch.save(checkpoint, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "other.pt")
    message = str(info.value)
    assert "does not fit model 'unet'" in message and "\n" not in message
    assert "in the file but" in message and "more differences" in message


def test_truncated_file_is_refused(tmp_path):
    _saved(tmp_path)
    data = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_model(tmp_path / "cut.pt")


def test_a_plain_state_dict_is_not_ours(tmp_path):
    torch.save(build_model(_config().model).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an acdc-prune checkpoint"):
        load_model(tmp_path / "foreign.pt")
    torch.save({"model": {}, "epoch": 1}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing keys: format, version, config"):
        load_model(tmp_path / "partial.pt")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*pickled\.pt: .*refused for safety"):
        load_model(tmp_path / "pickled.pt")


def test_pruned_model_is_rebuilt_from_its_plan(tmp_path):
    config = _config((8, 16, 32))
    model = build_model(config.model).eval()
    plan = plan_pruning(model, torch.randn(1, 1, 32, 32), ratios={"default": 0.5})
    pruned = apply_plan(model, plan)
    Checkpoint.of(pruned, config, epoch=1, plan=plan).save(tmp_path / "best.pt")
    loaded, _, opened = load_model(tmp_path)
    assert opened.plan == plan
    checkpoint = read_checkpoint(tmp_path / "best.pt")
    assert checkpoint["plan"] == plan.to_json()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned(x))
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    checkpoint["plan"] = PruningPlan.from_dict({**plan.to_dict(), "model_class": "Other"}).to_json()
    torch.save(checkpoint, tmp_path / "wrong-plan.pt")
    with pytest.raises(CheckpointError, match="pruning plan does not apply"):
        load_model(tmp_path / "wrong-plan.pt")


def test_invalid_stored_config_is_a_checkpoint_error(tmp_path):
    _saved(tmp_path)
    checkpoint = read_checkpoint(tmp_path / "best.pt")
    checkpoint["config"]["model"]["widths"] = [8]
    torch.save(checkpoint, tmp_path / "badconfig.pt")
    with pytest.raises(CheckpointError, match="stored config is invalid"):
        load_model(tmp_path / "badconfig.pt")


def test_saving_is_atomic_and_reopening_gives_the_same_checkpoint(tmp_path):
    model, config = _saved(tmp_path)
    opened = Checkpoint.open(tmp_path)
    again = Checkpoint.open(opened.save(tmp_path / "copy.pt"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (again.config, again.epoch, again.state, again.plan) == (config, 3, {"best_dice": 0.5}, None)
    assert all(torch.equal(again.weights[k], v) for k, v in model.state_dict().items())


def test_a_corrupt_plan_is_named(tmp_path):
    _saved(tmp_path)
    checkpoint = read_checkpoint(tmp_path / "best.pt")
    checkpoint["plan"] = "{not json"
    torch.save(checkpoint, tmp_path / "bad-plan.pt")
    with pytest.raises(CheckpointError, match=r"bad-plan\.pt: its pruning plan is invalid"):
        Checkpoint.open(tmp_path / "bad-plan.pt")
