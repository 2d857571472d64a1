"""Comparison reports of a baseline and its pruned arms: CSV, Markdown, rich table and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from acdc_prune.io import atomic_save_figure, atomic_write_text

STRUCTURE_NAMES = ("RV", "MYO", "LV")
PHASE_NAMES = ("ED", "ES")
MODE_STYLES = {
    "baseline": ("black", "*"),
    "none": ("#1f77b4", "o"),
    "random": ("#d62728", "s"),
    "rewind": ("#2ca02c", "^"),
    "scratch": ("#9467bd", "D"),
}


def _mean(summary: dict[str, Any], *path: str) -> float | None:
    """``summary[path...]["mean"]`` or ``None`` where any level is missing."""
    node: Any = summary
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node.get("mean") if isinstance(node, dict) else node


def summary_row(arm: str, setting: str, mode: str, before: dict | None, after: dict) -> dict[str, Any]:
    """One report row from evaluation summaries (see ``acdc_prune.engine.evaluate.summarize``).

    Args:
        arm: the row's name (``baseline`` or ``<setting>-<mode>``).
        setting: the ratios setting's name (``-`` for the baseline).
        mode: ``baseline``, ``none``, ``random``, ``rewind`` or ``scratch``.
        before: summary of the pruned network before retraining (``None`` for the baseline).
        after: summary after retraining (the baseline's own summary for the baseline).

    Returns:
        Flat dict: cost (params, MACs, CPU latency), mean Dice before/after, Dice per structure and
        phase, mean HD95 and LV/RV EF mean absolute error.
    """
    cost = after.get("cost", {})
    row: dict[str, Any] = {
        "arm": arm,
        "setting": setting,
        "mode": mode,
        "params": cost.get("params"),
        "macs": cost.get("macs"),
        "latency_ms": cost.get("latency_cpu", {}).get("median_ms"),
        "dice_before": before.get("mean_dice") if before else None,
        "dice": after.get("mean_dice"),
    }
    for phase in PHASE_NAMES:
        for structure in STRUCTURE_NAMES:
            row[f"{structure}_{phase}"] = _mean(after, "phases", phase, structure, "dice")
    row["hd95_mm"] = after.get("mean_hd")
    for ventricle in ("LV", "RV"):
        row[f"{ventricle}_EF_mae"] = after.get("clinical", {}).get(f"{ventricle}_EF", {}).get("mae")
    return row


def comparison_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows to a table with relative size columns against the baseline row (first row)."""
    frame = pd.DataFrame(rows)
    base = frame.iloc[0]
    frame.insert(4, "params_pct", 100.0 * frame["params"] / base["params"])
    frame.insert(6, "macs_pct", 100.0 * frame["macs"] / base["macs"])
    frame["dice_delta"] = frame["dice"] - base["dice"]
    return frame


def write_tables(frame: pd.DataFrame, out_dir: Path) -> None:
    """``comparison.csv`` (full precision) and ``comparison.md`` (rounded) in ``out_dir``."""
    atomic_write_text(out_dir / "comparison.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / "comparison.md", frame.round(4).to_markdown(index=False) + "\n")


RICH_COLUMNS = {
    "arm": "arm",
    "params": "params",
    "macs_pct": "MACs",
    "latency_ms": "ms",
    "dice_before": "before",
    "dice": "after",
    "dice_delta": "delta",
    "hd95_mm": "HD95",
}


def _cell(column: str, value: Any) -> str:
    """A table cell in the column's format; ``-`` for missing values."""
    if column == "arm":
        return str(value)
    if value is None or pd.isna(value):
        return "-"
    if column == "params":
        return f"{int(value):,}"
    if column == "macs_pct":
        return f"{value:.0f}%"
    if column in ("latency_ms", "hd95_mm"):
        return f"{value:.1f}"
    if column == "dice_delta":
        return f"{value:+.3f}"
    return f"{value:.3f}"


def rich_table(frame: pd.DataFrame, title: str) -> Table:
    """The headline columns of the comparison as a rich table (fits an 80-column terminal)."""
    caption = (
        "before/after: mean foreground 3D Dice (validation) of the pruned network before/after retraining; "
        "delta: after minus baseline; MACs: share of the baseline's; ms: CPU latency per slice; HD95 in mm"
    )
    table = Table(title=title, caption=caption)
    for column, header in RICH_COLUMNS.items():
        table.add_column(header, justify="left" if column == "arm" else "right", no_wrap=True)
    for _, row in frame.iterrows():
        table.add_row(*(_cell(column, row[column]) for column in RICH_COLUMNS))
    return table


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (figures are only ever written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(frame: pd.DataFrame, path: Path) -> None:
    """Mean Dice after retraining against parameters and MACs, one marker per mode (PNG)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, column, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs per slice")):
        for mode, group in frame.groupby("mode", sort=False):
            color, marker = MODE_STYLES.get(str(mode), ("gray", "x"))
            ax.scatter(group[column], group["dice"], color=color, marker=marker, s=60, label=str(mode))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean foreground 3D Dice (validation)")
    axes[1].legend(title="mode")
    fig.suptitle("Accuracy against size after retraining")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=130)
    plt.close(fig)


def plot_training_curves(curves: dict[str, pd.DataFrame], modes: dict[str, str], path: Path) -> None:
    """Training loss and validation Dice per epoch of every arm on one figure (PNG).

    Colours follow the mode (as in :func:`plot_pareto`); arms of different ratios settings of one
    mode differ by line style.

    Args:
        curves: arm name -> its ``metrics.csv`` table (columns ``epoch``, ``train_loss``, ``dice_mean``).
        modes: arm name -> mode (``baseline``, ``none``, ``random``, ``rewind``, ``scratch``).
        path: PNG to write.
    """
    plt = pyplot()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for arm, table in curves.items():
        mode = modes[arm]
        color, marker = MODE_STYLES.get(mode, ("gray", "x"))
        style = styles[seen.get(mode, 0) % len(styles)]
        seen[mode] = seen.get(mode, 0) + 1
        line = {"color": color, "linestyle": style, "label": arm}
        loss_ax.plot(table["epoch"], table["train_loss"], **line)
        valid = table.dropna(subset=["dice_mean"])
        dice_ax.plot(valid["epoch"], valid["dice_mean"], marker=marker, **line)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss (DiceCE)")
    loss_ax.set_yscale("log")
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("validation mean foreground Dice")
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
    dice_ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=130)
    plt.close(fig)
