"""Training loop: DiceCE, AdamW/SGD with warm-up + cosine/poly, 3D validation, checkpoints and logs."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
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
from acdc_prune.engine import distributed
from acdc_prune.engine.checkpoints import (
    checkpoint_config,
    read_checkpoint,
    rebuild_model,
    resolve_checkpoint,
    save_checkpoint,
)
from acdc_prune.engine.inference import predict_volume
from acdc_prune.engine.metrics import STRUCTURES, mean_foreground_dice, volume_metrics
from acdc_prune.engine.precision import Precision, resolve_precision
from acdc_prune.errors import AcdcPruneError, ConfigError, DiskFullError, Interrupted, ResourceError
from acdc_prune.io import (
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    new_run_dir,
    remove_leftovers,
)
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
    """One optimisation step: forward under autocast, DiceCE in float32, backward, clip, step, schedule.

    Args:
        model: network already on ``device`` in ``precision``'s memory format.
        loss_fn: loss of logits (N, C, H, W) and labels (N, 1, H, W).
        optimizer: optimiser over the model's parameters.
        scheduler: per-iteration learning-rate scheduler.
        device: where the step runs.
        precision: autocast dtype and memory format (gradients are scaled for float16 only).
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
        precision: Precision,
        grad_clip: float | None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.device, self.precision = device, precision
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scales_gradients)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Train on one batch: image (N, C_in, H, W) float, label (N, 1, H, W) integer classes.

        Returns:
            The batch loss, detached, still on the device (no host sync).
        """
        memory_format = self.precision.memory_format
        image = _plain(image).to(self.device, non_blocking=True, memory_format=memory_format)
        label = _plain(label).to(self.device, non_blocking=True)
        with self.precision.autocast(self.device):
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
    model: nn.Module, cfg: TrainingConfig, device: torch.device, steps_per_epoch: int, precision: Precision
) -> TrainStep:
    """Move ``model`` to ``device`` in ``precision``'s memory format and build its :class:`TrainStep`."""
    precision.prepare(model, device)
    optimizer = make_optimizer(model, cfg)
    return TrainStep(
        model,
        make_loss(cfg),
        optimizer,
        make_scheduler(optimizer, cfg, steps_per_epoch),
        device,
        precision=precision,
        grad_clip=cfg.grad_clip,
    )


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of everything random in ``epoch`` on process ``rank``: a run's randomness depends only on
    (seed, epoch, rank), so a resumed run draws exactly what an uninterrupted one would, without
    saving RNG states. Rank 0 draws what a single process draws."""
    entropy = [seed, epoch, rank] if rank else [seed, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_train_loader(
    dataset: Dataset,
    batch_size: int,
    steps: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    *,
    rank: int = 0,
    world_size: int = 1,
    rank_seed: int | None = None,
) -> DataLoader:
    """A MONAI loader yielding exactly ``steps`` shuffled batches of ``batch_size`` slices.

    Shuffling, and the random state of the dataset's MONAI transforms (set by MONAI's loader in the
    main process or its worker init), come from a generator seeded with ``seed``.

    With ``world_size`` processes, ``batch_size`` is the global batch: every process shuffles with
    ``seed`` alike and keeps its ``rank``'s share of each batch (``batch_size // world_size`` slices,
    see :class:`~acdc_prune.engine.distributed.ShardSampler`), while its transforms are seeded with
    ``rank_seed`` so that augmentations differ between processes.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=steps * batch_size, generator=generator)
    if world_size > 1:
        sampler = distributed.ShardSampler(sampler, batch_size, rank, world_size)
        generator = torch.Generator().manual_seed(seed if rank_seed is None else rank_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size // world_size,
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
        precision: precision and memory format of the forward passes.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, invert: Callable, read_label: Callable, precision: Precision
    ) -> None:
        self.dataset, self.batch_size, self.precision = dataset, batch_size, precision
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
            probs = predict_volume(model, item["image"], self.batch_size, device, self.precision)
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
    """Per-epoch outputs of a run: metrics JSON/CSV, curves PNG, TensorBoard and (optional) W&B and MLflow.

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
        self.mlflow = None
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
        if config.logging.mlflow:
            if importlib.util.find_spec("mlflow") is None:
                console.print("[yellow]logging.mlflow is on but mlflow is not installed: skipped[/]")
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


def _stop_note(run_dir: Path, done: int, resumable: bool) -> str:
    """What a run stopped after ``done`` epochs keeps, and the command that continues it if ``resumable``."""
    if not done:
        return "no checkpoint was written"
    kept = f"{run_dir / 'last.pt'} keeps epoch {done}"
    return f"{kept}; continue with: acdc-prune train --resume {run_dir}" if resumable else kept


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

    Under torchrun (``WORLD_SIZE`` > 1) the processes train one ``DistributedDataParallel`` model:
    ``training.batch_size`` is the global batch, split evenly over the processes; rank 0 alone
    validates, writes the run folder and shows progress, and every rank returns the same result.
    The process group is joined here and destroyed on return (also on errors) unless the caller had
    initialised it; a caller that trains more than once in a torchrun process must initialise it,
    since re-creating a destroyed group there hangs.

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
            checkpoint; AcdcPruneError: the loss became NaN/inf (``last.pt`` keeps the last good epoch);
            ResourceError: out of memory in a training step, or a full disk (``DiskFullError``);
            Interrupted (a ``KeyboardInterrupt``): Ctrl-C. Their messages say which epoch ``last.pt``
            keeps and, for a folder train named itself, the ``acdc-prune train --resume`` command.
    """
    with distributed.owned_process_group():
        return _train(config, resume, model, run_dir, plan_json, init_checkpoint_epochs, console)


