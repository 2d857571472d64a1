"""Prune a trained run by block-wise ratios, re-initialise, retrain and record what it cost and bought."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from acdc_prune.config import Config, read_yaml, validate_ratios
from acdc_prune.errors import ConfigError
from acdc_prune.io import atomic_save_figure, atomic_write_json, staged_dir, unused_path

REINIT_MODES = ("none", "random", "rewind")


def read_ratios(path: str | Path) -> dict[str, float]:
    """Read a ratios YAML file: a mapping ``{default: 0.25, encoders.1: 0.5, ...}``.

    A top-level ``ratios:`` key holding that mapping is accepted too. Values must lie in [0, 1); a
    missing ``default`` means blocks not listed are not pruned.

    Raises:
        ConfigError: unreadable YAML, not a mapping, or a value that is not a number in [0, 1).
    """
    raw = read_yaml(path)
    if isinstance(raw, dict) and set(raw) == {"ratios"} and isinstance(raw["ratios"], dict):
        raw = raw["ratios"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of block prefixes to ratios, e.g. 'default: 0.25'")
    return validate_ratios(raw, str(path))


def example_input(config: Config) -> torch.Tensor:
    """A deterministic example slice ``(1, in_channels, *patch_size)`` for tracing the network."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, config.model.in_channels, *config.data.patch_size, generator=generator)


def plan_for(model: nn.Module, config: Config, ratios: dict[str, float]) -> tuple[Any, tuple[int, ...]]:
    """Plan pruning ``model`` by ``ratios`` with ``config.pruning``'s importance and rounding.

    Returns:
        ``(plan, example_shape)``: the :class:`acdc_prune.pruning.PruningPlan` and the shape of the
        example slice it was traced with (the shape MACs are counted at).
    """
    from acdc_prune.pruning import plan_pruning

    example = example_input(config)
    plan = plan_pruning(
        model, example, ratios=ratios, importance=config.pruning.importance, round_to=config.pruning.round_to
    )
    return plan, tuple(example.shape)


