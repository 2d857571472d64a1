"""Training: epochs of ``TrainStep``, 3D validation, checkpoints and logs; seeded and exactly resumable."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_prune.config import Config, save_config
from acdc_prune.engine import distributed
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.device import resolve_device
from acdc_prune.engine.precision import Precision, resolve_precision
from acdc_prune.engine.progress import LogReporter, Reporter
from acdc_prune.engine.runlog import RunLog, format_row
from acdc_prune.engine.steps import (
    NonFiniteLoss,
    TrainStep,
    build_train_step,
    epoch_seed,
    make_train_loader,
    run_epoch,
    seed_everything,
)
from acdc_prune.engine.validation import DICE_KEYS, Validator, postprocessing_choice
from acdc_prune.errors import AcdcPruneError, ConfigError, DiskFullError, Hint, Interrupted, ResourceError
from acdc_prune.io import new_run_dir, remove_leftovers
from acdc_prune.models import build_model, total_stride
from acdc_prune.pruning import PruningPlan


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
        model: the trained network on its device with the weights of ``best.pt`` (of the last epoch
            when no epoch was validated), in eval mode.
    """

    run_dir: Path
    best_dice: float | None
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None


@dataclass
class _Run:
    """Everything one training needs, prepared and checked before its folder appears."""

    config: Config
    model: nn.Module
    plan: PruningPlan | None
    device: torch.device
    ranks: distributed.Ranks
    step: TrainStep
    train_set: Any
    split: tuple[list[Any], list[Any]]
    validator: Validator | None
    steps: int
    prior: Checkpoint | None
    precision_note: str = ""
    run_dir: Path | None = None
    resumable: bool = True
    best_weights: dict[str, torch.Tensor] | None = None


