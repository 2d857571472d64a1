"""``python -m acdc_prune`` runs the command line (also under ``torchrun``)."""

from acdc_prune.cli import run

run()
