"""The faces' shared renderer: rich progress, tables of results, and errors worded for each face's users.

The engine and the pruning package return data, report progress through
:class:`~acdc_prune.engine.progress.Reporter` and raise errors with a structured
:class:`~acdc_prune.errors.Hint`; the command line and the MONAI bundle show them through this module.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from acdc_prune.engine.clinical import INDICES
from acdc_prune.engine.evaluate import PHASES, SCORES, EvaluationResult, number_text
from acdc_prune.engine.export import TOLERANCE, ExportResult
from acdc_prune.engine.metrics import STRUCTURES
from acdc_prune.errors import Hint

CLI_HINTS: dict[str, str] = {
    "resume": "continue with: acdc-prune train --resume {value}",
    "force": "pass --force to replace it",
    "out": "give a file name with --out",
}
"""How the command line words a hint on an option; a dotted config key becomes ``--set key=value``."""
BUNDLE_HINTS: dict[str, str] = {
    "resume": "run the bundle's train config again with --resume {value}",
    "force": "remove the existing file or choose another output_dir",
    "out": "choose another output_dir",
}
"""How the MONAI bundle words a hint; a dotted config key becomes ``set key to value in ...``."""


def hint_text(hint: Hint, face: str = "cli") -> str:
    """Word ``hint`` for the users of ``face`` (``"cli"`` or ``"bundle"``)."""
    options = CLI_HINTS if face == "cli" else BUNDLE_HINTS
    if hint.setting in options:
        return options[hint.setting].format(value=hint.value)
    if face == "cli":
        return f"e.g. --set {hint.setting}={hint.value}"
    return f"e.g. set {hint.setting} to {hint.value} in configs/recipe.yaml"


def error_text(err: BaseException, face: str = "cli") -> str:
    """The one line a face shows for ``err``: its message and, when it has one, its worded hint."""
    message = getattr(err, "message", None) or str(err)
    hint = getattr(err, "hint", None)
    return message if hint is None else f"{message}; {hint_text(hint, face)}"


class RichReporter:
    """A :class:`~acdc_prune.engine.progress.Reporter` drawing rich bars and printing notes.

    Use it as a context manager around the work so the live display starts and stops cleanly.

    Args:
        console: where bars and notes go.
        bars: show progress bars (notes are printed either way).
    """

    def __init__(self, console: Console | None = None, bars: bool = True) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not bars,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, bar: str, total: int, completed: int = 0, description: str | None = None) -> None:
        """Show (or reset) bar ``bar``."""
        if bar in self.tasks:
            self.progress.reset(self.tasks[bar], total=total, completed=completed, info="")
            if description is not None:
                self.progress.update(self.tasks[bar], description=description)
        else:
            task = self.progress.add_task(description or bar, total=total, completed=completed, info="")
            self.tasks[bar] = task

    def update(self, bar: str, completed: int, info: str = "") -> None:
        """Move bar ``bar`` to ``completed``."""
        if bar in self.tasks:
            self.progress.update(self.tasks[bar], completed=completed, info=info)

    def finish(self, bar: str) -> None:
        """Keep bar ``bar`` as it is; it stops with the display."""

    def note(self, text: str) -> None:
        """Print one line above the bars."""
        self.progress.console.print(text, soft_wrap=True, markup=False, highlight=False)


def _cell(aggregate: dict[str, Any], digits: int) -> str:
    """``mean ± std`` of an aggregate, with the count of excluded volumes when there are any."""
    if aggregate["mean"] is None:
        text = "–"
    elif aggregate["std"] is None:
        text = f"{aggregate['mean']:.{digits}f}"
    else:
        text = f"{aggregate['mean']:.{digits}f} ± {aggregate['std']:.{digits}f}"
    if aggregate["excluded"]:
        text += f" [dim]({aggregate['excluded']} excl.)[/]"
    return text


def evaluation_summary_table(result: EvaluationResult) -> Table:
    """Rich table of the segmentation metrics per structure and phase (mean ± sd over volumes)."""
    summary = result.summary
    percentile = summary["hd_percentile"]
    table = Table(title=f"Segmentation metrics ({summary['n_volumes']} volumes, original geometry)")
    headers = {
        "dice": "Dice",
        "iou": "IoU",
        "precision": "Precision",
        "recall": "Recall",
        "hd": f"HD{percentile:g} (mm)",
        "slice_dice": "Slice Dice",
    }
    table.add_column("Structure")
    table.add_column("Phase")
    for metric in SCORES:
        table.add_column(headers[metric], justify="right")
    groups = [(phase, summary["phases"][phase]) for phase in PHASES if phase in summary["phases"]]
    groups.append(("all", summary["all"]))
    for name in STRUCTURES.values():
        for phase, group in groups:
            metrics = group[name]
            table.add_row(
                name,
                phase,
                *(_cell(metrics[metric], 2 if metric == "hd" else 3) for metric in SCORES),
                end_section=phase == "all",
            )
    table.caption = (
        f"mean Dice {number_text(summary['mean_dice'], '.3f')}, "
        f"mean HD{percentile:g} {number_text(summary['mean_hd'], '.2f')} mm"
    )
    return table


def clinical_table(result: EvaluationResult) -> Table:
    """Rich table of the clinical indices' agreement with the ground truth over patients."""
    table = Table(title="Clinical indices (prediction vs ground truth)")
    for column in ("Index", "Unit", "n", "MAE", "Bias", "95% limits", "Pearson r"):
        table.add_column(column, justify="left" if column in ("Index", "Unit") else "right")

    for index in INDICES:
        stats = result.summary["clinical"][index]
        limits = f"{stats['loa_low']:.1f} to {stats['loa_high']:.1f}" if stats["loa_low"] is not None else "–"
        table.add_row(
            index,
            str(stats["unit"]),
            str(stats["n"]),
            number_text(stats["mae"], ".1f"),
            number_text(stats["bias"], "+.1f"),
            limits,
            number_text(stats["pearson_r"], ".3f"),
        )
    return table


