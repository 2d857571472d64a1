"""What a run writes each epoch: metrics JSON/CSV, the curves PNG, TensorBoard, W&B and MLflow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from acdc_prune.config import Config
from acdc_prune.engine.progress import Reporter
from acdc_prune.engine.validation import DICE_KEYS
from acdc_prune.io import atomic_save_figure, atomic_write_json, atomic_write_text


class RunLog:
    """Per-epoch outputs of a run: metrics JSON/CSV, curves PNG, TensorBoard and (optional) W&B and MLflow.

    Args:
        run_dir: the run folder.
        config: the run's config (``logging`` decides the trackers).
        reporter: receives a note when a tracker is on but not installed.
        first_epoch: first epoch this process logs (TensorBoard drops later events of a resumed run).
    """

    def __init__(self, run_dir: Path, config: Config, reporter: Reporter, first_epoch: int) -> None:
        self.run_dir = run_dir
        self.writer = None
        self.wandb = None
        self.mlflow = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_epoch)
        if config.logging.wandb:
            if importlib.util.find_spec("wandb") is None:
                reporter.note("logging.wandb is on but wandb is not installed: skipped")
            else:
                import wandb

                self.wandb = wandb.init(
                    project=config.logging.wandb_project,
                    name=f"{run_dir.parent.name}/{run_dir.name}",
                    dir=str(run_dir),
                    config=config.to_dict(),
                    resume="allow",
                    id=f"{run_dir.parent.name}-{run_dir.name}",
                )
        if config.logging.mlflow:
            if importlib.util.find_spec("mlflow") is None:
                reporter.note("logging.mlflow is on but mlflow is not installed: skipped")
            else:
                from acdc_prune.engine.tracking import MlflowRun

                self.mlflow = MlflowRun(run_dir, config)

    def log(self, history: list[dict[str, Any]], best_dice: float | None, best_epoch: int | None) -> None:
        """Rewrite the metrics files (and, on validated epochs, the curves) for ``history``; send its
        last row to the trackers."""
        atomic_write_json(
            self.run_dir / "metrics.json",
            {"best_dice": best_dice, "best_epoch": best_epoch, "epochs": history},
        )
        columns = list(history[0])
        lines = [",".join(columns)]
        lines += [",".join("" if row[c] is None else repr(row[c]) for c in columns) for row in history]
        atomic_write_text(self.run_dir / "metrics.csv", "\n".join(lines) + "\n")
        row = history[-1]
        if row["dice_mean"] is not None:  # plotting takes about a second: on validated epochs only
            plot_curves(history, self.run_dir / "curves.png")
        scalars = {k: v for k, v in row.items() if k != "epoch" and v is not None}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["epoch"])
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=row["epoch"])

    def close(self) -> None:
        """Flush and close the trackers; the MLflow run gets the metrics files and curves as artifacts.

        Called from a ``finally`` block: an exception on its way out marks the MLflow run ``KILLED``
        (Ctrl-C) or ``FAILED`` instead of ``FINISHED``.
        """
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            error = sys.exc_info()[0]
            status = "FINISHED" if error is None else "FAILED"
            if error is not None and issubclass(error, KeyboardInterrupt):
                status = "KILLED"
            files = ("config.yaml", "metrics.json", "metrics.csv", "curves.png")
            self.mlflow.finish([self.run_dir / name for name in files], status)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss, validation Dice per structure and the learning rate against the epoch (PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(12, 3.6), layout="tight")
    loss_ax, dice_ax, lr_ax = figure.subplots(1, 3)
    loss_ax.plot(epochs, [row["train_loss"] for row in history], color="black")
    loss_ax.set(title="training loss (DiceCE)", xlabel="epoch")
    for key in DICE_KEYS:
        points = [(row["epoch"], row[key]) for row in history if row[key] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            dice_ax.plot(xs, ys, marker="o", markersize=3, label=key.removeprefix("dice_"))
    dice_ax.set(title="validation 3D Dice", xlabel="epoch", ylim=(0, 1))
    if dice_ax.lines:
        dice_ax.legend(loc="lower right")
    lr_ax.plot(epochs, [row["lr"] for row in history], color="tab:purple")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss_ax, dice_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    atomic_save_figure(figure, path, dpi=110)


def format_row(row: dict[str, Any], epochs: int) -> str:
    """The log line of one epoch: loss, learning rate, validation Dice when validated, time and speed."""
    text = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}"
    if row["dice_mean"] is not None:
        dice = "  ".join(f"{k.removeprefix('dice_')} {row[k]:.4f}" for k in DICE_KEYS if row[k] is not None)
        text += f"  Dice {dice}"
    return text + f"  {row['time_s']:.1f}s ({row['slices_per_s']:.1f} slices/s)"
