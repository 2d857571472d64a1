"""One optimisation step and one epoch: DiceCE, AdamW/SGD, warm-up + cosine/poly, seeded loaders."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Dataset, RandomSampler

from acdc_prune.config import TrainingConfig
from acdc_prune.engine import distributed
from acdc_prune.engine.precision import Precision
from acdc_prune.errors import AcdcPruneError, ConfigError

# Steps between progress refreshes: each refresh reads the running loss (a device sync on CUDA).
REFRESH_EVERY = 10


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
    """Per-iteration schedule (see :func:`lr_factor`) over ``cfg.schedule_offset + cfg.epochs`` epochs of
    steps, starting ``cfg.schedule_offset`` epochs in: learning-rate rewinding replays the tail of the
    original schedule that way (Renda et al. 2020)."""
    offset = cfg.schedule_offset * steps_per_epoch
    total = offset + cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total)
    kind = cfg.scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step + offset, warmup, total, kind)
    )


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
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
        image = plain_tensor(image).to(self.device, non_blocking=True, memory_format=memory_format)
        label = plain_tensor(label).to(self.device, non_blocking=True)
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