def cost_table(result: EvaluationResult) -> Table:
    """Rich table of the model's size, compute, latency and peak memory for one slice."""
    cost = result.summary["cost"]
    shape = "x".join(str(s) for s in cost["input_shape"])
    table = Table(title=f"Model cost (one slice, input {shape})", show_header=False)
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    table.add_row("Parameters", f"{cost['params'] / 1e6:.3f} M")
    table.add_row("MACs", f"{cost['macs'] / 1e9:.3f} G")
    for key in ("latency_cpu", "latency_cuda"):
        if key in cost:
            latency = cost[key]
            threads = f", {latency['threads']} threads" if "threads" in latency else ""
            if "load_average" in latency:
                threads += f", load {latency['load_average']:.1f}"
            table.add_row(
                f"Latency {latency['device']}{threads}",
                f"{latency['median_ms']:.2f} ms (IQR {latency['iqr_ms']:.2f}, n={latency['repeats']})",
            )
    memory = cost["peak_memory"]
    table.add_row(f"Peak memory ({memory['device']})", f"{memory['bytes'] / 2**20:.1f} MiB")
    return table


def print_evaluation(result: EvaluationResult, console: Console) -> None:
    """Print the segmentation, clinical and cost tables to ``console``."""
    console.print(evaluation_summary_table(result))
    console.print(clinical_table(result))
    console.print(cost_table(result))


def print_export(result: ExportResult, console: Console) -> None:
    """Print a table of an export to ``console``: file, size, input shape, deviation per check input."""
    table = Table(title=f"Export ({result.format})", show_header=False)
    table.add_column("", justify="left")
    table.add_column("", justify="left", overflow="fold")
    table.add_row("File", str(result.path))
    table.add_row("Size", f"{result.size_bytes / 2**20:.2f} MiB")
    opset = f", opset {result.details['opset']}" if "opset" in result.details else ""
    table.add_row("Exporter", f"{result.details['exporter']}{opset}, torch {result.details['torch']}")
    table.add_row("Input shape", " x ".join(str(s) for s in result.input_shape))
    for check in result.checks:
        shape = "x".join(str(s) for s in check["input_shape"])
        table.add_row(f"Max |deviation| at {shape}", f"{check['max_abs_deviation']:.2e}")
    table.add_row("Max |deviation|", f"{result.max_deviation:.2e} (tolerance {TOLERANCE:g})")
    table.add_row("Summary", str(result.json_path))
    console.print(table)


