"""The ``acdc-prune`` command line: the Typer app, its ``--debug`` option, and its commands in help order.

The commands live in ``cli_models``, ``cli_compress``, ``cli_sweep`` and ``cli_data``; heavy libraries
(torch, MONAI) are imported inside them so that ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from acdc_prune.cli_common import set_debug
from acdc_prune.cli_compress import export, inspect, prune, quantize, sensitivity
from acdc_prune.cli_data import config_app, data_app
from acdc_prune.cli_models import evaluate, predict, train
from acdc_prune.cli_sweep import demo, sweep, sweep_eval

app = typer.Typer(
    help="Train, prune and evaluate 2D U-Nets on short-axis cardiac MRI (ACDC) with MONAI.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
COMMANDS = (train, evaluate, predict, prune, inspect, sensitivity, sweep, sweep_eval, demo, export, quantize)
"""The top-level commands in the order ``--help`` lists them, each named after its function with ``_``
written ``-`` (``sweep_eval`` is ``sweep-eval``)."""
for command in COMMANDS:
    app.command()(command)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """acdc-prune: structured pruning of cardiac segmentation U-Nets, measured honestly."""
    set_debug(debug)


def run() -> None:
    """Entry point for ``python -m acdc_prune``."""
    app(prog_name="acdc-prune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
