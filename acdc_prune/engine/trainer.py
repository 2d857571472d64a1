"""Training loop: DiceCE, AdamW/SGD with warm-up + cosine/poly, 3D validation, checkpoints and logs."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import Dataset, RandomSampler

from acdc_prune.config import Config, TrainingConfig, save_config
from acdc_prune.engine.checkpoints import (
    checkpoint_config,
    read_checkpoint,
    rebuild_model,
    resolve_checkpoint,
    save_checkpoint,
)
from acdc_prune.engine.inference import predict_volume
from acdc_prune.engine.metrics import STRUCTURES, mean_foreground_dice, volume_metrics
from acdc_prune.errors import AcdcPruneError, ConfigError
from acdc_prune.io import atomic_write_json, atomic_write_text, new_run_dir
from acdc_prune.models import build_model, total_stride

DICE_KEYS = tuple(f"dice_{name}" for name in STRUCTURES.values()) + ("dice_mean",)
# Steps between progress refreshes: each refresh reads the running loss (a device sync on CUDA).
REFRESH_EVERY = 10


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder holding checkpoints, config, split and logs.
        best_dice: best validation mean foreground 3D Dice, or ``None`` if never defined.
        best_epoch: epoch of ``best.pt``, or ``None``.
        history: one dict per epoch (``epoch``, ``train_loss``, ``lr``, ``dice_RV``, ``dice_MYO``,
            ``dice_LV``, ``dice_mean``, ``time_s``, ``slices_per_s``); Dice is ``None`` on epochs
            without validation.
    """

    run_dir: Path
    best_dice: float | None
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device (checked to exist).

    Raises:
        ConfigError: CUDA requested but not available, or an unknown device string.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"training.device: '{spec}' is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device: '{spec}' requested but CUDA is not available (use auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"training.device: '{spec}' is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def make_loss(cfg: TrainingConfig) -> nn.Module:
    """DiceCE on softmax outputs with one-hot targets.

    Background is left out of the Dice term (as in nnU-Net): it dominates every slice and would
    flatten the foreground gradient; cross-entropy still covers it. The Dice is a batch Dice (over
    all slices of the batch together), so slices missing a structure do not produce 0/0 noise.
    Input: logits (N, C, H, W) and labels (N, 1, H, W) with values 0..C-1.

    Raises:
        ConfigError: both loss weights are zero.
    """
    if cfg.dice_weight == 0 and cfg.ce_weight == 0:
        raise ConfigError(
            "training.dice_weight and training.ce_weight are both 0: the loss would be constant"
        )
    return DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        batch=True,
        lambda_dice=cfg.dice_weight,
        lambda_ce=cfg.ce_weight,
    )


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum, over all trainable parameters at ``cfg.lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimisation step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (from ``1 / warmup_steps`` to 1), then ``cosine`` (to 0),
    ``poly`` (``(1 - t) ** 0.9`` as in nnU-Net) or ``none`` (constant) over the remaining steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "none":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule over ``cfg.epochs * steps_per_epoch`` steps (see :func:`lr_factor`)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total)
    kind = cfg.scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, kind))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata: a MetaTensor would route every layer through ``__torch_function__``."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


class TrainStep:
    """One optimisation step: forward (autocast on CUDA), DiceCE, backward, clip, step, schedule.

    Args:
        model: network already on ``device`` (channels-last when ``channels_last``).
        loss_fn: loss of logits (N, C, H, W) and labels (N, 1, H, W).
        optimizer: optimiser over the model's parameters.
        scheduler: per-iteration learning-rate scheduler.
        device: where the step runs.
        amp: float16 autocast with gradient scaling (effective on CUDA only).
        channels_last: feed inputs in channels-last memory format.
        grad_clip: maximum global gradient norm, or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        *,
        amp: bool,
        channels_last: bool,
        grad_clip: float | None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Train on one batch: image (N, C_in, H, W) float, label (N, 1, H, W) integer classes.

        Returns:
            The batch loss, detached, still on the device (no host sync).
        """
        image = _plain(image).to(self.device, non_blocking=True, memory_format=self.memory_format)
        label = _plain(label).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()


