"""Nox sessions: ``tests``, ``lint``, ``demo`` and ``benchmarks``, each in a fresh virtual environment.

Torch is installed first, pinned (``ACDC_PRUNE_TORCH``, default ``torch==2.13.0``), so that the
project's own looser requirement is already satisfied and pip never pulls a second, larger build.
"""

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("ACDC_PRUNE_TORCH", "torch==2.13.0")


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU, phantom data; ACDC tests run only when ACDC_DATA is set)."""
    _install(session, extras="dev,all")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "acdc_prune", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "acdc_prune", "tests", "benchmarks", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the whole pipeline on the built-in phantom data: train, prune x {none, random, rewind}, report."""
    _install(session, extras="dev")
    session.run("acdc-prune", "demo", *session.posargs)


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Run the benchmark scripts and write their JSON under benchmarks/results/."""
    _install(session, extras="dev,all")
    for script in sorted(os.listdir("benchmarks")):
        if script.startswith("bench_") and script.endswith(".py"):
            session.run("python", f"benchmarks/{script}", *session.posargs)
