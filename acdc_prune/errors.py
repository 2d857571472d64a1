"""Error types whose message is shown to the user as one line (no traceback without ``--debug``)."""

from __future__ import annotations


class AcdcPruneError(Exception):
    """Base class of every error the CLI reports as a one-line message and a non-zero exit."""


class ConfigError(AcdcPruneError, ValueError):
    """A config file, override or ratios file is invalid (unknown key, wrong type, out of range)."""


class DataError(AcdcPruneError, ValueError):
    """A data set or one of its files is unreadable or inconsistent; the message names the file."""


class CheckpointError(AcdcPruneError, ValueError):
    """A checkpoint or run folder is missing, truncated, not ours, or does not fit the model."""