def build_train_step(
    model: nn.Module, cfg: TrainingConfig, device: torch.device, steps_per_epoch: int
) -> TrainStep:
    """Move ``model`` to ``device`` (channels-last on CUDA if configured) and build its :class:`TrainStep`."""
    channels_last = cfg.channels_last and device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, cfg)
    return TrainStep(
        model,
        make_loss(cfg),
        optimizer,
        make_scheduler(optimizer, cfg, steps_per_epoch),
        device,
        amp=cfg.amp,
        channels_last=channels_last,
        grad_clip=cfg.grad_clip,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in ``epoch``: a run's randomness depends only on (seed, epoch),
    so a resumed run draws exactly what an uninterrupted one would, without saving RNG states."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_train_loader(
    dataset: Dataset, batch_size: int, steps: int, seed: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """A MONAI loader yielding exactly ``steps`` shuffled batches of ``batch_size`` slices.

    Shuffling, and the random state of the dataset's MONAI transforms (set by MONAI's loader in the
    main process or its worker init), come from a generator seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=steps * batch_size, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
    )


class NonFiniteLoss(AcdcPruneError):
    """The training loss became NaN or infinite."""


def _check_finite(mean_loss: float, steps: int) -> None:
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(
            f"the training loss became {mean_loss} within the first {steps} steps of the epoch"
        )


def run_epoch(
    step: TrainStep,
    batches: Iterable[dict[str, torch.Tensor]],
    on_refresh: Callable[[int, float, int], None] | None,
) -> tuple[float, int]:
    """Train over ``batches`` (dicts with ``image`` and ``label``); return (mean loss, slices seen).

    The loss is summed on the device; it is read back only every ``REFRESH_EVERY`` steps, when
    ``on_refresh(steps_done, mean_loss, slices)`` updates the progress display, and at the end.

    Raises:
        AcdcPruneError: the loss became NaN or infinite (checked at each read-back).
    """
    step.model.train()
    total = torch.zeros((), device=step.device)
    slices = 0
    done = 0
    for done, batch in enumerate(batches, start=1):
        total += step(batch["image"], batch["label"])
        slices += batch["image"].shape[0]
        if on_refresh is not None and done % REFRESH_EVERY == 0:
            mean = total.item() / done
            _check_finite(mean, done)
            on_refresh(done, mean, slices)
    mean = total.item() / max(done, 1)
    _check_finite(mean, done)
    if on_refresh is not None:
        on_refresh(done, mean, slices)
    return mean, slices


class Validator:
    """3D validation on whole volumes, scored in each volume's original geometry.

    Args:
        dataset: ``VolumeDataset`` items (``image`` (1, H, W, D), ``record``, ...).
        batch_size: slices per inference batch.
        invert: ``invert_to_original(probs (C, H, W, D), item) -> (C, X, Y, Z)``.
        read_label: ``load_label(record) -> (labels (X, Y, Z), spacing)``; read once and kept.
    """

    def __init__(self, dataset: Dataset, batch_size: int, invert: Callable, read_label: Callable) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.invert, self.read_label = invert, read_label
        self.labels: dict[int, tuple[np.ndarray, Any]] = {}

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float | None]:
        """Mean 3D Dice per structure over the volumes where it is defined, and the mean over
        volumes of each volume's mean foreground Dice (``dice_mean``); background is excluded."""
        per_structure: dict[str, list[float]] = {name: [] for name in STRUCTURES.values()}
        means: list[float] = []
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if index not in self.labels:
                self.labels[index] = self.read_label(item["record"])
            gt, spacing = self.labels[index]
            probs = predict_volume(model, item["image"], self.batch_size, device)
            pred = _plain(self.invert(probs, item)).argmax(dim=0).numpy().astype(np.uint8)
            scores = volume_metrics(pred, np.asarray(gt), tuple(spacing), hd_percentile=None)
            for name in per_structure:
                if scores[name]["dice"] is not None:
                    per_structure[name].append(scores[name]["dice"])
            mean = mean_foreground_dice(scores)
            if mean is not None:
                means.append(mean)
        result = {f"dice_{name}": _mean(values) for name, values in per_structure.items()}
        result["dice_mean"] = _mean(means)
        return result


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class RunLog:
    """Per-epoch outputs of a run: metrics JSON/CSV, curves PNG, TensorBoard and (optional) W&B.

    Args:
        run_dir: the run folder.
        config: the run's config (``logging`` decides the trackers).
        console: where warnings are printed.
        first_epoch: first epoch this process logs (TensorBoard drops later events of a resumed run).
    """

    def __init__(self, run_dir: Path, config: Config, console: Console, first_epoch: int) -> None:
        self.run_dir = run_dir
        self.writer = None
        self.wandb = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_epoch)
        if config.logging.wandb:
            if importlib.util.find_spec("wandb") is None:
                console.print("[yellow]logging.wandb is on but wandb is not installed: skipped[/]")
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

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def make_progress(console: Console, enabled: bool) -> Progress:
    """Rich progress display: description, bar, done/total, a free ``info`` field and the ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _format_row(row: dict[str, Any], epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}"
    if row["dice_mean"] is not None:
        dice = "  ".join(f"{k.removeprefix('dice_')} {row[k]:.4f}" for k in DICE_KEYS if row[k] is not None)
        text += f"  Dice {dice}"
    return text + f"  {row['time_s']:.1f}s ({row['slices_per_s']:.1f} slices/s)"


def _resume_state(resume: Path, config: Config) -> tuple[Config, nn.Module, str | None, Path, dict[str, Any]]:
    """Read ``resume``'s last.pt: (stored config with ``config``'s epochs, model, plan, run, checkpoint)."""
    path = resolve_checkpoint(resume, "last")
    checkpoint = read_checkpoint(path)
    stored = checkpoint_config(checkpoint, path)
    stored.training.epochs = config.training.epochs
    if checkpoint["epoch"] >= stored.training.epochs:
        raise ConfigError(
            f"run {path.parent} has already trained {checkpoint['epoch']} epochs; "
            f"set training.epochs above that to continue it"
        )
    if "optimizer" not in checkpoint:
        raise ConfigError(f"{path} holds no optimiser state, so the run cannot be resumed from it")
    return stored, rebuild_model(checkpoint, stored, path), checkpoint.get("plan"), path.parent, checkpoint


def train(
    config: Config,
    *,
    resume: Path | None = None,
    model: nn.Module | None = None,
    run_dir: Path | None = None,
    plan_json: str | None = None,
    init_checkpoint_epochs: bool = True,
    console: Console | None = None,
) -> TrainResult:
    """Train a segmentation network on 2D slices and validate it on whole volumes in 3D.

    Each epoch draws ``training.iterations_per_epoch`` batches (default: one pass over the slices)
    with every random choice seeded by (``training.seed``, epoch), so CPU runs repeat exactly and a
    resumed run ends identical to an uninterrupted one. Validation (every ``training.val_every``
    epochs and at the last) scores the mean foreground 3D Dice in each volume's original geometry.

    Args:
        config: the experiment config.
        resume: a run folder (or its ``last.pt``) to continue; its stored config is used, except
            ``training.epochs`` which comes from ``config`` (so a finished run can be extended; the
            schedule is then stretched to the new length).
        model: a network to train instead of building ``config.model`` (e.g. a pruned one).
        run_dir: folder to write into (created if missing); default a new
            ``logging.runs_dir/logging.experiment/<timestamp>`` folder that no other run shares.
        plan_json: JSON pruning plan of ``model``, stored in every checkpoint so loading rebuilds it.
        init_checkpoint_epochs: write ``epochN.pt`` at ``training.checkpoint_epochs`` (the rewind
            points); retraining a pruned network turns this off.
        console: rich console for progress bars and per-epoch lines.

    Returns:
        :class:`TrainResult` with the run folder, best Dice and epoch, and the per-epoch history.

    Raises:
        ConfigError: bad device or settings; DataError: unreadable data; CheckpointError: bad resume
            checkpoint; AcdcPruneError: the loss became NaN/inf (``last.pt`` keeps the last good epoch).
    """
    from acdc_prune.data import (
        TrainSliceDataset,
        VolumeDataset,
        invert_to_original,
        load_label,
        load_records,
        save_split,
        split_records,
    )

    console = console or Console()
    checkpoint: dict[str, Any] = {}
    if resume is not None:
        if model is not None:
            raise ConfigError("resume and model are exclusive: a resumed run rebuilds its model from last.pt")
        config, model, plan_json, run_dir, checkpoint = _resume_state(Path(resume), config)
    cfg = config.training
    device = resolve_device(cfg.device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if model is None:
        seed_everything(cfg.seed)
        model = build_model(config.model)
    if run_dir is None:
        run_dir = new_run_dir(config.logging.runs_dir, config.logging.experiment)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")

    records = load_records(config.data, config.logging.runs_dir)
    train_records, val_records = split_records(records, config.data)
    save_split(run_dir / "split.json", train_records, val_records)
    divisor = total_stride(config.model)
    runs_dir = config.logging.runs_dir
    train_set = TrainSliceDataset(train_records, config.data, divisor, cfg.seed, runs_dir)
    val_set = VolumeDataset(val_records, config.data, divisor, runs_dir)
    validator = Validator(val_set, config.evaluation.batch_size, invert_to_original, load_label)
    steps = cfg.iterations_per_epoch or max(1, len(train_set) // cfg.batch_size)

    step = build_train_step(model, cfg, device, steps)
    history: list[dict[str, Any]] = list(checkpoint.get("history", []))
    best_dice, best_epoch = checkpoint.get("best_dice"), checkpoint.get("best_epoch")
    start = checkpoint.get("epoch", 0)
    if checkpoint:
        step.optimizer.load_state_dict(checkpoint["optimizer"])
        step.scheduler.load_state_dict(checkpoint["scheduler"])
        step.scaler.load_state_dict(checkpoint["scaler"])

    log = RunLog(run_dir, config, console, first_epoch=start + 1)
    progress = make_progress(console, config.logging.progress)
    epoch_task = progress.add_task("epochs", total=cfg.epochs, completed=start, info="")
    batch_task = progress.add_task("batches", total=steps, info="")
    try:
        with progress:
            for epoch in range(start + 1, cfg.epochs + 1):
                seed = epoch_seed(cfg.seed, epoch)
                seed_everything(seed)
                loader = make_train_loader(
                    train_set, cfg.batch_size, steps, seed, config.data.num_workers, device.type == "cuda"
                )
                progress.reset(batch_task, total=steps, description=f"epoch {epoch}", info="")
                began = time.perf_counter()

                def refresh(done: int, loss: float, slices: int, began: float = began) -> None:
                    speed = slices / max(time.perf_counter() - began, 1e-9)
                    progress.update(batch_task, completed=done, info=f"loss {loss:.4f}  {speed:.1f} slices/s")

                try:
                    train_loss, slices = run_epoch(step, loader, refresh)
                except NonFiniteLoss as err:
                    kept = (
                        f"{run_dir / 'last.pt'} keeps epoch {start}" if start else "no checkpoint was written"
                    )
                    raise AcdcPruneError(f"training stopped at epoch {epoch}: {err}; {kept}") from None
                elapsed = time.perf_counter() - began
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "lr": step.optimizer.param_groups[0]["lr"],
                    **dict.fromkeys(DICE_KEYS),
                    "time_s": elapsed,
                    "slices_per_s": slices / elapsed,
                }
                if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
                    row.update(validator(model, device))
                    row["time_s"] = time.perf_counter() - began
                history.append(row)
                improved = row["dice_mean"] is not None and (
                    best_dice is None or row["dice_mean"] > best_dice
                )
                if improved:
                    best_dice, best_epoch = row["dice_mean"], epoch
                state = {
                    "optimizer": step.optimizer.state_dict(),
                    "scheduler": step.scheduler.state_dict(),
                    "scaler": step.scaler.state_dict(),
                    "history": history,
                    "best_dice": best_dice,
                    "best_epoch": best_epoch,
                }
                names = ["best"] if improved else []
                if init_checkpoint_epochs and epoch in cfg.checkpoint_epochs:
                    names.append(f"epoch{epoch}")
                for name in [*names, "last"]:
                    save_checkpoint(
                        run_dir / f"{name}.pt", model, config, epoch=epoch, state=state, plan_json=plan_json
                    )
                start = epoch
                log.log(history, best_dice, best_epoch)
                progress.update(epoch_task, completed=epoch)
                progress.console.print(_format_row(row, cfg.epochs), soft_wrap=True)
    finally:
        log.close()
    return TrainResult(run_dir=run_dir, best_dice=best_dice, best_epoch=best_epoch, history=history)
