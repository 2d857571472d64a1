"""Atomic file writes, safe checkpoint loading and collision-free run folders."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acdc_prune.errors import CheckpointError, ConfigError, DiskFullError

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one.

    The data goes into a temporary sibling, is fsynced, then renamed over ``path``. A failed write
    removes the temporary file and leaves ``path`` as it was; a full disk raises
    :class:`DiskFullError` naming ``path``. A killed process can leave the temporary file
    (``.<name>.<random>.tmp``), which no reader takes for ``path``; :func:`remove_leftovers` deletes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            raise DiskFullError(path) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    """Render a matplotlib ``figure`` to PNG and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (a crash never leaves a truncated checkpoint).

    The checkpoint is serialised in memory first: ``torch.save`` into a file turns a failing write
    (a full disk) into an opaque ``RuntimeError``, while a plain write reports it as it is.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def read_json(path: Path, advice: str) -> Any:
    """Read a JSON file this project wrote; a truncated or edited file is a one-line error.

    Args:
        path: the file.
        advice: what the user should do about a damaged file, e.g. "delete it and run again".

    Raises:
        CheckpointError: the file is missing, unreadable or not valid JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; {advice}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is truncated or not valid JSON ({err}); {advice}") from None


def remove_leftovers(folder: Path) -> None:
    """Delete what killed processes left in ``folder``: temporary files of :func:`atomic_write_bytes`
    (``.<name>.*.tmp``) and staging folders of :func:`staged_dir` (``.<name>.*.partial``).

    Only for a folder that no running process writes into (a run being resumed, a sweep re-run).
    """
    folder = Path(folder)
    for path in [*folder.glob(".*.tmp"), *folder.glob(".*.partial")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def safe_torch_load(path: Path) -> Any:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only, no code).

    Raises:
        CheckpointError: the file is missing, truncated, or holds pickled objects that are not plain
            data (a file that is not ours, or one crafted to run code).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad files; all mean "not a checkpoint"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        lowered = reason.lower()
        if any(marker in lowered for marker in ("weights_only", "weights only", "global")):
            reason = "it contains pickled objects that are not plain tensors (refused for safety)"
        elif "zip" in lowered or "eof" in lowered or "truncated" in lowered:
            reason = "it is truncated or not a PyTorch file"
        else:
            reason = f"it is not a PyTorch checkpoint ({reason})"
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}") from None


def check_name(name: str, what: str) -> str:
    """Refuse names that could escape the runs folder (``..``, ``/``, absolute paths, empty)."""
    if not _NAME_PATTERN.match(name or "") or ".." in name:
        raise ConfigError(
            f"{what} '{name}' is not allowed: use letters, digits, '.', '_' and '-' (no '/' or '..')"
        )
    return name


def _stamped_names(stem: str) -> Iterator[str]:
    """``stem``, ``stem-2``, ``stem-3``, ... (candidate names for a new folder)."""
    yield stem
    for attempt in range(2, 1000):
        yield f"{stem}-{attempt}"


def new_run_dir(runs_dir: str | Path, experiment: str, prefix: str = "") -> Path:
    """Create and return a new, unique ``runs_dir/experiment/<prefix><timestamp>[-N]`` folder.

    The folder is created with ``exist_ok=False`` so two runs started in the same second never share
    one: the second gets a ``-2`` suffix.
    """
    check_name(experiment, "experiment name")
    parent = Path(runs_dir) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    for name in _stamped_names(prefix + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")):
        candidate = parent / name
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {parent}")


def unused_path(parent: str | Path, prefix: str = "") -> Path:
    """A path ``parent/<prefix><timestamp>[-N]`` that does not exist yet (not created)."""
    stem = prefix + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return next(Path(parent) / n for n in _stamped_names(stem) if not (Path(parent) / n).exists())


def refuse_existing(folder: Path) -> Path:
    """``folder``, which must not exist yet: results are never replaced.

    Raises:
        ConfigError: it exists.
    """
    if folder.exists():
        raise ConfigError(
            f"{folder} already exists; choose another output folder (results are never replaced)"
        )
    return folder


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``final`` and rename it to ``final`` only on success.

    A command that fails half-way leaves nothing under the name a user would take for a result.

    Raises:
        ConfigError: ``final`` already exists (results are never overwritten).
    """
    final = refuse_existing(Path(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield staging
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
