"""Atomic writes, safe checkpoint loading and run folders that never collide or escape."""

import os
import pickle

import pytest
import torch

from acdc_prune.errors import CheckpointError, ConfigError
from acdc_prune.io import (
    atomic_torch_save,
    atomic_write_json,
    check_name,
    new_run_dir,
    safe_torch_load,
)


def test_atomic_json_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "m.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert path.read_text() == '{\n  "x": 2\n}\n'
    assert os.listdir(path.parent) == ["m.json"]


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"x": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})
    assert path.read_text() == '{\n  "x": 1\n}\n'
    assert os.listdir(tmp_path) == ["m.json"]


def test_checkpoint_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"a": [1, 2]}}
    atomic_torch_save(tmp_path / "c.pt", state)
    loaded = safe_torch_load(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused for safety"):
        safe_torch_load(path)


def test_truncated_and_missing_checkpoints(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save(path, {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")


def test_run_dirs_are_unique(tmp_path):
    first = new_run_dir(tmp_path, "exp")
    second = new_run_dir(tmp_path, "exp")
    assert first != second
    assert first.parent == second.parent == tmp_path / "exp"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "", ".hidden"])
def test_names_cannot_escape(name):
    with pytest.raises(ConfigError, match="is not allowed"):
        check_name(name, "experiment name")
