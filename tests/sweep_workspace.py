"""A tiny baseline trained on the test phantom, with its config file, for the sweep tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from acdc_prune.config import config_from_dict
from acdc_prune.engine.trainer import train


def trained_baseline(root: Path, phantom: Path, **sections: dict[str, Any]) -> Path:
    """Train a 3-level U-Net (widths 8-32, 64x64 crops at 3 mm, one CPU thread) on ``phantom`` into
    ``root/baseline`` and write its config to ``root/base.yaml``; returns the run folder.

    Args:
        root: the working folder (runs under ``root/runs``, cache under ``root/cache``).
        phantom: a phantom data set (2 of its 5 patients validate).
        sections: config keys per section (``training={"epochs": 2}``), merged into the defaults.
    """
    config: dict[str, dict[str, Any]] = {
        "data": {
            "root": str(phantom),
            "val_fraction": 0.4,
            "cache_dir": str(root / "cache"),
            "target_spacing": [3.0, 3.0],
            "patch_size": [64, 64],
        },
        "model": {"features": [8, 16, 32]},
        "training": {"batch_size": 4, "lr": 3e-3, "num_threads": 1, "device": "cpu"},
        "pruning": {},
        "evaluation": {"batch_size": 8, "overlays": 0, "latency_repeats": 1, "latency_warmup": 0},
        "logging": {
            "runs_dir": str(root / "runs"),
            "experiment": "t",
            "progress": False,
            "tensorboard": False,
        },
    }
    for section, keys in sections.items():
        config[section].update(keys)
    torch.set_num_threads(1)
    run_dir = train(config_from_dict(config), run_dir=root / "baseline").run_dir
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return run_dir
