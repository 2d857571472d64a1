"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TINY_FOV_MM = (140.0, 170.0)
"""Field of view of test phantoms: matrices of about 75-140 pixels keep the data tests fast."""


@pytest.fixture(scope="session")
def make_phantom() -> Callable[[Path, int, int], Path]:
    """``make_phantom(out, n_patients, seed)``: write a small-matrix ACDC-layout phantom into ``out``."""
    from acdc_prune.data.phantom import synthesize_dataset

    def make(out: Path, n_patients: int, seed: int) -> Path:
        return synthesize_dataset(out, n_patients, seed, fov_mm=TINY_FOV_MM)

    return make


@pytest.fixture(scope="session")
def tiny_phantom(
    tmp_path_factory: pytest.TempPathFactory, make_phantom: Callable[[Path, int, int], Path]
) -> Path:
    """A 5-patient ACDC-layout phantom (one patient per group), shared read-only by the session's tests."""
    return make_phantom(tmp_path_factory.mktemp("phantom") / "training", 5, 0)


@pytest.fixture
def ctrl_c_in_epoch(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Callable[[], None]]:
    """``restore = ctrl_c_in_epoch(n)``: the trainer's n-th epoch raises KeyboardInterrupt (as Ctrl-C
    does) until ``restore()`` puts the real epoch loop back."""
    from acdc_prune.engine import trainer

    real_run_epoch = trainer.run_epoch

    def arm(epoch: int) -> Callable[[], None]:
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == epoch:
                raise KeyboardInterrupt
            return real_run_epoch(*args, **kwargs)

        monkeypatch.setattr(trainer, "run_epoch", interrupted)
        return lambda: monkeypatch.setattr(trainer, "run_epoch", real_run_epoch)

    return arm
