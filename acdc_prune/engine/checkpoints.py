"""Checkpoints: the ``Checkpoint`` type that opens, rebuilds and atomically saves a (pruned) model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_prune.config import Config, config_from_dict
from acdc_prune.engine.segment import resolve_largest_component
from acdc_prune.errors import AcdcPruneError, CheckpointError
from acdc_prune.io import atomic_torch_save, safe_torch_load
from acdc_prune.models import build_model
from acdc_prune.pruning import PruningPlan, apply_plan

FORMAT = "acdc-prune-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "config", "epoch")


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


@dataclass
class Checkpoint:
    """A saved network: its config, weights, epoch, pruning plan and training state.

    The one way to open, rebuild and save a model. Files are plain data (``torch.load`` with
    ``weights_only=True``), written atomically; a pruned network is stored as its plan against the
    architecture of ``config.model`` plus the pruned weights, so rebuilding needs no pickled module.

    Attributes:
        config: the run's resolved config.
        weights: the network's ``state_dict``.
        epoch: completed training epochs.
        plan: the pruning plan of a pruned network (against ``config.model``), else ``None``.
        state: further entries: ``optimizer``, ``scheduler``, ``scaler`` (state dicts), ``history``
            (one dict per epoch), ``best_dice``, ``best_epoch``, ``postprocessing`` (the choice made on
            the validation patients for the best epoch, see :meth:`largest_component`).
        path: the file it was opened from or last saved to, else ``None``.
    """

    config: Config
    weights: dict[str, torch.Tensor]
    epoch: int
    plan: PruningPlan | None = None
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def open(cls, path_or_run_dir: str | Path, name: str = "best") -> Checkpoint:
        """Read ``path_or_run_dir`` (a ``.pt`` file, or a run folder's ``<name>.pt``) and check it.

        Raises:
            CheckpointError: missing, truncated, foreign, newer than this version, with an invalid
                config or plan, or an ONNX (quantized) model (one-line message naming the file).
        """
        from acdc_prune.engine.quantize import refuse_onnx_model

        refuse_onnx_model(path_or_run_dir)  # quantized models are evaluated, not trained or pruned
        path = resolve_checkpoint(path_or_run_dir, name)
        raw = read_checkpoint(path)
        try:
            config = config_from_dict(raw.pop("config"))
        except AcdcPruneError as err:
            raise CheckpointError(f"{path}: stored config is invalid ({err})") from None
        plan_text = raw.pop("plan", None)
        try:
            plan = PruningPlan.from_json(plan_text) if plan_text is not None else None
        except AcdcPruneError as err:
            raise CheckpointError(f"{path}: its pruning plan is invalid ({err})") from None
        weights, epoch = raw.pop("model"), int(raw.pop("epoch"))
        state = {k: v for k, v in raw.items() if k not in ("format", "version")}
        return cls(config, weights, epoch, plan, state, path)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        config: Config,
        *,
        epoch: int,
        plan: PruningPlan | None = None,
        state: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """A checkpoint of a live ``model`` (its current ``state_dict``, not a copy)."""
        return cls(config, model.state_dict(), int(epoch), plan, dict(state or {}))

    @property
    def run_dir(self) -> Path | None:
        """The folder of the file (a run or pruned child folder), or ``None`` before saving."""
        return self.path.parent if self.path is not None else None

    def largest_component(self, setting: bool | str) -> bool:
        """``evaluation.largest_component`` resolved for these weights.

        Args:
            setting: ``True`` or ``False`` as the user set it, or ``"auto"``: the choice that the
                validation patients made for the best epoch during training (``state["postprocessing"]``),
                off where the checkpoint records none (no validated epoch, or an older checkpoint).
        """
        return resolve_largest_component(setting, self.state.get("postprocessing"))

    @property
    def label(self) -> str:
        """How messages name this checkpoint: its path, or ``"the checkpoint"`` before saving."""
        return str(self.path) if self.path is not None else "the checkpoint"

    def build_model(self) -> nn.Module:
        """The network on the CPU with these weights: ``config.model`` built, shrunk by ``plan``.

        Raises:
            CheckpointError: the plan does not apply, or the weights do not fit the architecture.
        """
        model = build_model(self.config.model)
        if self.plan is not None:
            try:
                model = apply_plan(model, self.plan)
            except AcdcPruneError as err:
                raise CheckpointError(
                    f"{self.label}: its pruning plan does not apply to the model ({err})"
                ) from None
        _check_fits(model, self.weights, self.label, self.config.model.name)
        model.load_state_dict(self.weights)
        return model

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint to ``path`` atomically (a crash never leaves a truncated file)."""
        path = Path(path)
        content = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.weights,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            **self.state,
        }
        if self.plan is not None:
            content["plan"] = self.plan.to_json()
        atomic_torch_save(path, content)
        self.path = path
        return path


def load_model(path_or_run_dir: str | Path, name: str = "best") -> tuple[nn.Module, Config, Checkpoint]:
    """Shorthand of ``Checkpoint.open`` + ``build_model``: ``(model on the CPU, config, checkpoint)``.

    Raises:
        CheckpointError: missing, truncated, foreign, or of another architecture (one-line message).
    """
    checkpoint = Checkpoint.open(path_or_run_dir, name)
    return checkpoint.build_model(), checkpoint.config, checkpoint
