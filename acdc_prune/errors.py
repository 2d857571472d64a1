"""Error types whose message is shown to the user as one line (no traceback without ``--debug``)."""

from __future__ import annotations

from pathlib import Path


class AcdcPruneError(Exception):
    """Base class of every error the CLI reports as a one-line message and a non-zero exit."""


class ConfigError(AcdcPruneError, ValueError):
    """A config file, override or ratios file is invalid (unknown key, wrong type, out of range)."""


class DataError(AcdcPruneError, ValueError):
    """A data set or one of its files is unreadable or inconsistent; the message names the file."""


class CheckpointError(AcdcPruneError, ValueError):
    """A checkpoint or run folder is missing, truncated, not ours, or does not fit the model."""


class ResourceError(AcdcPruneError):
    """The machine ran out of disk space or memory; the message says what to free or make smaller."""


class DiskFullError(ResourceError):
    """A write failed because the disk (or the user's quota) is full; the file's previous version is kept.

    Args:
        path: the file that was being written.
        advice: what to do once space is freed.
    """

    def __init__(self, path: Path, advice: str = "run the command again") -> None:
        self.path = path
        super().__init__(f"no space left on device while writing {path}; free space and {advice}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a long job; the message says what was kept and how to continue.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C keeps working; the CLI prints the message
    as one line and exits with 130.
    """


class ExportError(AcdcPruneError, RuntimeError):
    """A model cannot be exported, its export disagrees with PyTorch, or the output file already exists."""
