"""Workflows that chain training, pruning and evaluation: prune, inspect, sweep, demo, reports."""
