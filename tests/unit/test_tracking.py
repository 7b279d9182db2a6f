"""cpo_ray.tracking on its own (no Ray): MLflow to a local FILE store, TensorBoard event files, W&B offline;
values read back with each tool's reader; a reopened run appends to the same tracked run, skipping replays."""

from __future__ import annotations

import json

import pytest
from trackers_readback import mlflow_history, tensorboard_scalars, wandb_history

from cpo_ray.config import load_config
from cpo_ray.tracking import Trackers


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_trackers_log_reopen_and_skip_replayed_steps(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    uri = (tmp_path / "mlruns").as_uri()  # a file store
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "name=tracked", f"train.mlflow_tracking_uri={uri}",
                             "train.report_to=[mlflow, tensorboard, wandb]"])  # fmt: skip
    rows = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": s / 10, "data/digest": [1, 2]} for s in range(1, 6)]
    tr = Trackers.open(cfg)
    for r in rows[:3]:
        tr.metrics(r, r["step"])
    tr.close()
    state = json.loads((tmp_path / "run" / "tracking.json").read_text())
    again = Trackers.open(cfg)  # a resumed run: the same tracked runs; step 3 (replayed) is not logged twice
    for r in rows[2:]:
        again.metrics(r, r["step"])
    again.summary({"endpoint/tuned/accuracy": 0.9})
    again.close()
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow_run_id"] == state["mlflow_run_id"]
    want = {r["step"]: r["loss"] for r in rows}
    assert mlflow_history(uri, state["mlflow_run_id"], "loss") == pytest.approx(want)
    assert mlflow_history(uri, state["mlflow_run_id"], "endpoint/tuned/accuracy") == {5: 0.9}
    assert tensorboard_scalars(tmp_path / "run" / "tensorboard", "loss") == pytest.approx(want)
    assert wandb_history(tmp_path / "run", state["wandb_run_id"], "loss") == pytest.approx(want)
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=uri).get_run(state["mlflow_run_id"]).data.params
    assert params["train.beta"] == "0.1" and params["name"] == "tracked"  # the resolved config


def test_default_mlflow_store_is_sqlite_in_local_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "train.report_to=[mlflow]"])
    tr = Trackers.open(cfg)
    tr.metrics({"loss": 2.0}, 1)
    tr.close()
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow_run_id"]
    assert mlflow_history(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}", run_id, "loss") == {1: 2.0}
