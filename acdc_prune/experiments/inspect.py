"""Inspect a trained run: filter-norm statistics and plots, widths per block, and a ratios preview."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.experiments.planning import plan_for, size_change
from acdc_prune.experiments.report import pyplot
from acdc_prune.io import atomic_save_figure, atomic_write_json, atomic_write_text, staged_dir, unused_path
from acdc_prune.pruning import filter_norms
from acdc_prune.pruning.importance import filter_weights
from acdc_prune.pruning.summary import block_of, layer_widths


def norm_statistics(model: nn.Module) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Per-layer statistics of the L1 and L2 filter norms of every conv/linear layer.

    Returns:
        ``(table, l1_norms)``: one row per layer (``layer``, ``block``, ``filters``, then ``mean``,
        ``std``, ``min``, ``median``, ``max`` of the L1 and of the L2 norms), and the L1 norms per layer.
    """
    l1 = {name: norms.numpy() for name, norms in filter_norms(model, "l1").items()}
    l2 = {name: norms.numpy() for name, norms in filter_norms(model, "l2").items()}
    rows = []
    for name, values in l1.items():
        row: dict[str, Any] = {"layer": name, "block": block_of(name, model), "filters": values.size}
        for kind, norms in (("l1", values), ("l2", l2[name])):
            row.update(
                {
                    f"{kind}_mean": float(norms.mean()),
                    f"{kind}_std": float(norms.std()),
                    f"{kind}_min": float(norms.min()),
                    f"{kind}_median": float(np.median(norms)),
                    f"{kind}_max": float(norms.max()),
                }
            )
        rows.append(row)
    return pd.DataFrame(rows), l1


def block_shares(model: nn.Module) -> pd.DataFrame:
    """Parameters per block and their share of the model, with the widest output width of the block."""
    total = sum(p.numel() for p in model.parameters())
    rows: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not name or not own:
            continue
        block = block_of(name, model)
        entry = rows.setdefault(block, {"block": block, "params": 0, "max_width": 0})
        entry["params"] += own
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            entry["max_width"] = max(entry["max_width"], int(filter_weights(module).shape[0]))
    frame = pd.DataFrame(list(rows.values()))
    frame["share_pct"] = 100.0 * frame["params"] / total
    return frame


def plot_histograms(norms: dict[str, np.ndarray], path: Path) -> None:
    """One small L1-norm histogram per layer, on a grid (PNG)."""
    plt = pyplot()
    names = list(norms)
    cols = 6
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.hist(norms[name], bins=min(30, max(5, norms[name].size // 2)), color="#2f5d9e")
        ax.set_title(name, fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("L1 norm of each output filter, per layer")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_heatmap(norms: dict[str, np.ndarray], path: Path) -> None:
    """Heat map of each layer's sorted L1 filter norms, divided by the layer's largest (PNG).

    Rows are layers; columns are 100 quantiles of the sorted norms, so layers of different widths line up.
    """
    plt = pyplot()
    grid = np.stack(
        [
            np.quantile(np.sort(values) / max(values.max(), 1e-12), np.linspace(0, 1, 100))
            for values in norms.values()
        ]
    )
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.2 * len(norms) + 1)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(norms)), list(norms), fontsize=6)
    ax.set_xlabel("filter rank (percent of the layer, weakest first)")
    fig.colorbar(image, ax=ax, label="L1 norm / layer max")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


def preview_ratios(model: nn.Module, config: Any, ratios: dict[str, float]) -> dict[str, Any]:
    """Params and MACs before and after pruning by ``ratios``, without writing anything.

    Returns:
        ``params`` and ``macs`` (``before``/``after``) and the per-layer output widths.
    """
    from acdc_prune.pruning import apply_plan

    planned = plan_for(model, config, ratios)
    return {
        "ratios": ratios,
        "importance": planned.criterion,
        **size_change(model, apply_plan(model, planned.plan), planned.shape),
        "widths": layer_widths(model, planned.plan),
    }


@dataclass
class InspectResult:
    """What :func:`inspect_run` wrote and found.

    Attributes:
        out_dir: the inspection folder.
        blocks: parameters per block (``block``, ``params``, ``share_pct``, ``max_width``).
        preview: params and MACs before/after the previewed ratios, or ``None``.
    """

    out_dir: Path
    blocks: pd.DataFrame
    preview: dict[str, Any] | None


def inspect_run(
    model_path: Path,
    *,
    ratios: dict[str, float] | None = None,
    checkpoint: str = "best",
    out: Path | None = None,
) -> InspectResult:
    """Write the inspection of a saved model to ``out``.

    Files: ``norms.csv`` (per-layer L1/L2 statistics), ``blocks.csv`` (params and share per block),
    ``norm_histograms.png``, ``norm_heatmap.png`` and, with ``ratios``, ``preview.json``.

    Args:
        model_path: a run folder or a checkpoint file.
        ratios: a ratios mapping to preview (params and MACs after), or ``None``.
        checkpoint: which checkpoint of a run folder (``best``, ``last``, ``epoch5``...).
        out: output folder (must not exist); default ``<run>/inspect/<timestamp>`` for a run folder
            and ``<logging.runs_dir>/inspect/<timestamp>`` for a file (never beside a shipped model).
    """
    source = Checkpoint.open(model_path, checkpoint)
    model, config = source.build_model(), source.config
    stats, l1 = norm_statistics(model)
    blocks = block_shares(model)
    preview = preview_ratios(model, config, ratios) if ratios is not None else None
    base = Path(model_path) if Path(model_path).is_dir() else Path(config.logging.runs_dir)
    out = Path(out) if out is not None else unused_path(base / "inspect")
    with staged_dir(out) as staging:
        atomic_write_text(staging / "norms.csv", stats.to_csv(index=False))
        atomic_write_text(staging / "blocks.csv", blocks.to_csv(index=False))
        plot_histograms(l1, staging / "norm_histograms.png")
        plot_heatmap(l1, staging / "norm_heatmap.png")
        if preview is not None:
            atomic_write_json(staging / "preview.json", preview)
    return InspectResult(out, blocks, preview)
