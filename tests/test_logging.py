"""Run logging: MLflow (local store, read back with its client), TensorBoard event files, warnings."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_training import tiny_config

from acdc_prune.engine import runlog
from acdc_prune.engine.runlog import RunLog
from acdc_prune.engine.tracking import flatten, mlflow_tracking_uri
from acdc_prune.engine.trainer import train
from acdc_prune.render import RichReporter


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [2, 3]}}, "e": None, "f": {}}) == {
        "a.b": "1",
        "a.c.d": "[2, 3]",
        "e": "None",
        "f": "{}",
    }


def test_missing_mlflow_is_a_warning_not_a_failure(tmp_path, tiny_phantom, monkeypatch):
    config = tiny_config(tmp_path, tiny_phantom)
    config.logging.tensorboard = False
    config.logging.mlflow = True
    real_find_spec = runlog.importlib.util.find_spec
    monkeypatch.setattr(
        runlog.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real_find_spec(name)
    )
    buffer = io.StringIO()
    log = RunLog(tmp_path, config, RichReporter(Console(file=buffer, width=200)), first_epoch=1)
    log.close()
    assert "logging.mlflow is on but mlflow is not installed: skipped" in buffer.getvalue()
    assert log.mlflow is None


def test_mlflow_local_store_holds_params_metrics_and_artifacts_and_resume_continues_the_run(
    tmp_path, tiny_phantom, monkeypatch, ctrl_c_in_epoch
):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install acdc-prune[mlflow])")
    from mlflow.tracking import MlflowClient

    # The trainer opts in to MLflow's file store for its process; undo that after the test.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    config = tiny_config(tmp_path, tiny_phantom, epochs=2)
    config.logging.mlflow = True

    restore = ctrl_c_in_epoch(2)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    restore()
    (run_dir,) = (tmp_path / "runs" / "t").iterdir()

    store = tmp_path / "runs" / "mlruns"
    assert mlflow_tracking_uri(config.logging) == store.resolve().as_uri() and store.is_dir()
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("t")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED" and run.info.run_name == f"t/{run_dir.name}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]

    result = train(config, resume=run_dir)
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["training.epochs"] == "2" and run.data.params["model.features"] == "[8, 16]"
    assert run.data.params["data.root"] == str(tiny_phantom)
    for key in ("train_loss", "lr", "dice_mean", "dice_LV", "slices_per_s"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [
            (row["epoch"], pytest.approx(row[key])) for row in result.history
        ], key
    artifacts = {info.path for info in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "metrics.csv", "curves.png"} <= artifacts
    # TensorBoard stays on by default next to MLflow.
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
