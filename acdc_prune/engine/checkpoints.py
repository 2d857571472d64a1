"""Checkpoints: atomic save, safe load, validation, and rebuilding the (possibly pruned) model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_prune.config import Config, config_from_dict
from acdc_prune.errors import AcdcPruneError, CheckpointError
from acdc_prune.io import atomic_torch_save, safe_torch_load
from acdc_prune.models import build_model

FORMAT = "acdc-prune-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "config", "epoch")


def save_checkpoint(
    path: Path,
    model: nn.Module,
    config: Config,
    *,
    epoch: int,
    state: dict[str, Any] | None = None,
    plan_json: str | None = None,
) -> None:
    """Write a checkpoint atomically (a crash never leaves a truncated file).

    Args:
        path: destination ``.pt`` file.
        model: the network whose ``state_dict`` is stored.
        config: the run's resolved config, stored as a plain dict.
        epoch: number of completed epochs.
        state: further plain entries (optimiser, scheduler and scaler state dicts, best Dice, history).
        plan_json: JSON pruning plan when ``model`` is a pruned network; loading rebuilds it from the plan.
    """
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict(),
        "config": config.to_dict(),
        "epoch": int(epoch),
        **(state or {}),
    }
    if plan_json is not None:
        checkpoint["plan"] = plan_json
    atomic_torch_save(Path(path), checkpoint)


def resolve_checkpoint(path_or_run_dir: str | Path, name: str = "best") -> Path:
    """The checkpoint file meant by ``path_or_run_dir``: a ``.pt`` file, or ``<run folder>/<name>.pt``.

    Args:
        path_or_run_dir: a checkpoint file or a run folder.
        name: checkpoint name inside a run folder (``best``, ``last``, ``epoch5``...).

    Raises:
        CheckpointError: neither an existing file nor a run folder holding ``<name>.pt``.
    """
    path = Path(path_or_run_dir)
    if path.is_dir():
        candidate = path / f"{name}.pt"
        if not candidate.is_file():
            present = sorted(p.stem for p in path.glob("*.pt"))
            listing = ", ".join(present) if present else "none"
            raise CheckpointError(f"run folder {path} has no {name}.pt (checkpoints there: {listing})")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint or run folder {path} does not exist")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``) and check it is one of ours.

    Raises:
        CheckpointError: missing, truncated, not plain data, or lacking the keys this project writes.
    """
    path = Path(path)
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not an acdc-prune checkpoint (it holds a {type(checkpoint).__name__})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing or checkpoint["format"] != FORMAT:
        what = f"missing keys: {', '.join(missing)}" if missing else f"format '{checkpoint['format']}'"
        raise CheckpointError(f"{path} is not an acdc-prune checkpoint ({what})")
    if checkpoint["version"] > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {checkpoint['version']}; this version reads {VERSION}"
        )
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any], path: str | Path) -> Config:
    """The :class:`Config` stored in a checkpoint read by :func:`read_checkpoint`."""
    try:
        return config_from_dict(checkpoint["config"])
    except AcdcPruneError as err:
        raise CheckpointError(f"{path}: stored config is invalid ({err})") from None


def _check_fits(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Refuse a state dict whose keys or shapes differ from ``model``'s, naming the first difference."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = len(missing) + len(unexpected) + len(wrong)
    if not problems:
        return
    if wrong:
        key = wrong[0]
        shapes = tuple(state_dict[key].shape), tuple(expected[key].shape)
        first = f"{key} is {shapes[0]} in the file but {shapes[1]} in the model"
    elif missing:
        first = f"{missing[0]} is missing from the file"
    else:
        first = f"{unexpected[0]} is not in the model"
    more = f" (and {problems - 1} more differences)" if problems > 1 else ""
    raise CheckpointError(f"checkpoint {path} does not fit model '{name}': {first}{more}")


def rebuild_model(checkpoint: dict[str, Any], config: Config, path: str | Path) -> nn.Module:
    """Build the architecture a checkpoint was saved from and load its weights (on the CPU).

    A checkpoint with a ``plan`` entry holds a pruned network: the full architecture is built from
    ``config.model`` and shrunk with ``acdc_prune.pruning.apply_plan`` before the weights load.

    Raises:
        CheckpointError: the weights do not fit the architecture (other network, widths or plan).
    """
    path = Path(path)
    model = build_model(config.model)
    if "plan" in checkpoint:
        from acdc_prune.pruning import PruningPlan, apply_plan

        try:
            model = apply_plan(model, PruningPlan.from_json(checkpoint["plan"]))
        except AcdcPruneError as err:
            raise CheckpointError(f"{path}: its pruning plan does not apply to the model ({err})") from None
    _check_fits(model, checkpoint["model"], path, config.model.name)
    model.load_state_dict(checkpoint["model"])
    return model


def load_model(path_or_run_dir: str | Path, name: str = "best") -> tuple[nn.Module, Config, dict[str, Any]]:
    """Load a trained (or pruned and retrained) model from a checkpoint file or a run folder.

    Args:
        path_or_run_dir: a ``.pt`` file, or a run folder (its ``<name>.pt`` is used).
        name: checkpoint inside a run folder; ``best`` by default.

    Returns:
        ``(model, config, checkpoint)``: the network on the CPU with its weights, the run's config, and
        the raw checkpoint dict (``epoch``, ``best_dice``, optional ``plan``...).

    Raises:
        CheckpointError: missing, truncated, foreign, or of another architecture (one-line message).
    """
    path = resolve_checkpoint(path_or_run_dir, name)
    checkpoint = read_checkpoint(path)
    config = checkpoint_config(checkpoint, path)
    return rebuild_model(checkpoint, config, path), config, checkpoint