def print_inspection(result: Any, console: Console) -> None:
    """Print an inspection (:class:`~acdc_prune.experiments.inspect.InspectResult`): parameters per
    block, the ratios preview, and where the files are."""
    table = Table("block", "params", "share", "max width", title="parameters per block")
    for _, row in result.blocks.iterrows():
        table.add_row(
            row["block"], f"{int(row['params']):,}", f"{row['share_pct']:.1f}%", str(int(row["max_width"]))
        )
    console.print(table)
    if result.preview is not None:
        params, macs = result.preview["params"], result.preview["macs"]
        console.print(
            f"ratios preview: params {params['before']:,} -> {params['after']:,} "
            f"({100 * params['after'] / params['before']:.1f}%), "
            f"MACs {macs['before']:,} -> {macs['after']:,} "
            f"({100 * macs['after'] / macs['before']:.1f}%)"
        )
    console.print(f"inspection in [bold]{result.out_dir}[/]")


def print_pruning(result: Any, console: Console) -> None:
    """Print what a pruning (:class:`~acdc_prune.experiments.prune.PruneResult`) asked, reached and cost."""
    meta = result.meta
    params, macs = meta["params"], meta["macs"]
    asked = (
        f"target {meta['target']:g} of {meta['target_metric']}" if meta["target"] is not None else "ratios"
    )
    console.print(
        f"{meta['importance']}, {meta['scope']} scope, {asked}: params {params['before']:,} -> "
        f"{params['after']:,} ({params['before'] / params['after']:.1f}x fewer), MACs {macs['before']:,} -> "
        f"{macs['after']:,} ({macs['before'] / macs['after']:.1f}x fewer)"
    )
    console.print(
        f"mean Dice {result.before['mean_dice']:.4f} before retraining "
        f"(BatchNorm layers recalibrated: {meta['batchnorm_recalibrated']}), "
        f"{result.after['mean_dice']:.4f} after"
    )
    console.print(f"pruned model in [bold]{result.out_dir}[/]")


def print_sensitivity(result: Any, console: Console) -> None:
    """Print a sensitivity analysis (:class:`~acdc_prune.experiments.sensitivity.SensitivityResult`): the
    Dice loss of each block at each ratio, the unpruned Dice, what ``ratios.yaml`` keeps, and the folder."""
    meta, target = result.meta, result.meta["target"]
    table = Table(
        "block", *(f"{r:g}" for r in meta["ratios"]), title="Dice loss when one block is pruned by ratio"
    )
    for block, rows in result.table.groupby("block", sort=False):
        table.add_row(str(block), *(f"{loss:+.4f}" for loss in rows["dice_loss"]))
    console.print(table)
    recalibrated = meta.get("reference_recalibrated", {}).get("dice_mean")
    console.print(
        f"unpruned Dice {meta['reference']['dice_mean']:.4f}"
        + (f" ({recalibrated:.4f} recalibrated)" if recalibrated is not None else "")
        + f" on {len(meta['settings']['volumes'])} validation volumes; ratios.yaml keeps "
        f"{target['real_macs_fraction']:.3f} of the MACs (target {target['macs_fraction']:g})"
    )
    console.print(f"sensitivity in [bold]{result.out_dir}[/]")


def print_quantization(result: Any, console: Console) -> None:
    """Print a table of an int8 model (:class:`~acdc_prune.experiments.quantize.QuantizeResult`): file,
    size, calibration, layers left in float, QAT, and how far it is from the float model."""
    summary = result.summary
    facts = summary["quantization"]
    table = Table(title="int8 quantization", show_header=False)
    table.add_row("File", str(result.path))
    table.add_row(
        "Size", f"{facts['size_bytes'] / 2**20:.2f} MiB (float {facts['float_size_bytes'] / 2**20:.2f})"
    )
    calibration = summary["calibration"]
    table.add_row("Calibration", f"{calibration['slices']} training slices, {calibration['method']}")
    table.add_row("Float layers", ", ".join(facts["float_nodes"]))
    if "qat" in summary:
        qat, dice = summary["qat"], summary["qat"]["best_dice"]
        shown = f"{dice:.4f}" if dice is not None else "undefined"
        table.add_row("QAT epochs", f"{qat['epochs']}, best validation Dice {shown} (int8-rounded)")
    check = facts["check"]
    table.add_row(
        "Max |logit deviation|", f"{check['max_abs_logit_deviation']:.3g} on {check['slices']} slices"
    )
    table.add_row("Label agreement", f"{check['label_agreement']:.4%}")
    console.print(table)