def _train(
    config: Config,
    resume: Path | None,
    model: nn.Module | None,
    run_dir: Path | None,
    plan_json: str | None,
    init_checkpoint_epochs: bool,
    console: Console | None,
) -> TrainResult:
    """The body of :func:`train` (same arguments), inside the process group it may join."""
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
    ranks, device = distributed.join(resolve_device(cfg.device))
    distributed.check_global_batch(cfg.batch_size, ranks.world_size)
    if not ranks.is_main:
        console = Console(quiet=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    precision = resolve_precision(cfg.precision, cfg.channels_last, device, "training")
    eval_precision = resolve_precision(
        config.evaluation.precision, config.evaluation.channels_last, device, "evaluation"
    )
    # The run's config records what was resolved, so a resumed run computes in the same precision.
    cfg.precision, cfg.channels_last = precision.name, precision.channels_last
    config.evaluation.precision = eval_precision.name
    config.evaluation.channels_last = eval_precision.channels_last
    if model is None:
        seed_everything(cfg.seed)
        model = build_model(config.model)

    records = load_records(config.data, config.logging.runs_dir)
    train_records, val_records = split_records(records, config.data)
    divisor = total_stride(config.model)
    runs_dir = config.logging.runs_dir
    train_set = TrainSliceDataset(train_records, config.data, divisor, cfg.seed, runs_dir)
    validator = None
    if ranks.is_main:  # the other ranks receive rank 0's scores
        val_set = VolumeDataset(val_records, config.data, divisor, runs_dir)
        validator = Validator(
            val_set, config.evaluation.batch_size, invert_to_original, load_label, eval_precision
        )
    steps = cfg.iterations_per_epoch or max(1, len(train_set) // cfg.batch_size)

    step = build_train_step(model, cfg, device, steps, precision)
    step.model = distributed.wrap_model(model, device)

    # The run folder appears only once the data and the settings have passed their checks. A folder
    # that train names (new or resumed) is the user's to resume; a caller's folder is the caller's.
    resumable = run_dir is None or resume is not None
    if run_dir is None:  # named by rank 0 alone, so that all ranks share one new folder
        run_dir = distributed.broadcast_from_main(
            new_run_dir(config.logging.runs_dir, config.logging.experiment) if ranks.is_main else None
        )
    run_dir = Path(run_dir)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)
        save_config(config, run_dir / "config.yaml")
        save_split(run_dir / "split.json", train_records, val_records)

    history: list[dict[str, Any]] = list(checkpoint.get("history", []))
    best_dice, best_epoch = checkpoint.get("best_dice"), checkpoint.get("best_epoch")
    start = checkpoint.get("epoch", 0)
    if checkpoint:
        step.optimizer.load_state_dict(checkpoint["optimizer"])
        step.scheduler.load_state_dict(checkpoint["scheduler"])
        step.scaler.load_state_dict(checkpoint["scaler"])

    console.print(f"{precision.describe()}; validation {eval_precision.describe()}")
    log = RunLog(run_dir, config, console, first_epoch=start + 1) if ranks.is_main else None
    progress = make_progress(console, config.logging.progress and ranks.is_main)
    epoch_task = progress.add_task("epochs", total=cfg.epochs, completed=start, info="")
    batch_task = progress.add_task("batches", total=steps, info="")
    try:
        with progress:
            for epoch in range(start + 1, cfg.epochs + 1):
                seed = epoch_seed(cfg.seed, epoch)
                rank_seed = epoch_seed(cfg.seed, epoch, ranks.rank)
                seed_everything(rank_seed)
                loader = make_train_loader(
                    train_set,
                    cfg.batch_size,
                    steps,
                    seed,
                    config.data.num_workers,
                    device.type == "cuda",
                    rank=ranks.rank,
                    world_size=ranks.world_size,
                    rank_seed=rank_seed,
                )
                progress.reset(batch_task, total=steps, description=f"epoch {epoch}", info="")
                began = time.perf_counter()

                def refresh(done: int, loss: float, slices: int, began: float = began) -> None:
                    speed = slices * ranks.world_size / max(time.perf_counter() - began, 1e-9)
                    progress.update(batch_task, completed=done, info=f"loss {loss:.4f}  {speed:.1f} slices/s")

                try:
                    train_loss, slices = run_epoch(step, loader, refresh)
                except NonFiniteLoss as err:
                    kept = _stop_note(run_dir, start, resumable=False)  # resuming would diverge again
                    raise AcdcPruneError(f"training stopped at epoch {epoch}: {err}; {kept}") from None
                except torch.OutOfMemoryError:
                    raise ResourceError(
                        f"out of memory on {device} in epoch {epoch} (training.batch_size {cfg.batch_size}, "
                        f"data.patch_size {config.data.patch_size}); train again with a lower "
                        f"training.batch_size or data.patch_size, e.g. --set training.batch_size="
                        f"{max(1, cfg.batch_size // 2)}; {_stop_note(run_dir, start, resumable=False)}"
                    ) from None
                elapsed = time.perf_counter() - began
                row = {
                    "epoch": epoch,
                    "train_loss": distributed.mean_over_ranks(train_loss, device),
                    "lr": step.optimizer.param_groups[0]["lr"],
                    **dict.fromkeys(DICE_KEYS),
                    "time_s": elapsed,
                    "slices_per_s": slices * ranks.world_size / elapsed,
                }
                if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
                    scores = validator(model, device) if validator is not None else None
                    row.update(distributed.broadcast_from_main(scores))
                    row["time_s"] = time.perf_counter() - began
                history.append(row)
                improved = row["dice_mean"] is not None and (
                    best_dice is None or row["dice_mean"] > best_dice
                )
                if improved:
                    best_dice, best_epoch = row["dice_mean"], epoch
                # last.pt is written last: it marks the epoch complete. A crash before it makes the
                # resumed run redo this epoch and rewrite everything written before it.
                if log is not None:
                    log.log(history, best_dice, best_epoch)
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
                if ranks.is_main:
                    for name in [*names, "last"]:
                        save_checkpoint(
                            run_dir / f"{name}.pt",
                            model,
                            config,
                            epoch=epoch,
                            state=state,
                            plan_json=plan_json,
                        )
                start = epoch
                progress.update(epoch_task, completed=epoch)
                progress.console.print(_format_row(row, cfg.epochs), soft_wrap=True)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped in epoch {start + 1}; {_stop_note(run_dir, start, resumable)}") from None
    except DiskFullError as err:
        if not (resumable and start):
            raise
        raise DiskFullError(err.path, f"resume the run ({_stop_note(run_dir, start, resumable)})") from None
    finally:
        if log is not None:
            log.close()
    distributed.barrier()  # no rank returns before rank 0 has written the run folder
    return TrainResult(run_dir=run_dir, best_dice=best_dice, best_epoch=best_epoch, history=history)
