"""acdc-prune: train, structurally prune and evaluate 2D U-Nets on short-axis cardiac MRI."""

__version__ = "0.1.0"