def size_change(original: nn.Module, pruned: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """Parameters and MACs (at input ``shape``) before and after pruning."""
    from acdc_prune.engine.cost import count_macs, count_parameters

    return {
        "params": {"before": count_parameters(original), "after": count_parameters(pruned)},
        "macs": {
            "before": count_macs(original, shape),
            "after": count_macs(pruned, shape),
            "input_shape": list(shape),
        },
    }


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every weight of ``model`` in place with each layer's own initialiser; reset norm statistics.

    Args:
        model: the (pruned) network; layers without ``reset_parameters`` keep their tensors.
        seed: seed of the new weights.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def block_of(name: str, model: nn.Module) -> str:
    """The block a layer belongs to: ``encoders.1`` for ``encoders.1.conv1.conv``, ``head`` for ``head``.

    The first path component names the block, or the first two where the first is a container of
    numbered blocks (``encoders``, ``decoders``, MONAI's ``model``).
    """
    parts = name.split(".")
    first = model.get_submodule(parts[0])
    numbered = isinstance(first, (nn.ModuleList, nn.Sequential)) and len(parts) > 1 and parts[1].isdigit()
    return ".".join(parts[:2]) if numbered else parts[0]


def layer_widths(model: nn.Module, plan: Any) -> list[dict[str, Any]]:
    """Output widths before and after pruning of every conv/linear layer, in module order.

    Returns:
        Rows ``{"layer", "block", "type", "before", "after"}``.
    """
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or weight is None:
            continue
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        before = int(weight.shape[1] * module.groups if transposed else weight.shape[0])
        entry = plan.layers.get(name)
        after = before if entry is None or entry.kept_out is None else len(entry.kept_out)
        rows.append(
            {
                "layer": name,
                "block": block_of(name, model),
                "type": type(module).__name__,
                "before": before,
                "after": after,
            }
        )
    return rows


def channel_masks(widths: list[dict[str, Any]], plan: Any) -> dict[str, list[bool]]:
    """Per layer, True/False per original output channel (True = kept), as the original work stored."""
    masks = {}
    for row in widths:
        entry = plan.layers.get(row["layer"])
        kept = set(range(row["before"])) if entry is None or entry.kept_out is None else set(entry.kept_out)
        masks[row["layer"]] = [index in kept for index in range(row["before"])]
    return masks


def plot_widths(widths: list[dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars of each layer's output width before and after pruning (PNG)."""
    from acdc_prune.experiments.report import pyplot

    plt = pyplot()
    names = [row["layer"] for row in widths]
    height = max(3.0, 0.22 * len(names) + 1.0)
    fig, ax = plt.subplots(figsize=(8, height))
    positions = range(len(names))
    ax.barh(positions, [row["before"] for row in widths], color="#c9d6e8", label="original")
    ax.barh(positions, [row["after"] for row in widths], color="#2f5d9e", label="pruned")
    ax.set_yticks(list(positions), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


@dataclass
class PruneResult:
    """What :func:`prune_run` produced.

    Attributes:
        out_dir: the child folder of the run.
        meta: the content of ``meta.json`` (widths, params, MACs, ratios, mode).
        before: evaluation summary of the pruned network before retraining.
        after: evaluation summary after retraining (equal to ``before`` without retraining).
    """

    out_dir: Path
    meta: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]


def _initial_weights(
    trained: nn.Module, plan: Any, reinit: str, rewind_source: tuple[dict, Config, Path] | None, seed: int
) -> nn.Module:
    """The pruned network with weights chosen by ``reinit`` (masks always come from ``trained``)."""
    from acdc_prune.engine.checkpoints import rebuild_model
    from acdc_prune.pruning import apply_plan

    if reinit == "rewind":
        checkpoint, config, path = rewind_source
        return apply_plan(rebuild_model(checkpoint, config, path), plan)
    pruned = apply_plan(trained, plan)
    return reinitialise(pruned, seed) if reinit == "random" else pruned


def _rewind_checkpoint(run_dir: Path, name: str, trained_config: Config) -> tuple[dict, Config, Path]:
    """Read the early checkpoint ``name`` of ``run_dir``; it must hold the same architecture."""
    from acdc_prune.engine.checkpoints import checkpoint_config, read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(run_dir, name)
    checkpoint = read_checkpoint(path)
    config = checkpoint_config(checkpoint, path)
    if config.model != trained_config.model or "plan" in checkpoint:
        raise ConfigError(f"{path} holds another architecture than the trained model; rewind to the same run")
    return checkpoint, config, path


def prune_run(
    run_dir: Path,
    ratios: dict[str, float],
    *,
    reinit: str = "none",
    rewind_to: str | None = None,
    retrain_epochs: int | None = None,
    retrain_lr: float | None = None,
    checkpoint: Path | None = None,
    out_dir: Path | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> PruneResult:
    """Prune the trained model of ``run_dir``, re-initialise, evaluate, retrain, evaluate again.

    Every input is checked (ratios against the network, the rewind checkpoint, the config) before
    anything is written; the child folder only appears, complete, when the whole job succeeded.

    Args:
        run_dir: a training run folder (``best.pt``, ``config.yaml``, early ``epochN.pt``).
        ratios: share of filters to remove per module-path prefix plus ``default``.
        reinit: ``none`` keeps surviving weights, ``random`` re-draws them, ``rewind`` loads the
            surviving channels of the early checkpoint ``rewind_to`` of the same run.
        rewind_to: checkpoint name for ``rewind`` (default: the config's ``pruning.rewind_to``).
        retrain_epochs: retraining epochs (default ``pruning.retrain_epochs``); 0 skips retraining.
        retrain_lr: peak retraining learning rate (default ``pruning.retrain_lr`` or ``training.lr``).
        checkpoint: prune this checkpoint instead of ``run_dir/best.pt``.
        out_dir: the child folder to create (default ``run_dir/pruned/<mode>-<timestamp>``).
        overrides: dotted overrides applied to the run's config for retraining and evaluation.
        console: rich console.

    Returns:
        :class:`PruneResult`.

    Raises:
        PruningError: bad ratio keys or values for this network; CheckpointError: missing or foreign
            checkpoints (a missing rewind point lists the run's checkpoints); ConfigError: bad mode.
    """
    from acdc_prune.config import apply_overrides, config_from_dict, save_config
    from acdc_prune.engine.checkpoints import load_model, save_checkpoint
    from acdc_prune.engine.trainer import train

    console = console or Console()
    if reinit not in REINIT_MODES:
        raise ConfigError(f"re-initialisation '{reinit}' is not one of {', '.join(REINIT_MODES)}")
    run_dir = Path(run_dir)
    trained, config, source = load_model(checkpoint or run_dir)
    if "plan" in source:
        raise ConfigError(f"{checkpoint or run_dir} is already pruned; prune its baseline run instead")
    config = config_from_dict(apply_overrides(config.to_dict(), overrides or []))
    rewind_to = rewind_to or config.pruning.rewind_to
    rewind_source = _rewind_checkpoint(run_dir, rewind_to, config) if reinit == "rewind" else None
    config.pruning.ratios = ratios
    config.pruning.reinit = reinit
    config.pruning.rewind_to = rewind_to
    if retrain_epochs is not None:
        config.pruning.retrain_epochs = retrain_epochs
    if retrain_lr is not None:
        config.pruning.retrain_lr = retrain_lr

    plan, shape = plan_for(trained, config, ratios)
    pruned = _initial_weights(trained, plan, reinit, rewind_source, config.training.seed)
    widths = layer_widths(trained, plan)
    meta = {
        "source_checkpoint": str(checkpoint or run_dir / "best.pt"),
        "reinit": reinit,
        "rewind_to": rewind_to if reinit == "rewind" else None,
        "ratios": ratios,
        "importance": config.pruning.importance,
        **size_change(trained, pruned, shape),
        "widths": widths,
    }
    plan_json = plan.to_json()
    out_dir = Path(out_dir) if out_dir is not None else unused_path(run_dir / "pruned", prefix=f"{reinit}-")

    from acdc_prune.experiments.evaluation import evaluate_records, validation_records

    val_records = validation_records(config)
    with staged_dir(out_dir) as staging:
        plan.save(staging / "plan.json")
        atomic_write_json(staging / "masks.json", channel_masks(widths, plan))
        atomic_write_json(staging / "meta.json", meta)
        title = f"{run_dir.name}: {reinit}, {meta['params']['after']:,} params"
        plot_widths(widths, staging / "widths.png", title)
        before = evaluate_records(pruned, config, val_records, staging / "eval_before", console).summary
        epochs = config.pruning.retrain_epochs
        if epochs > 0:
            retrain = copy.deepcopy(config)
            retrain.training.epochs = epochs
            retrain.training.lr = config.pruning.retrain_lr or config.training.lr
            train(
                retrain,
                model=pruned,
                run_dir=staging,
                plan_json=plan_json,
                init_checkpoint_epochs=False,
                console=console,
            )
            final, _, _ = load_model(staging)
            after = evaluate_records(final, config, val_records, staging / "eval_after", console).summary
        else:
            save_config(config, staging / "config.yaml")
            save_checkpoint(staging / "best.pt", pruned, config, epoch=0, plan_json=plan_json)
            after = before
        summary = {k: v for k, v in meta.items() if k != "widths"}
        atomic_write_json(staging / "result.json", {"meta": summary, "before": before, "after": after})
    return PruneResult(out_dir=out_dir, meta=meta, before=before, after=after)
