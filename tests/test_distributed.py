"""Multi-process training: batch shards, and a 2-process CPU (gloo) torchrun run of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml
from test_training import tiny_config
from torch.utils.data import RandomSampler

from acdc_prune.config import ModelConfig
from acdc_prune.engine.checkpoints import load_model, read_checkpoint
from acdc_prune.engine.distributed import ShardSampler, current_ranks, wrap_model
from acdc_prune.engine.precision import resolve_precision
from acdc_prune.engine.steps import make_train_loader
from acdc_prune.errors import ConfigError
from acdc_prune.models import build_model

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)

CHECKPOINT_KEYS = {
    "format",
    "version",
    "model",
    "config",
    "epoch",
    "optimizer",
    "scheduler",
    "scaler",
    "history",
    "best_dice",
    "best_epoch",
    "postprocessing",
}


def _global_sampler(seed: int) -> RandomSampler:
    return RandomSampler(range(10), num_samples=5 * 6, generator=torch.Generator().manual_seed(seed))


def test_rank_shares_are_disjoint_and_together_form_the_single_process_batches():
    single = list(_global_sampler(3))
    shares = [list(ShardSampler(_global_sampler(3), 6, rank, 3)) for rank in range(3)]
    assert all(len(share) == len(ShardSampler(_global_sampler(3), 6, 0, 3)) == 10 for share in shares)
    for step in range(5):
        parts = [share[2 * step : 2 * step + 2] for share in shares]
        assert sum(parts, []) == single[6 * step : 6 * step + 6]
    with pytest.raises(ConfigError, match="multiple of the 4 processes"):
        ShardSampler(_global_sampler(3), 6, 0, 4)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = current_ranks()
    assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.distributed) == (0, 1, True, False)
    model = build_model(ModelConfig(features=[8, 16]))
    assert wrap_model(model, torch.device("cpu")) is model
    loader = make_train_loader(list(range(12)), 4, 3, 0, 0, False)
    assert [len(batch) for batch in loader] == [4, 4, 4]


@needs_gloo
def test_torchrun_two_cpu_processes_train_one_run_that_loads_in_one_process(tmp_path, tiny_phantom):
    config = tiny_config(tmp_path, tiny_phantom, epochs=2)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "acdc_prune",
        "train",
        "--config",
        str(config_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = list((tmp_path / "runs" / "t").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    # Rank 0 alone prints: one line per epoch and one summary.
    assert done.stdout.count("epoch 1/2  loss") == 1 and done.stdout.count("epoch 2/2  loss") == 1
    assert done.stdout.count("best mean foreground Dice") == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert all(row["dice_mean"] is not None for row in metrics["epochs"])
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "epoch1.pt", "last.pt"]
    for name in ("config.yaml", "split.json", "metrics.csv", "curves.png"):
        assert (run / name).is_file(), name

    last = read_checkpoint(run / "last.pt")
    assert set(last) == CHECKPOINT_KEYS and last["epoch"] == 2 and len(last["history"]) == 2
    assert last["model"].keys() == build_model(config.model).state_dict().keys()  # no "module." prefix
    # the run records the precision it resolved (every rank resolves the same: one CPU)
    training = config.training
    resolved = resolve_precision(training.precision, training.channels_last, torch.device("cpu"))
    config.training.precision, config.training.channels_last = resolved.name, resolved.channels_last
    config.evaluation.precision, config.evaluation.channels_last = resolved.name, resolved.channels_last
    for name in ("best", "last"):
        model, stored, checkpoint = load_model(run, name)
        assert stored == config and checkpoint.epoch in (1, 2)
        assert model.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)
