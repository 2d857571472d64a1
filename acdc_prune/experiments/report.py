"""Comparison reports of baselines and pruned arms: seeds aggregated, paired bootstrap CIs, tables, plots."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from acdc_prune.experiments.report_plots import plot_pareto, plot_training_curves
from acdc_prune.experiments.report_plots import pyplot as pyplot  # re-exported: modules import it from here
from acdc_prune.experiments.stats import paired_bootstrap
from acdc_prune.io import atomic_write_text

STRUCTURE_NAMES = ("RV", "MYO", "LV")
PHASE_NAMES = ("ED", "ES")
PRUNING_COLUMNS = ("criterion", "scope", "ratios", "target_metric", "target", "steps")
"""What an arm prunes, in the report's tables: criterion, scope, the ratios setting's name or the
budget target (metric, fraction kept and the steps taken to it); empty for baselines."""


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
        setting: the pruning setting's name (``-`` for the baseline).
        mode: ``baseline``, ``none``, ``random``, ``rewind``, ``lr_rewind`` or ``scratch``.
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


@dataclass(frozen=True)
class ReportRun:
    """One evaluated model of a sweep, as the report reads it.

    Attributes:
        arm: the row's name (``baseline``, ``baseline-s0``, ``half-none``, ``l1-global-macs0.1-none-s1``).
        group: the name over seeds (``baseline``, ``half-none``): rows of one group are averaged.
        setting: the pruning setting (``half``, ``l1-global-macs0.1``; ``-`` for a baseline).
        mode: ``baseline``, ``none``, ``random``, ``rewind``, ``lr_rewind`` or ``scratch``.
        seed: the training seed, or ``None`` for a sweep without seeds.
        after: evaluation summary after retraining (a baseline's own summary).
        before: summary of the pruned network before retraining (``None`` for a baseline or when not
            measured).
        per_volume: ``per_volume.csv`` of the evaluation ``after`` came from (columns ``patient`` and
            ``mean_dice``, see ``acdc_prune.engine.evaluate``).
        criterion: the importance criterion (``None`` for a baseline).
        scope: ``block`` or ``global`` (``None`` for a baseline).
        ratios: the ratios setting's name (``half``, ``uniform-0.5``); ``None`` for a target.
        target_metric: ``macs``, ``params`` or ``latency`` for a budget target, else ``None``.
        target: the fraction of ``target_metric`` kept, else ``None``.
        steps: the geometric steps taken to the target, else ``None``.
    """

    arm: str
    group: str
    setting: str
    mode: str
    seed: int | None
    after: dict[str, Any]
    before: dict[str, Any] | None
    per_volume: Path
    criterion: str | None = None
    scope: str | None = None
    ratios: str | None = None
    target_metric: str | None = None
    target: float | None = None
    steps: int | None = None


def comparison_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows to a table with size columns relative to the first baseline row and Dice against the baselines.

    ``params_pct`` and ``macs_pct`` are shares of the first row whose ``mode`` is ``baseline``;
    ``dice_delta`` is each row's Dice minus the mean Dice of the baseline rows (one per seed).
    """
    frame = pd.DataFrame(rows)
    baselines = frame[frame["mode"] == "baseline"]
    base = baselines.iloc[0]
    frame.insert(4, "params_pct", 100.0 * frame["params"] / base["params"])
    frame.insert(6, "macs_pct", 100.0 * frame["macs"] / base["macs"])
    frame["dice_delta"] = frame["dice"] - baselines["dice"].mean()
    return frame


ID_COLUMNS = ("arm", "setting", "mode", "group", "seed", *PRUNING_COLUMNS)
SPREAD_COLUMNS = (
    "dice_before",
    "dice",
    *(f"{s}_{p}" for p in PHASE_NAMES for s in STRUCTURE_NAMES),
    "hd95_mm",
)
"""Columns whose standard deviation over seeds the summary gives (``<column>_std``)."""


def seed_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per group (an arm over its seeds): ``n_seeds``, the mean of every measured column, and
    the sample standard deviation over seeds (``<column>_std``, NaN with one seed) of Dice and HD95.

    Args:
        frame: the table of :func:`comparison_frame` with ``group`` and ``seed`` columns.
    """
    values = frame.drop(columns=list(ID_COLUMNS)).apply(pd.to_numeric, errors="coerce")
    grouped = values.groupby(frame["group"], sort=False)
    summary = grouped.mean()
    spread = grouped[list(SPREAD_COLUMNS)].std(ddof=1).add_suffix("_std")
    names = frame.groupby("group", sort=False)[["setting", "mode", *PRUNING_COLUMNS]].first()
    summary.insert(0, "n_seeds", grouped.size())
    table = pd.concat([names, summary, spread], axis=1).rename_axis("arm").reset_index()
    return table


def per_patient_dice(per_volume: list[Path]) -> pd.Series:
    """Mean foreground Dice per patient (mean over the patient's volumes, ED and ES), averaged over the
    given evaluations (the seeds of one group); indexed by patient."""
    tables = [
        pd.read_csv(path, usecols=["patient", "mean_dice"], dtype={"patient": str}) for path in per_volume
    ]
    per_run = [table.groupby("patient")["mean_dice"].mean() for table in tables]
    return pd.concat(per_run, axis=1).mean(axis=1)


def budget_label(row: Any) -> str | None:
    """What an arm of a summary row keeps, whatever the criterion and scope: its ratios setting's name
    or its target (``macs0.1``); ``None`` for a baseline or a row without pruning columns."""
    if isinstance(row.ratios, str):
        return row.ratios
    if isinstance(row.target_metric, str):
        return f"{row.target_metric}{row.target:g}"
    return None


def comparison_pairs(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(label, a, b)``: every arm against the baseline, every pair of modes at one setting (labelled
    with the setting), then every pair of settings (criteria, scopes) at one budget (the same ratios
    setting or target, see :func:`budget_label`) and mode (labelled with the budget)."""
    arms = summary[summary["mode"] != "baseline"]
    pairs = [(row.setting, row.arm, "baseline") for row in arms.itertuples()]
    for setting, rows in arms.groupby("setting", sort=False):
        pairs += [(setting, a, b) for a, b in itertools.combinations(rows["arm"], 2)]
    budgets = arms.assign(budget=[budget_label(row) for row in arms.itertuples()]).dropna(subset=["budget"])
    for (budget, _), rows in budgets.groupby(["budget", "mode"], sort=False):
        pairs += [(budget, a, b) for a, b in itertools.combinations(rows["arm"], 2)]
    return pairs


def significance_frame(summary: pd.DataFrame, dice: dict[str, pd.Series]) -> pd.DataFrame:
    """Paired per-patient differences ``a - b`` in mean Dice with percentile bootstrap 95% intervals.

    Args:
        summary: the table of :func:`seed_summary`.
        dice: group -> per-patient Dice (:func:`per_patient_dice`); patients are paired by name and
            only those scored in both groups count.

    Returns:
        Columns ``setting`` (the label of :func:`comparison_pairs`: the setting, or the budget of a
        pair of settings), ``a``, ``b``, ``n_patients``, ``diff`` (mean over patients of a - b),
        ``ci_low``, ``ci_high`` and ``significant`` (the interval excludes 0).
    """
    rows = []
    for setting, a, b in comparison_pairs(summary):
        paired = pd.concat([dice[a], dice[b]], axis=1, join="inner")
        result = paired_bootstrap(paired.iloc[:, 0].to_numpy(), paired.iloc[:, 1].to_numpy())
        rows.append(
            {
                "setting": setting,
                "a": a,
                "b": b,
                "n_patients": result.n,
                "diff": result.mean,
                "ci_low": result.low,
                "ci_high": result.high,
                "significant": result.significant,
            }
        )
    columns = ["setting", "a", "b", "n_patients", "diff", "ci_low", "ci_high", "significant"]
    return pd.DataFrame(rows, columns=columns)


def with_baseline_significance(summary: pd.DataFrame, significance: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with each arm's paired difference to the baseline: ``paired_diff``, ``ci_low``,
    ``ci_high``, ``significant`` (empty for the baseline row)."""
    versus = significance[significance["b"] == "baseline"].set_index("a")
    versus = versus[["diff", "ci_low", "ci_high", "significant"]].rename(columns={"diff": "paired_diff"})
    return summary.join(versus, on="arm")


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table, numbers rounded to 4 decimals, missing values left blank."""
    rounded = frame.round(4)
    return rounded.astype(object).where(rounded.notna(), "").to_markdown(index=False) + "\n"


def write_tables(frame: pd.DataFrame, out_dir: Path, stem: str = "comparison") -> None:
    """``<stem>.csv`` (full precision) and ``<stem>.md`` (rounded) in ``out_dir``."""
    atomic_write_text(out_dir / f"{stem}.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / f"{stem}.md", markdown(frame))


def summary_markdown(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary for reading: ``mean ± std`` where a column has a spread, the CI as ``[low, high]``."""
    shown = summary.copy()
    for column in SPREAD_COLUMNS:
        mean, std = summary[column], summary[f"{column}_std"]
        shown[column] = [
            "" if pd.isna(m) else f"{m:.4f}" if pd.isna(s) else f"{m:.4f} ± {s:.4f}"
            for m, s in zip(mean, std, strict=True)
        ]
    shown["ci_95"] = [_interval(row) for _, row in summary.iterrows()]
    shown["significant"] = [
        "" if pd.isna(v) else "yes" if _significant(v) else "no" for v in summary["significant"]
    ]
    return shown.drop(columns=[f"{c}_std" for c in SPREAD_COLUMNS] + ["ci_low", "ci_high"])


def _significant(value: Any) -> bool:
    """A ``significant`` cell as read back from CSV (``True``/``1.0``) or kept in memory."""
    return bool(value in (True, 1, "True"))


def _interval(row: pd.Series) -> str:
    """``[low, high]*`` of a row's paired interval (``*``: significant), ``-`` where there is none."""
    if pd.isna(row.get("ci_low")):
        return "-"
    star = "*" if _significant(row.get("significant")) else ""
    return f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]{star}"


def write_report(
    runs: list[ReportRun],
    out_dir: Path,
    curves: dict[str, pd.DataFrame] | None = None,
    modes: dict[str, str] | None = None,
) -> None:
    """Write a sweep's report into ``out_dir``.

    Files: ``comparison.csv``/``.md`` (one row per run, with what it prunes: the
    :data:`PRUNING_COLUMNS`), ``summary.csv``/``.md`` (one row per group: mean and std over seeds, and
    the paired difference to the baseline with its interval), ``significance.csv``/``.md`` (the pairs
    of :func:`comparison_pairs`), ``pareto.png`` (:func:`plot_pareto`) and, with ``curves``,
    ``curves.png``.

    The intervals are percentile bootstrap intervals (:func:`acdc_prune.experiments.stats.paired_bootstrap`,
    10,000 resamples, seed 0) of the mean over patients of the paired difference in per-patient mean
    foreground Dice, each group's Dice averaged over its seeds first: they measure the uncertainty
    from the choice of patients; the ``_std`` columns show the spread over seeds.

    Args:
        runs: the baselines (group ``baseline``) and the finished arms.
        out_dir: the report folder (created).
        curves: run name -> its ``metrics.csv`` table, for ``curves.png``.
        modes: run name -> mode, for the colours of ``curves.png``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            **summary_row(run.arm, run.setting, run.mode, run.before, run.after),
            "group": run.group,
            "seed": run.seed,
            **{column: getattr(run, column) for column in PRUNING_COLUMNS},
        }
        for run in runs
    ]
    frame = comparison_frame(rows)
    write_tables(frame, out_dir)
    summary = seed_summary(frame)
    groups = {group: [run.per_volume for run in runs if run.group == group] for group in summary["arm"]}
    significance = significance_frame(
        summary, {group: per_patient_dice(paths) for group, paths in groups.items()}
    )
    summary = with_baseline_significance(summary, significance)
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out_dir / "summary.md", markdown(summary_markdown(summary)))
    write_tables(significance, out_dir, "significance")
    plot_pareto(summary, out_dir / "pareto.png")
    if curves:
        plot_training_curves(curves, modes or {}, out_dir / "curves.png")


def read_summary(report_dir: Path) -> pd.DataFrame:
    """The ``summary.csv`` of a report folder (see :func:`write_report`)."""
    return pd.read_csv(Path(report_dir) / "summary.csv")


RICH_COLUMNS = {
    "arm": "arm",
    "params": "params",
    "macs_pct": "MACs",
    "latency_ms": "ms",
    "dice_before": "before",
    "dice": "after",
    "dice_delta": "delta",
    "ci": "95% CI",
}


def _cell(column: str, row: pd.Series) -> str:
    """A table cell of ``row`` in the column's format; ``-`` for missing values."""
    if column == "ci":
        return _interval(row)
    value = row[column]
    if column == "arm":
        return str(value)
    if value is None or pd.isna(value):
        return "-"
    if column == "params":
        return f"{int(value):,}"
    if column == "macs_pct":
        return f"{value:.0f}%"
    if column == "latency_ms":
        return f"{value:.1f}"
    if column == "dice_delta":
        return f"{value:+.3f}"
    spread = row.get(f"{column}_std")
    return f"{value:.3f}" if spread is None or pd.isna(spread) else f"{value:.3f}±{spread:.3f}"


def rich_table(summary: pd.DataFrame, title: str) -> Table:
    """The headline columns of a report's summary (:func:`read_summary`) as a rich table."""
    caption = (
        "before/after: mean foreground 3D Dice of the pruned network before/after retraining (± std over "
        "seeds); delta: after minus baseline; 95% CI: paired per-patient bootstrap interval of the "
        "difference to the baseline, * excludes 0; MACs: share of the baseline's; ms: CPU latency per slice"
    )
    table = Table(title=title, caption=caption)
    for column, header in RICH_COLUMNS.items():
        table.add_column(header, justify="left" if column == "arm" else "right", no_wrap=True)
    for _, row in summary.iterrows():
        table.add_row(*(_cell(column, row) for column in RICH_COLUMNS))
    return table