def train(
    config: Config,
    *,
    resume: Path | None = None,
    model: nn.Module | Checkpoint | None = None,
    run_dir: Path | None = None,
    plan: PruningPlan | None = None,
    init_checkpoint_epochs: bool = True,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train a segmentation network on 2D slices and validate it on whole volumes in 3D.

    Each epoch draws ``training.iterations_per_epoch`` batches (default: one pass over the slices)
    with every random choice seeded by (``training.seed``, epoch), so CPU runs repeat exactly and a
    resumed run ends identical to an uninterrupted one. Validation (every ``training.val_every``
    epochs and at the last) scores the mean foreground 3D Dice in each volume's original geometry.
    ``training.precision`` and ``training.channels_last`` are resolved for the device, reported
    once and written into the run's config.

    Under torchrun (``WORLD_SIZE`` > 1) the processes train one ``DistributedDataParallel`` model:
    ``training.batch_size`` is the global batch, split evenly over the processes; rank 0 alone
    validates, writes the run folder and reports progress, and every rank returns the same result.
    The process group is joined here and destroyed on return (also on errors) unless the caller had
    initialised it; a caller that trains more than once in a torchrun process must initialise it,
    since re-creating a destroyed group there hangs.

    Args:
        config: the experiment config.
        resume: a run folder (or its ``last.pt``) to continue; its stored config is used, except
            ``training.epochs`` which comes from ``config`` (so a finished run can be extended; the
            schedule is then stretched to the new length).
        model: a network (e.g. a pruned one) or a :class:`Checkpoint` whose network to start from,
            instead of building ``config.model`` from scratch.
        run_dir: folder to write into (created if missing); default a new
            ``logging.runs_dir/logging.experiment/<timestamp>`` folder that no other run shares.
        plan: the pruning plan of ``model`` against ``config.model``, stored in every checkpoint so
            loading rebuilds it (taken from ``model`` when it is a pruned :class:`Checkpoint`).
        init_checkpoint_epochs: write ``epochN.pt`` at ``training.checkpoint_epochs`` (the rewind
            points); retraining a pruned network turns this off.
        reporter: receives progress bars and per-epoch lines (default: the ``acdc_prune`` logger).

    Returns:
        :class:`TrainResult` with the run folder, best Dice and epoch, history and trained model.

    Raises:
        ConfigError: bad device or settings; DataError: unreadable data; CheckpointError: bad resume
            checkpoint; AcdcPruneError: the loss became NaN/inf (``last.pt`` keeps the last good epoch);
            ResourceError: out of memory in a training step, or a full disk (``DiskFullError``);
            Interrupted (a ``KeyboardInterrupt``): Ctrl-C. Their messages say which epoch ``last.pt``
            keeps and, for a folder train named itself, carry a ``resume`` hint.
    """
    reporter = reporter or LogReporter()
    with distributed.owned_process_group():
        run = _prepare(config, resume, model, plan)
        _open_run_dir(run, run_dir, resume)
        return _loop(run, init_checkpoint_epochs, reporter)


def _starting_point(
    config: Config, resume: Path | None, model: nn.Module | Checkpoint | None, plan: PruningPlan | None
) -> tuple[Config, nn.Module | None, PruningPlan | None, Checkpoint | None]:
    """(config, model, plan, checkpoint to continue) from the arguments of :func:`train`."""
    if resume is None:
        if isinstance(model, Checkpoint):
            return config, model.build_model(), plan or model.plan, None
        return config, model, plan, None
    if model is not None:
        raise ConfigError("resume and model are exclusive: a resumed run rebuilds its model from last.pt")
    prior = Checkpoint.open(resume, "last")
    stored = prior.config
    stored.training.epochs = config.training.epochs
    if prior.epoch >= stored.training.epochs:
        raise ConfigError(
            f"run {prior.run_dir} has already trained {prior.epoch} epochs; "
            f"set training.epochs above that to continue it",
            Hint("training.epochs", prior.epoch + 1),
        )
    if "optimizer" not in prior.state:
        raise ConfigError(f"{prior.path} holds no optimiser state, so the run cannot be resumed from it")
    return stored, prior.build_model(), prior.plan, prior


def _resolve_precisions(config: Config, device: torch.device) -> tuple[Precision, Precision]:
    """Resolve training and validation precision and record them in ``config``."""
    cfg, evaluation = config.training, config.evaluation
    precision = resolve_precision(cfg.precision, cfg.channels_last, device, "training")
    validation = resolve_precision(evaluation.precision, evaluation.channels_last, device, "evaluation")
    # The run's config records what was resolved, so a resumed run computes in the same precision.
    cfg.precision, cfg.channels_last = precision.name, precision.channels_last
    evaluation.precision, evaluation.channels_last = validation.name, validation.channels_last
    return precision, validation


def _prepare(
    config: Config,
    resume: Path | None,
    model: nn.Module | Checkpoint | None,
    plan: PruningPlan | None,
) -> _Run:
    """Check the settings, build the model, the data sets and the optimisation step."""
    from acdc_prune.data import TrainSliceDataset, VolumeDataset, load_label, load_records, split_records

    config, model, plan, prior = _starting_point(config, resume, model, plan)
    cfg = config.training
    ranks, device = distributed.join(resolve_device(cfg.device))
    distributed.check_global_batch(cfg.batch_size, ranks.world_size)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    precision, validation = _resolve_precisions(config, device)
    if model is None:
        seed_everything(cfg.seed)
        model = build_model(config.model)

    records = load_records(config.data, config.cache_dir)
    train_records, val_records = split_records(records, config.data)
    divisor = total_stride(config.model)
    train_set = TrainSliceDataset(train_records, config.data, divisor, cfg.seed, config.cache_dir)
    validator = None
    if ranks.is_main:  # the other ranks receive rank 0's scores
        val_set = VolumeDataset(val_records, config.data, divisor, config.cache_dir)
        validator = Validator(val_set, config.evaluation.batch_size, load_label, validation)
    steps = cfg.iterations_per_epoch or max(1, len(train_set) // cfg.batch_size)
    step = build_train_step(model, cfg, device, steps, precision)
    step.model = distributed.wrap_model(model, device)
    if prior is not None:
        step.optimizer.load_state_dict(prior.state["optimizer"])
        step.scheduler.load_state_dict(prior.state["scheduler"])
        step.scaler.load_state_dict(prior.state["scaler"])
    split = (train_records, val_records)
    note = f"{precision.describe()}; validation {validation.describe()}"
    return _Run(config, model, plan, device, ranks, step, train_set, split, validator, steps, prior, note)


def _open_run_dir(run: _Run, run_dir: Path | None, resume: Path | None) -> None:
    """Name (and on rank 0 create) the run folder, once the data and the settings passed their checks.

    A folder that train names (new or resumed) is the user's to resume; a caller's is the caller's.
    """
    from acdc_prune.data import save_split

    run.resumable = run_dir is None or resume is not None
    if run.prior is not None:
        run_dir = run.prior.run_dir
    elif run_dir is None:  # named by rank 0 alone, so that all ranks share one new folder
        logging_cfg = run.config.logging
        main_dir = new_run_dir(logging_cfg.runs_dir, logging_cfg.experiment) if run.ranks.is_main else None
        run_dir = distributed.broadcast_from_main(main_dir)
    run.run_dir = Path(run_dir)
    if run.ranks.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run.run_dir)
        save_config(run.config, run.run_dir / "config.yaml")
        save_split(run.run_dir / "split.json", *run.split)


def _stopped(run: _Run, done: int, resumable: bool) -> tuple[str, Hint | None]:
    """What a run stopped after ``done`` epochs keeps, and a ``resume`` hint if it can continue."""
    if not done:
        return "no checkpoint was written", None
    kept = f"{run.run_dir / 'last.pt'} keeps epoch {done}"
    return kept, Hint("resume", run.run_dir) if resumable else None


def _train_epoch(run: _Run, epoch: int, reporter: Reporter) -> dict[str, Any]:
    """Train one epoch and validate when due; the epoch's history row."""
    cfg, ranks = run.config.training, run.ranks
    seed, rank_seed = epoch_seed(cfg.seed, epoch), epoch_seed(cfg.seed, epoch, ranks.rank)
    seed_everything(rank_seed)
    loader = make_train_loader(
        run.train_set,
        cfg.batch_size,
        run.steps,
        seed,
        run.config.data.num_workers,
        run.device.type == "cuda",
        rank=ranks.rank,
        world_size=ranks.world_size,
        rank_seed=rank_seed,
    )
    reporter.start("batches", run.steps, description=f"epoch {epoch}")
    began = time.perf_counter()

    def refresh(done: int, loss: float, slices: int) -> None:
        speed = slices * ranks.world_size / max(time.perf_counter() - began, 1e-9)
        reporter.update("batches", done, f"loss {loss:.4f}  {speed:.1f} slices/s")

    train_loss, slices = run_epoch(run.step, loader, refresh)
    elapsed = time.perf_counter() - began
    row = {
        "epoch": epoch,
        "train_loss": distributed.mean_over_ranks(train_loss, run.device),
        "lr": run.step.optimizer.param_groups[0]["lr"],
        **dict.fromkeys(DICE_KEYS),
        "time_s": elapsed,
        "slices_per_s": slices * ranks.world_size / elapsed,
    }
    if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
        scores = run.validator(run.model, run.device) if run.validator is not None else None
        row.update(distributed.broadcast_from_main(scores))
        row["time_s"] = time.perf_counter() - began
    return row


def _guarded_epoch(run: _Run, epoch: int, done: int, reporter: Reporter) -> dict[str, Any]:
    """:func:`_train_epoch`, with a NaN loss and out-of-memory turned into one-line errors."""
    cfg = run.config.training
    try:
        return _train_epoch(run, epoch, reporter)
    except NonFiniteLoss as err:
        kept, _ = _stopped(run, done, resumable=False)  # resuming would diverge again
        raise AcdcPruneError(f"training stopped at epoch {epoch}: {err}; {kept}") from None
    except torch.OutOfMemoryError:
        kept, _ = _stopped(run, done, resumable=False)
        raise ResourceError(
            f"out of memory on {run.device} in epoch {epoch} (training.batch_size {cfg.batch_size}, "
            f"data.patch_size {run.config.data.patch_size}); train again with a lower "
            f"training.batch_size or data.patch_size; {kept}",
            Hint("training.batch_size", max(1, cfg.batch_size // 2)),
        ) from None


def _save(run: _Run, epoch: int, history: list[dict[str, Any]], best: tuple, names: list[str]) -> None:
    """Write checkpoints ``names`` and then ``last.pt``, which marks the epoch complete.

    A crash before ``last.pt`` makes the resumed run redo this epoch and rewrite everything before it.
    """
    step = run.step
    state = {
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "history": history,
        "best_dice": best[0],
        "best_epoch": best[1],
    }
    best_row = next((row for row in history if row["epoch"] == best[1]), None)
    choice = postprocessing_choice(best_row) if best_row is not None else None
    if choice is not None:
        state["postprocessing"] = choice
    checkpoint = Checkpoint.of(run.model, run.config, epoch=epoch, plan=run.plan, state=state)
    for name in [*names, "last"]:
        checkpoint.save(run.run_dir / f"{name}.pt")


def _loop(run: _Run, init_checkpoint_epochs: bool, reporter: Reporter) -> TrainResult:
    """Run the remaining epochs; write logs and checkpoints on rank 0; the result on every rank."""
    cfg, ranks = run.config.training, run.ranks
    prior_state = run.prior.state if run.prior is not None else {}
    history: list[dict[str, Any]] = list(prior_state.get("history", []))
    best = (prior_state.get("best_dice"), prior_state.get("best_epoch"))
    done = run.prior.epoch if run.prior is not None else 0
    shown = reporter if ranks.is_main and run.config.logging.progress else LogReporter()
    log = RunLog(run.run_dir, run.config, reporter, first_epoch=done + 1) if ranks.is_main else None
    if ranks.is_main:  # once every check has passed and the run folder exists
        reporter.note(run.precision_note)
    shown.start("epochs", cfg.epochs, completed=done)
    try:
        for epoch in range(done + 1, cfg.epochs + 1):
            row = _guarded_epoch(run, epoch, done, shown)
            history.append(row)
            improved = row["dice_mean"] is not None and (best[0] is None or row["dice_mean"] > best[0])
            if improved:
                best = (row["dice_mean"], epoch)
                run.best_weights = copy.deepcopy(run.model.state_dict())
            if log is not None:
                log.log(history, *best)
            names = ["best"] if improved else []
            if init_checkpoint_epochs and epoch in cfg.checkpoint_epochs:
                names.append(f"epoch{epoch}")
            if ranks.is_main:
                _save(run, epoch, history, best, names)
            done = epoch
            shown.update("epochs", epoch)
            if ranks.is_main:
                reporter.note(format_row(row, cfg.epochs))
    except KeyboardInterrupt:
        kept, hint = _stopped(run, done, run.resumable)
        raise Interrupted(f"stopped in epoch {done + 1}; {kept}", hint) from None
    except DiskFullError as err:
        if not (run.resumable and done):
            raise
        kept, hint = _stopped(run, done, run.resumable)
        raise DiskFullError(err.path, f"resume the run ({kept})", hint) from None
    finally:
        shown.finish("batches")
        shown.finish("epochs")
        if log is not None:
            log.close()
    distributed.barrier()  # no rank returns before rank 0 has written the run folder
    return TrainResult(run.run_dir, best[0], best[1], history, _best_model(run, best[1]))


def _best_model(run: _Run, best_epoch: int | None) -> nn.Module:
    """The trained network with the weights ``best.pt`` holds (the last epoch's when none is best)."""
    if run.best_weights is not None:
        run.model.load_state_dict(run.best_weights)
    elif best_epoch is not None:  # a resumed run whose best epoch came before the resumption
        run.model.load_state_dict(Checkpoint.open(run.run_dir, "best").weights)
    return run.model.eval()
