"""What the commands of the command line share: the consoles, the error report, and common options."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

_state = {"debug": False, "terminated": False}

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/); defaults fill the rest.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, repeatable: --set training.epochs=5"),
]


def set_debug(debug: bool) -> None:
    """Let errors raise with their full traceback (``--debug``) instead of one line."""
    _state["debug"] = debug


def _raise_terminated(signum: int, frame: Any) -> None:
    _state["terminated"] = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the context, SIGTERM stops the command as Ctrl-C does, in the main thread.

    A batch scheduler ends a job that reaches its time limit (or is cancelled: ``scancel``) with
    SIGTERM, and Python's default action is to die on the spot, leaving staging folders behind and
    running Ray arms uncancelled. Raised as a ``KeyboardInterrupt`` instead, it takes the Ctrl-C path:
    the epoch in progress is dropped, ``last.pt`` keeps the last complete one, running sweep arms
    are cancelled and their staging folders removed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["terminated"] = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(action: Callable[[], Any]) -> Any:
    """Run a command body; report known errors as one line and exit non-zero (traceback with --debug).

    Ctrl-C exits with 130 and SIGTERM with 143 (128 + the signal), each after one line.
    """
    from rich.markup import escape

    from acdc_prune.errors import AcdcPruneError
    from acdc_prune.render import error_text

    try:
        with sigterm_as_ctrl_c():
            return action()
    except typer.Exit:
        raise
    except AcdcPruneError as err:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(error_text(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as err:
        detail = f": {escape(error_text(err))}" if str(err) else ""
        word, code = ("terminated", 143) if _state["terminated"] else ("interrupted", 130)
        err_console.print(f"[yellow]{word}[/]{detail}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    except (OSError, MemoryError) as err:
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]error:[/] {err.__class__.__name__}: {escape(str(err))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except Exception as err:
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]unexpected error:[/] {err.__class__.__name__}: {escape(str(err))} "
            "(--debug shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def config_from_options(config: Path | None, overrides: list[str] | None, data: Path | None = None) -> Any:
    """The :class:`~acdc_prune.config.Config` of ``--config``, ``--set`` overrides and ``--data`` (last wins).

    Args:
        config: the YAML file, or ``None`` for the defaults.
        overrides: dotted ``key=value`` overrides.
        data: the data folder, set as ``data.root``.
    """
    from acdc_prune.config import load_config

    extra = [f"data.root={data}"] if data is not None else []
    return load_config(config, [*(overrides or []), *extra])
