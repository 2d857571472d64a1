"""Example configs (installed as ``acdc_prune.configs`` so the demo finds them in any install)."""
