"""Plots of sweep reports: accuracy against size (Pareto) and training curves, on the headless Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from acdc_prune.io import atomic_save_figure

MODE_STYLES = {
    "baseline": ("black", "*"),
    "none": ("#1f77b4", "o"),
    "random": ("#d62728", "s"),
    "rewind": ("#2ca02c", "^"),
    "lr_rewind": ("#ff7f0e", "v"),
    "scratch": ("#9467bd", "D"),
}
"""Colour and marker of each mode in the plots (colour by criterion instead where a sweep has several)."""
CRITERION_COLORS = {
    "l1": "#1f77b4",
    "l2": "#17becf",
    "bn_scale": "#2ca02c",
    "taylor": "#d62728",
    "redundancy": "#9467bd",
}
"""Colour of each built-in criterion in the Pareto plot; criteria registered from Python take
:data:`EXTRA_COLORS` in order of appearance."""
EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#ff7f0e")
SCOPE_LINES = {"block": "--", "global": "-"}
"""Line style joining the points of one criterion, scope and mode in the Pareto plot."""


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (figures are only ever written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _criterion_colors(criteria: list[str]) -> dict[str, str]:
    """A colour per criterion: :data:`CRITERION_COLORS`, then :data:`EXTRA_COLORS` in turn."""
    extra = [c for c in criteria if c not in CRITERION_COLORS]
    return {c: CRITERION_COLORS.get(c) or EXTRA_COLORS[extra.index(c) % len(EXTRA_COLORS)] for c in criteria}


def _ratios_family(ratios: Any) -> str | None:
    """The series a block ratios setting belongs to: ``uniform`` for ``uniform-R``, else its own name;
    ``None`` for a budget target (no ratios)."""
    if pd.isna(ratios):
        return None
    return "uniform" if str(ratios).startswith("uniform-") else str(ratios)


def pareto_series(summary: pd.DataFrame) -> list[tuple[str, dict[str, Any], pd.DataFrame]]:
    """The points of :func:`plot_pareto` as series: one per criterion, scope and mode.

    Args:
        summary: the summary of a report (``acdc_prune.experiments.report.seed_summary``: with
            ``criterion``, ``scope`` and ``mode`` columns).

    Returns:
        ``(label, style, rows)`` per series in order of appearance: ``style`` holds matplotlib's
        ``color``, ``marker`` and ``linestyle``. The marker gives the mode; the colour gives the
        criterion where the summary has several, else the mode; a line (dashed for block scope, solid
        for global) joins a series of several points. Block ratios form one series per family (every
        ``uniform-R`` setting together, each other named setting alone), so no line joins unrelated
        plans. The label is the mode alone for a sweep of one criterion, scope and ratios family,
        else ``<criterion> <scope>[ <family>], <mode>``.
    """
    summary = summary.assign(family=summary["ratios"].map(_ratios_family) if "ratios" in summary else None)
    arms = summary[summary["mode"] != "baseline"]
    criteria = list(arms["criterion"].dropna().unique())
    by_criterion = len(criteria) > 1
    by_family = arms["family"].nunique() > 1
    several = by_criterion or by_family or arms["scope"].nunique() > 1
    colors = _criterion_colors(criteria)
    series = []
    for (criterion, scope, mode, family), rows in summary.groupby(
        ["criterion", "scope", "mode", "family"], sort=False, dropna=False
    ):
        color, marker = MODE_STYLES.get(str(mode), ("gray", "x"))
        if by_criterion and criterion in colors:
            color = colors[criterion]
        named = (criterion, scope, family if by_family else None)
        pruning = " ".join(str(v) for v in named if pd.notna(v))
        label = f"{pruning}, {mode}" if several and pruning else str(mode)
        line = SCOPE_LINES.get(scope, "-") if len(rows) > 1 else "none"
        series.append((label, {"color": color, "marker": marker, "linestyle": line}, rows))
    return series


def plot_pareto(summary: pd.DataFrame, path: Path) -> None:
    """Mean Dice after retraining against parameters and MACs (PNG), series by :func:`pareto_series`.

    Error bars span one standard deviation over seeds (``dice_std``) where there are several seeds.
    """
    plt = pyplot()
    series = pareto_series(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.12 * len(series)), sharey=True)
    for ax, column, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs per slice")):
        for name, style, rows in series:
            rows = rows.sort_values(column)
            spread = rows["dice_std"].fillna(0.0) if "dice_std" in rows else None
            ax.errorbar(rows[column], rows["dice"], yerr=spread, ms=7, capsize=3, label=name, **style)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean foreground 3D Dice (± std over seeds)")
    by_mode = all(name == str(rows["mode"].iloc[0]) for name, _, rows in series)
    axes[1].legend(
        title="mode" if by_mode else "criterion scope, mode", fontsize=7 if len(series) > 6 else None
    )
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
        modes: arm name -> mode (``baseline``, ``none``, ``random``, ``rewind``, ``lr_rewind``, ``scratch``).
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
