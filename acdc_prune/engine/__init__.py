"""Training loop, checkpoints, inference, metrics and evaluation."""
