"""Quick scoring: BatchNorm recalibrated on fixed training batches, Dice on a fixed validation subset."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from acdc_prune.config import Config
from acdc_prune.experiments.reuse import BlockOutputs


def spread(count: int, n: int) -> list[int]:
    """Indices of ``min(n, count)`` items spread evenly over ``range(count)``, the first and last included."""
    if n >= count:
        return list(range(count))
    if n == 1:
        return [0]
    return [math.floor(i * (count - 1) / (n - 1) + 0.5) for i in range(n)]


class TrainingSlices:
    """The run's training batches (``training_batches``), read on first use: weight criteria never load them.

    Iterating yields ``(image, label)`` batches of the training patients only, the same every time.

    Args:
        config: the run's config.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._batches: Callable[[], Iterator[tuple]] | None = None

    def __iter__(self) -> Iterator[tuple]:
        """A fresh iterator over the batches."""
        from acdc_prune.experiments.batches import training_batches

        if self._batches is None:
            self._batches = training_batches(self.config)
        return self._batches()


class Scorer:
    """Recalibrates a network's BatchNorms on fixed training batches; scores it on fixed validation volumes.

    With ``reuse_blocks``, :meth:`reference` records the unpruned network's block outputs on those
    batches and volumes (:class:`~acdc_prune.experiments.reuse.BlockOutputs`), and every later call
    runs a pruned copy only from its first changed layer on, with the same result.

    Args:
        config: the run's config (data, evaluation batch size and precision, device).
        volumes: how many validation volumes (:func:`spread` over the run's validation list).
        training: the run's training batches; ``pruning.calibration_batches`` of them are read once.
        reuse_blocks: blocks whose outputs :meth:`reference` keeps in memory (none: no reuse).
    """

    def __init__(
        self, config: Config, volumes: int, training: TrainingSlices, reuse_blocks: Sequence[str] = ()
    ) -> None:
        from acdc_prune.data import VolumeDataset, load_label
        from acdc_prune.engine.device import resolve_device
        from acdc_prune.engine.precision import resolve_precision
        from acdc_prune.engine.validation import Validator
        from acdc_prune.experiments.evaluation import validation_records
        from acdc_prune.models import total_stride

        evaluation = config.evaluation
        self.device = resolve_device(config.training.device)
        self.precision = resolve_precision(
            evaluation.precision, evaluation.channels_last, self.device, "evaluation"
        )
        records = validation_records(config)
        self.records = [records[i] for i in spread(len(records), volumes)]
        dataset = VolumeDataset(self.records, config.data, total_stride(config.model), config.cache_dir)
        self.validator = Validator(dataset, evaluation.batch_size, load_label, self.precision)
        self.training = training
        self.num_batches = config.pruning.calibration_batches
        self._calibration: list[torch.Tensor] | None = None
        self.reuse_blocks = list(reuse_blocks)
        self._recalibration_outputs = BlockOutputs(reuse_blocks)
        self._scoring_outputs = BlockOutputs(reuse_blocks)
        self._reference: tuple[dict[str, float | None], int] | None = None
        self.skipped: list[str] = []
        """The blocks the last call answered from the recorded outputs instead of running them."""

    def volume_names(self) -> list[str]:
        """``patient017 ED``... for each scored volume."""
        return [f"{r.patient} {r.phase or r.image.name}" for r in self.records]

    def calibration(self) -> list[torch.Tensor]:
        """The recalibration inputs: the first ``pruning.calibration_batches`` training batches, read once."""
        if self._calibration is None:
            self._calibration = [x for x, _ in itertools.islice(self.training, self.num_batches)]
        return self._calibration

    def _recalibrate(self, model: nn.Module) -> int:
        from acdc_prune.pruning import recalibrate_batchnorm

        if self.num_batches == 0 or not has_batchnorm(model):
            return 0
        # The statistics are taken in the precision the network is scored in (as in training).
        with self.precision.autocast(self.device):
            return recalibrate_batchnorm(model, self.calibration(), self.num_batches)

    def reference(self, model: nn.Module) -> tuple[dict[str, float | None], int]:
        """Score a copy of the unpruned ``model`` as :meth:`__call__` does, keeping its block outputs.

        Computed once; later calls return the same scores. Calls of :meth:`__call__` made after it
        replay the recorded outputs into the networks they score.
        """
        if self._reference is None:
            model = self.precision.prepare(copy.deepcopy(model), self.device)
            with self._recalibration_outputs.record(model):
                norms = self._recalibrate(model)
            with self._scoring_outputs.record(model):
                self._reference = self.validator(model, self.device), norms
        return self._reference

    def __call__(self, model: nn.Module, recalibrate: bool = True) -> tuple[dict[str, float | None], int]:
        """Score ``model`` (moved to the device; its BatchNorm statistics are replaced when ``recalibrate``).

        After :meth:`reference`, the blocks that run before ``model``'s first changed layer are
        answered from the unpruned network's recorded outputs (when ``recalibrate``).

        Returns:
            ``(dice_RV, dice_MYO, dice_LV, dice_mean, ...)`` and the number of BatchNorm layers recalibrated.
        """
        model = self.precision.prepare(model, self.device)
        self.skipped = []
        if not recalibrate:
            return self.validator(model, self.device), 0
        if self._reference is None:
            norms = self._recalibrate(model)
            return self.validator(model, self.device), norms
        with self._recalibration_outputs.replay(model):
            norms = self._recalibrate(model)
        with self._scoring_outputs.replay(model) as self.skipped:
            return self.validator(model, self.device), norms


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (recalibration has something to do)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
