"""Ratios of a sensitivity analysis: the ones tried, and those chosen from its table for a MAC target."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import yaml

from acdc_prune.errors import ConfigError
from acdc_prune.io import atomic_save_figure
from acdc_prune.pruning import PruningError

GREEDY = (
    "start from every block at ratio 0; repeatedly move the block whose next tried ratio adds the least "
    "Dice loss per MACs saved; stop when the predicted MACs (1 - the sum of the one-block savings, an "
    "additive approximation) and then the real MACs of the combined plan reach the target"
)
"""How ``ratios.yaml`` is chosen from the table."""


def check_ratio_list(values: Sequence[float]) -> list[float]:
    """The ratios to try, sorted and without repeats.

    Args:
        values: shares of a block's filters removed, each strictly between 0 and 1.

    Raises:
        ConfigError: no value, or one outside (0, 1) or NaN.
    """
    if not values:
        raise ConfigError("give at least one ratio to try, e.g. --ratios 0.25,0.5,0.75,0.9")
    for value in values:
        if not 0.0 < float(value) < 1.0:
            raise ConfigError(
                f"ratio {value} is not in (0, 1): a ratio is the share of a block's filters removed"
            )
    return sorted({float(value) for value in values})


def parse_ratio_list(text: str) -> list[float]:
    """Parse ``"0.25,0.5,0.75"`` into checked ratios (see :func:`check_ratio_list`).

    Raises:
        ConfigError: a part that is not a number, or a ratio outside (0, 1).
    """
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"ratios '{text}' are not comma-separated numbers; write e.g. --ratios 0.25,0.5,0.75,0.9"
        ) from None
    return check_ratio_list(values)


def row_key(block: str, ratio: float) -> tuple[str, float]:
    """``(block, ratio)`` of a table row, the ratio rounded so that a ratio read back from CSV matches."""
    return block, round(float(ratio), 6)


def _curves(table: pd.DataFrame) -> dict[str, list[tuple[float, float, float]]]:
    """Per block: ``(ratio, MACs saved, Dice loss)`` by ratio, from ``(0, 0, 0)`` (nothing pruned)."""
    curves = {}
    for block, rows in table.groupby("block", sort=False):
        points = sorted(zip(rows["ratio"], rows["macs_saved"], rows["dice_loss"], strict=True))
        # A loss that could not be scored counts as the worst one, 1.
        curves[str(block)] = [(0.0, 0.0, 0.0)] + [
            (r, s, loss if math.isfinite(loss) else 1.0) for r, s, loss in points
        ]
    return curves


def _best_move(
    curves: dict[str, list[tuple[float, float, float]]], at: dict[str, int]
) -> tuple[str, int] | None:
    """The block and larger ratio (index) that add the least loss per MACs saved; ``None`` when none is left.

    Moves that save nothing come last; among equal rates the larger saving goes first.
    """
    best, best_key = None, None
    for block, points in curves.items():
        _, saved, loss = points[at[block]]
        for index in range(at[block] + 1, len(points)):
            gain, cost = points[index][1] - saved, points[index][2] - loss
            key = (cost / gain, -gain) if gain > 0 else (math.inf, 0.0)
            if best_key is None or key < best_key:
                best, best_key = (block, index), key
    return best


def greedy_ratios(
    table: pd.DataFrame, target: float, measure: Callable[[dict[str, float]], float]
) -> tuple[dict[str, float], float, float]:
    """Block-wise ratios that keep at most ``target`` of the MACs at the least predicted Dice loss (greedy).

    From every block at ratio 0, the move of one block to a larger tried ratio with the least added
    loss per MACs saved is taken until the predicted MACs kept (1 minus the sum of the one-block
    savings: additive, so it overestimates what blocks pruned together save) reach ``target``, and
    then until the real MACs do.

    Args:
        table: rows with ``block``, ``ratio``, ``macs_saved`` (fraction of the whole) and ``dice_loss``.
        target: the fraction of the original MACs to keep, in (0, 1].
        measure: ``measure(ratios)`` -> real MACs fraction of the network pruned by ``ratios``.

    Returns:
        ``(ratios, predicted, real)``: ``{"default": 0.0, block: ratio...}`` and both MACs fractions.

    Raises:
        PruningError: the table cannot reach the target.
    """
    curves = _curves(table)
    at = dict.fromkeys(curves, 0)

    def ratios() -> dict[str, float]:
        return {"default": 0.0, **{b: float(curves[b][i][0]) for b, i in at.items() if i}}

    def predicted() -> float:
        return 1.0 - sum(curves[b][i][1] for b, i in at.items())

    while True:
        if predicted() <= target:
            real = measure(ratios())
            if real <= target:
                return ratios(), predicted(), real
        move = _best_move(curves, at)
        if move is None:
            raise PruningError(
                f"the table cannot reach the MAC target {target:g}: its largest ratios keep "
                f"{measure(ratios()):.3f} of the MACs"
            )
        at[move[0]] = move[1]


def plot_losses(table: pd.DataFrame, x: str, xlabel: str, path: Path, title: str) -> None:
    """Dice loss against column ``x`` (scaled to percent for ``macs_saved``), one line per block (PNG)."""
    from acdc_prune.experiments.report import pyplot

    plt = pyplot()
    scale = 100.0 if x == "macs_saved" else 1.0
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for index, (block, rows) in enumerate(table.groupby("block", sort=False)):
        rows = rows.sort_values("ratio")
        style = "-" if index < 10 else "--"
        xs, ys = [0.0, *(scale * rows[x])], [0.0, *rows["dice_loss"]]
        ax.plot(xs, ys, style, marker="o", markersize=3, color=colours(index % 20), label=str(block))
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice loss (unpruned - pruned)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


def ratios_text(ratios: dict[str, float], target: float, predicted: float, real: float) -> str:
    """``ratios.yaml``: the chosen ratios with a header saying what they keep (``read_ratios`` reads it)."""
    header = (
        f"# Sensitivity-guided ratios: keep at most {target:g} of the MACs at the least predicted loss.\n"
        f"# MACs kept: {real:.4f} (real), {predicted:.4f} (predicted, additive over blocks).\n"
    )
    return header + yaml.safe_dump(ratios, sort_keys=False)


def predicted_loss(table: pd.DataFrame, ratios: dict[str, float]) -> float:
    """The sum of the one-block Dice losses of ``ratios`` (additive: losses of pruned blocks compound)."""
    chosen = {row_key(block, ratio) for block, ratio in ratios.items() if block != "default"}
    rows = [row_key(b, r) in chosen for b, r in zip(table["block"], table["ratio"], strict=True)]
    return float(table.loc[rows, "dice_loss"].sum())
