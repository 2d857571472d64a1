"""The one error type of the pruning package."""

from __future__ import annotations

from acdc_prune.errors import AcdcPruneError


class PruningError(AcdcPruneError, ValueError):
    """A model, example input, ratio or plan cannot be pruned or applied; the message is one sentence."""
