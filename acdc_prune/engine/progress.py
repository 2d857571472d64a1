"""How long-running engine work reports progress: a small protocol the faces implement (rich, logging...)."""

from __future__ import annotations

import logging
from typing import Protocol

LOG = logging.getLogger("acdc_prune")


class Reporter(Protocol):
    """Receives progress of training, evaluation and the workflows; the engine never prints itself.

    A bar is named by the caller (``"epochs"``, ``"batches"``, ``"volumes"``); ``start`` (re)starts it.
    ``note`` is one line of the job's log (an epoch summary, the resolved precision, a warning).
    The command line shows rich bars (``acdc_prune.render.RichReporter``); from Python the default
    :class:`LogReporter` sends notes to the ``acdc_prune`` logger and ignores bars.
    """

    def start(self, bar: str, total: int, completed: int = 0, description: str | None = None) -> None:
        """Show (or reset) bar ``bar`` with ``total`` steps, ``completed`` of them done."""

    def update(self, bar: str, completed: int, info: str = "") -> None:
        """Move bar ``bar`` to ``completed`` steps with a short ``info`` text (loss, speed...)."""

    def finish(self, bar: str) -> None:
        """Remove bar ``bar`` (its work is over)."""

    def note(self, text: str) -> None:
        """Report one line."""


class LogReporter:
    """A :class:`Reporter` for library use: notes go to the ``acdc_prune`` logger, bars are ignored."""

    def start(self, bar: str, total: int, completed: int = 0, description: str | None = None) -> None:
        """Ignored."""

    def update(self, bar: str, completed: int, info: str = "") -> None:
        """Ignored."""

    def finish(self, bar: str) -> None:
        """Ignored."""

    def note(self, text: str) -> None:
        """Log ``text`` at INFO level."""
        LOG.info(text)
