"""Error types whose message is shown to the user as one line (no traceback without ``--debug``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Hint:
    """Advice attached to an error, worded by each face for its own users.

    The engine states what to change; the command line renders ``--set training.batch_size=8`` or
    ``--force``, the MONAI bundle its own keys, and Python callers read ``setting=value``.

    Attributes:
        setting: a config key (``training.batch_size``) or an option of the entry point that was
            called (``force``, ``out``, ``resume``).
        value: the suggested value (``True`` for a switch such as ``force``).
    """

    setting: str
    value: Any = True

    def __str__(self) -> str:
        return self.setting if self.value is True else f"{self.setting}={self.value}"


class _Hinted:
    """A one-line message with an optional :class:`Hint`; ``str()`` words the hint for Python callers."""

    def __init__(self, message: str = "", hint: Hint | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"

    def __reduce__(self) -> tuple:
        """Pickle with the hint (errors cross process boundaries: torchrun ranks, Ray workers)."""
        return type(self), (self.message, self.hint)


class AcdcPruneError(_Hinted, Exception):
    """Base class of every error the faces report as a one-line message and a non-zero exit."""


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

    def __init__(self, path: Path, advice: str = "run the command again", hint: Hint | None = None) -> None:
        self.path, self.advice = path, advice
        super().__init__(f"no space left on device while writing {path}; free space and {advice}", hint)

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.advice, self.hint)


class Interrupted(_Hinted, KeyboardInterrupt):
    """Ctrl-C stopped a long job; the message says what was kept and how to continue.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C keeps working; the CLI prints the message
    as one line and exits with 130.
    """


class ExportError(AcdcPruneError, RuntimeError):
    """A model cannot be exported, its export disagrees with PyTorch, or the output file already exists."""
