"""What the commands of the command line share: the consoles, the error report, and common options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

_state = {"debug": False}

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


def run_command(action: Callable[[], Any]) -> Any:
    """Run a command body; report known errors as one line and exit non-zero (traceback with --debug)."""
    from rich.markup import escape

    from acdc_prune.errors import AcdcPruneError
    from acdc_prune.render import error_text

    try:
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
        err_console.print(f"[yellow]interrupted[/]{detail}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
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
