"""A training worker killed mid-run (a real SIGKILL of a real process), LoRA with dropout: the replayed steps
must repeat their dropout masks too. The run checkpoints every 5 steps; after the restart the final step count
equals an uninterrupted run's, the steps trained twice are only those after the last checkpoint (< checkpoint
interval), and the data position resumes inside the epoch (batch_in_epoch keeps counting from the checkpoint
instead of restarting at 0). The driver killed and the job resubmitted (with a torn checkpoint left behind):
tests/integration/test_multinode.py, on three nodes and object storage.
"""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from cpo_ray.config import load_config
from cpo_ray.data.prepare import prepare
from cpo_ray.embedded import build_embedded_model
from cpo_ray.train.trainer import run_training

SMALL = [
    "data.synthetic.train_pairs=1200",
    "data.synthetic.eval_pairs=32",
    "data.synthetic.max_number=999",
    "train.micro_batch_size=8",
    "train.max_steps=24",  # 1200 pairs / (2 x 8) = 75 steps per epoch: all in epoch 0
    "train.checkpoint_every=5",
    "train.eval_every=0",
    "train.warmup_steps=2",
    "train.max_failures=2",
    # LoRA with dropout (the library default is 0.05): replayed steps must draw the same masks (RNG states
    # restored from the checkpoint per rank), or their losses differ.
    "model.lora.enabled=true",
    "model.lora.dropout=0.1",
    "model.lora.modules_to_save=[]",
    "train.lr=3e-3",
    "model.tiny.hidden_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.intermediate_size=128",
]


def steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for_step(out: Path, n: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = [r for r in steps(out) if "loss" in r and not r.get("final")]
        if rows and rows[-1]["step"] >= n:
            return rows[-1]["step"]
        time.sleep(0.2)
    raise TimeoutError(f"no step {n} in {out}/metrics.jsonl")


def train_worker_pids() -> list[int]:
    pids = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in p.cmdline()[0] and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
    return pids


def check_recovered(out: Path, killed_at: int, every: int = 5, max_steps: int = 24) -> dict:
    rows = [r for r in steps(out) if "loss" in r and not r.get("final")]
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))  # same count as an uninterrupted run
    assert all(r["epoch"] == 0 and r["batch_in_epoch"] == r["step"] for r in rows)  # data position resumed
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    resumed = events[-1]["step"]
    assert resumed % every == 0 and 0 < resumed <= killed_at
    assert killed_at - resumed < every + 2  # steps trained twice: only those after the last checkpoint
    # Exact resume: the steps trained again saw the same pairs on the same ranks (data digests) and, from the
    # restored weights and optimizer state, computed the same losses as before the crash.
    replayed = events[-1]["replayed"]
    assert [r["step"] for r in replayed] == list(range(resumed + 1, resumed + 1 + len(replayed)))
    assert replayed or killed_at == resumed  # killed right after a checkpoint: nothing trains twice
    again = {r["step"]: r for r in rows}
    for r in replayed:
        assert r["data/digest"] == again[r["step"]]["data/digest"], r["step"]
        assert r["loss"] == pytest.approx(again[r["step"]]["loss"], abs=1e-5), r["step"]
    assert (out / "final" / "model.safetensors").exists()
    return {"killed_at": killed_at, "resumed_from": resumed, "retrained": killed_at - resumed}


def test_worker_kill_restarts_group_from_checkpoint(ray_local, tmp_path):
    out = tmp_path / "wk"
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", [f"output_dir={out}", "name=worker-kill", *SMALL])
    model_dir = str(build_embedded_model(out / "embedded-tiny", cfg.model.tiny))
    prepare(cfg, model_dir)
    killed: dict = {}

    def killer():
        killed["step"] = wait_for_step(out, 8)
        # This module's Ray runs under this process: its train workers are our descendants.
        killed["pid"] = train_worker_pids()[-1]
        os.kill(killed["pid"], signal.SIGKILL)  # a real crash of one worker process

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    run_training(cfg, model_dir)
    t.join(5)
    assert "pid" in killed, "the worker was never killed"
    print("\nworker kill:", check_recovered(out, killed["step"]))
