"""Experiments the Ray way: a training run tracked to a real `mlflow server` over HTTP (and TensorBoard and W&B
offline), resumed into the same tracked runs; the best held-out checkpoint exported (train.select_by); and a Ray
Tune sweep whose ASHA scheduler stops a diverging trial early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from trackers_readback import mlflow_history, tensorboard_scalars, wandb_history

from conftest import ROOT
from cpo_ray.devcluster import VENV_BIN, free_port, stop_tree

TINY = [
    "data.synthetic.train_pairs=600",
    "data.synthetic.eval_pairs=24",
    "data.synthetic.max_number=99",
    "model.tiny.hidden_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.intermediate_size=128",
    "train.num_workers=1",
    "train.cpus_per_worker=0.5",
    "train.micro_batch_size=8",
    "train.warmup_steps=1",
    "train.eval_every=4",
    "train.log_every=4",
]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server (SQLite backend) on a free loopback port, stopped by its own process tree."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 (the server writes here for its lifetime)
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
                time.sleep(1)
        yield url
    finally:
        stop_tree(proc.pid)


def cli(*args, env_extra=None):
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1", **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "cpo_ray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_tracked_to_an_mlflow_server_resumed_into_the_same_runs_best_checkpoint_exported(mlflow_server, tmp_path):
    out = tmp_path / "tracked"
    wandb_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                 **{v: str(tmp_path / v.lower()) for v in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}}  # fmt: skip
    common = ["--config", "configs/tiny-cpu.yaml", f"output_dir={out}", "name=tracked", *TINY,
              "train.report_to=[mlflow, tensorboard, wandb]", f"train.mlflow_tracking_uri={mlflow_server}",
              "train.select_by=heldout/nll", "train.checkpoint_every=4"]  # fmt: skip
    cli("pipeline", "--skip", "eval", *common, "train.max_steps=12", env_extra=wandb_env)
    state = json.loads((out / "tracking.json").read_text())
    # a longer re-run resumes from step 12 (--force: final/ exists, so the pipeline would skip training)
    cli("pipeline", "--skip", "eval", "--force", "train", *common, "train.max_steps=16", env_extra=wandb_env)
    assert json.loads((out / "tracking.json").read_text())["mlflow_run_id"] == state["mlflow_run_id"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r and not r.get("final")}
    assert sorted(steps) == list(range(1, 17))
    want = {s: r["loss"] for s, r in steps.items()}
    # Each backend holds every step once, read back with its own reader, equal to metrics.jsonl.
    assert mlflow_history(mlflow_server, state["mlflow_run_id"], "loss") == pytest.approx(want)
    assert tensorboard_scalars(out / "tensorboard", "loss") == pytest.approx(want)
    assert wandb_history(out, state["wandb_run_id"], "loss") == pytest.approx(want)
    evals = {r["step"]: r["eval/nll"] for r in rows if "eval/nll" in r}
    assert mlflow_history(mlflow_server, state["mlflow_run_id"], "eval/nll") == pytest.approx(evals)
    # train.select_by: final/ is the evaluation with the lowest held-out NLL, not the last step.
    best_step = min(evals, key=evals.get)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["selected"]["step"] == best_step and summary["selected"]["value"] == pytest.approx(evals[best_step])
    assert f"final/ is the model of step {best_step}" in (out / "report.html").read_text()
    assert reloaded_heldout_nll(out / "final", out / "data" / "eval") == pytest.approx(evals[best_step], abs=1e-4)


def reloaded_heldout_nll(final_dir, eval_dir) -> float:
    """The exported model's held-out chosen NLL, recomputed from the folder (a plain padded forward)."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.contract import read_pairs
    from cpo_ray.train.collate import as_batch, collate_padded
    from cpo_ray.train.logps import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    rows = read_pairs(eval_dir)
    with torch.no_grad():
        logp, count = sequence_logps(model, collate_padded(as_batch(rows), 0))
    n = len(rows)
    return float(-logp[:n].sum() / count[:n].sum())


def test_sweep_stops_a_diverging_trial_early_and_keeps_the_best(tmp_path):
    out = tmp_path / "sweep"
    console = cli("sweep", "--config", "configs/tiny-cpu.yaml", f"output_dir={out}", "name=sw", *TINY,
                  "train.max_steps=16", "train.checkpoint_every=0", "sweep.params={train.lr: [3.0e-3, 30.0]}",
                  "sweep.metric=eval/nll", "sweep.mode=min", "sweep.grace_period=4", "sweep.max_concurrent_trials=1")  # fmt: skip
    print(console)
    res = json.loads((out / "sweep.json").read_text())
    by_lr = {t["params"]["train.lr"]: t for t in res["trials"]}
    assert by_lr[30.0]["stopped_early"] and by_lr[30.0]["steps"] < 16  # lr 30 diverges: stopped at a rung
    assert not by_lr[3.0e-3]["stopped_early"] and by_lr[3.0e-3]["steps"] == 16
    # its last report is the final evaluation's, after the export: ASHA stops a trial at its first report at
    # max_t, which used to be the last step's plain report, racing the final evaluation and the export
    assert by_lr[3.0e-3]["history"][-1][0] == 16 and (out / "trials" / by_lr[3.0e-3]["trial"] / "final").is_dir()
    assert res["unfinished"] == 0
    assert res["best"]["params"]["train.lr"] == 3.0e-3 and (out / "final" / "config.json").exists()
    assert np.isfinite(by_lr[3.0e-3]["best"]) and "| trial |" in console
