"""MLflow tracking of a training run: the flattened config as params, per-epoch metrics, files as artifacts.

The client API (``MlflowClient``) is used rather than ``mlflow.start_run`` so that logging never
touches MLflow's process-wide active run or tracking URI. A run folder maps to one MLflow run, found
again by its ``acdc_prune.run_dir`` tag, so a resumed training continues the same MLflow run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from acdc_prune.config import Config, LoggingConfig

RUN_DIR_TAG = "acdc_prune.run_dir"


def mlflow_tracking_uri(logging_cfg: LoggingConfig) -> str:
    """``logging.mlflow_uri``, or when it is null the local file store ``<runs_dir>/mlruns`` as a
    ``file://`` URI (absolute, so that it does not depend on the working directory)."""
    if logging_cfg.mlflow_uri is not None:
        return logging_cfg.mlflow_uri
    return (Path(logging_cfg.runs_dir) / "mlruns").resolve().as_uri()


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training": {"lr": 0.001}}`` -> ``{"training.lr": "0.001"}``: nested dicts joined with dots,
    every other value as its ``str`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class MlflowRun:
    """The MLflow run of a run folder, in experiment ``logging.experiment``.

    A new run is named ``<experiment>/<run-id>`` and gets the flattened config as params; a run
    folder that already has an MLflow run (a resumed training) continues it, params unchanged.

    A local store (a path or a ``file:`` URI, the default) is MLflow's file store: MLflow 3 refuses
    it unless ``MLFLOW_ALLOW_FILE_STORE`` is true, preferring a database (``sqlite:///...``, which
    needs SQLAlchemy, not part of mlflow-skinny), so the variable is set for this process when unset.
    The file store needs no server and no network.

    Args:
        run_dir: the run folder (its absolute path is the run's ``acdc_prune.run_dir`` tag).
        config: the run's config (``logging.mlflow_uri``, ``logging.experiment``; all of it as params).
    """

    def __init__(self, run_dir: Path, config: Config) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = mlflow_tracking_uri(config.logging)
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment_id(config.logging.experiment)
        path = str(Path(run_dir).resolve())
        quote = "'" if '"' in path else '"'
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = {quote}{path}{quote}", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(
            experiment_id, run_name=f"{run_dir.parent.name}/{run_dir.name}", tags={RUN_DIR_TAG: path}
        )
        self.run_id = run.info.run_id
        params = [Param(key, value) for key, value in flatten(config.to_dict()).items()]
        self.client.log_batch(self.run_id, params=params)

    def _experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (tolerating a concurrent creation)."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        """Log ``scalars`` (name -> value) at ``step`` (the epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, files: Iterable[Path], status: str) -> None:
        """Upload the existing ``files`` as artifacts and end the run with ``status``
        (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)
