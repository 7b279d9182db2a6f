"""Many nodes, object storage only, a node lost: the pipeline on a real 3-node Ray cluster with no shared disk.

A head and two worker nodes on this machine, each worker node in its own mount namespace with a private /tmp
and HOME (cpo_ray/devcluster.py), and moto's S3 server as the only storage every node shares: any stage
that passes a file through a node's local disk fails here. The runs:

- reference: the same training on ONE node with 2 workers and a local disk (before the cluster starts);
- the pipeline submitted with `ray job submit`, output_dir on S3, 2 nodes x 1 worker; one worker node is killed
  (SIGKILL of its raylet and workers) mid-training and a replacement node joins; Ray Train restarts the worker
  group from the last checkpoint in S3; the run ends with base vs tuned through the endpoint, the console and
  report of a one-node run;
- the training job's driver killed (a torn newest checkpoint left in S3), the job submitted again: the run
  resumes from the last complete checkpoint in S3.

Every step of both runs equals the reference: the same pairs on the same ranks (per-rank data digests) and the
same losses, whatever the topology, the storage or the failures in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT
from cpo_ray.devcluster import VENV_BIN, RayNodes, S3Server, free_port

CONFIG = "configs/tiny-cpu.yaml"
TRAIN = [
    "data.synthetic.train_pairs=1200",
    "data.synthetic.eval_pairs=40",
    "data.synthetic.max_number=999",
    "train.num_workers=2",
    "train.micro_batch_size=8",
    "train.max_steps=24",  # 1200 pairs / (2 x 8) = 75 steps per epoch: all in epoch 0
    "train.checkpoint_every=5",
    "train.eval_every=12",
    "train.warmup_steps=2",
    "train.max_failures=3",
    "train.log_every=4",
    "model.tiny.hidden_size=128",  # head_dim 32: vLLM's CPU attention has no kernel for 16
    "model.tiny.num_hidden_layers=2",
    "model.tiny.intermediate_size=256",
]
ON_TWO_NODES = ["train.cpus_per_worker=1.5"]  # a 2-CPU worker node holds one training worker: 2 nodes x 1
LOSS_ATOL = 1e-5  # fp32: the same pairs, weights and order of operations on either topology


def trained_steps(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if "loss" in r and not r.get("final")}


def jsonl(data: bytes | None) -> list[dict]:
    return [json.loads(ln) for ln in (data or b"").decode().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One node, 2 workers, local disk: the steps every other topology must reproduce (train only)."""
    out = tmp_path_factory.mktemp("reference")
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cpo_ray.cli", "pipeline", "--config", CONFIG, "--skip", "eval",
           f"output_dir={out}", "name=mn", "train.cpus_per_worker=0.5", *TRAIN]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = trained_steps(rows)
    assert sorted(steps) == list(range(1, 25))
    heldout = json.loads((out / "train_eval.json").read_text())["pairs"]  # the final model's per-pair scores
    return {"steps": steps, "final": next(r for r in rows if r.get("final")), "heldout": heldout}


@pytest.fixture(scope="module")
def cluster(reference, tmp_path_factory):
    """moto S3 + a head (1 CPU) + two worker nodes (2 CPUs each, private /tmp and HOME)."""
    work = tmp_path_factory.mktemp("cluster")
    with S3Server(work / "s3") as s3, RayNodes(work / "nodes", env=s3.env) as nodes:
        nodes.start_head(num_cpus=1)
        nodes.add_node(num_cpus=2)
        nodes.add_node(num_cpus=2)
        yield s3, nodes


def submit(nodes: RayNodes, args: list[str], wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "ray"), "job", "submit", f"--address={nodes.dashboard}", "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "runtime_env.yaml"), "--", "python", *args]  # fmt: skip
    env = nodes.client_env()
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(12):  # the dashboard answers before its job agent registers: retry that case only
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            return proc
        time.sleep(5)
    return proc


def wait_for_step(s3: S3Server, key: str, n: int, job=None, timeout: float = 600) -> int:
    """The last trained step in metrics.jsonl on S3 (what the run log persisted), once it is >= n."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = trained_steps(jsonl(s3.read(key)))
        if steps and max(steps) >= n:
            return max(steps)
        if job is not None and job.poll() is not None:
            raise RuntimeError(f"the job ended before step {n}: {job.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no step {n} in s3://{s3.bucket}/{key}")


def check_same_steps(rows: list[dict], reference: dict) -> None:
    """Every step as the one-node, local-disk run: the same pairs per rank and the same loss."""
    steps = trained_steps(rows)
    assert sorted(steps) == sorted(reference["steps"])
    for step, row in steps.items():
        want = reference["steps"][step]
        assert row["data/digest"] == want["data/digest"], step
        assert row["loss"] == pytest.approx(want["loss"], abs=LOSS_ATOL), step


def check_replayed(events: list[dict], reference: dict) -> dict:
    """The resume's replayed steps (trained before the crash, then again) repeat the reference exactly."""
    resumes = [e for e in events if e.get("event") == "resume"]
    assert resumes, events
    last = resumes[-1]
    for r in last["replayed"]:
        assert r["data/digest"] == reference["steps"][r["step"]]["data/digest"], r["step"]
        assert r["loss"] == pytest.approx(reference["steps"][r["step"]]["loss"], abs=LOSS_ATOL), r["step"]
    return {"resumed_from": last["step"], "replayed": [r["step"] for r in last["replayed"]]}


def test_private_disks_really_are_private(cluster, tmp_path):
    """The premise: a file this (head-side) process writes is there for a task on the head, and not for a task
    on any worker node."""
    s3, nodes = cluster
    marker = tmp_path / "only-here.txt"
    marker.write_text("head")
    code = (
        "import os, ray\n"
        "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On\n"
        "ray.init(address=os.environ['RAY_ADDRESS'], logging_level='ERROR')\n"
        "probe = ray.remote(num_cpus=0)(lambda p: os.path.exists(p))\n"
        "alive = [n for n in ray.nodes() if n['Alive']]\n"
        f"print([(n['NodeManagerAddress'], ray.get(probe.options(scheduling_strategy=On(n['NodeID'], soft=False))"
        f".remote({str(marker)!r}))) for n in alive])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=nodes.client_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    seen = dict(eval(out.stdout.strip().splitlines()[-1]))  # node ip -> whether the file is there
    workers = {n.ip for n in nodes.nodes if not n.killed}
    assert workers <= set(seen) and len(seen) == len(workers) + 1, seen
    assert not any(seen[ip] for ip in workers) and sum(seen.values()) == 1, seen  # only the head sees it


def test_pipeline_on_three_nodes_object_storage_only_survives_a_lost_node(cluster, reference):
    s3, nodes = cluster
    run = "s3://cpo-ray/pipeline"
    args = ["jobs/pipeline.py", "--config", CONFIG, f"output_dir={run}", "name=mn", *TRAIN, *ON_TWO_NODES,
            "eval.generate_samples=2", "eval.max_new_tokens=16", f"serve.port={free_port()}"]  # fmt: skip
    job = submit(nodes, args, wait=False)
    killed_at = wait_for_step(s3, "pipeline/metrics.jsonl", 8, job)  # persisted up to ~2 s behind
    victim = nodes.nodes[0]
    nodes.kill_node(victim)  # a worker node lost: its raylet, its training worker, whatever else ran there
    time.sleep(5)
    nodes.add_node(num_cpus=2)  # capacity back: Ray Train restarts the worker group on it
    stdout, stderr = job.communicate(timeout=1800)
    assert job.returncode == 0, stdout[-4000:] + stderr[-2000:]
    # What the job's user reads: the driver's console, between Ray's "Tailing logs" banner and its verdict.
    lines = stdout.split("Tailing logs until the job exits", 1)[1].splitlines()[1:]
    console = lines[: next(i for i, ln in enumerate(lines) if "SUCC cli.py" in ln)]
    print("\n".join(["", "job console:", *console]))
    assert len(console) < 60, "\n".join(console)  # stage headers, a live line, the table: not framework logs
    console = console[next(i for i, ln in enumerate(console) if ln.startswith("── ")) :]  # after Ray's set-up lines
    assert [ln for ln in console if ln.startswith("── ")][:3] == [
        ln for ln in console if ln.startswith(("── prepare", "── train", "── eval"))
    ]  # stage headers, in order
    assert any(ln.startswith("resumed at step") for ln in console)  # the restart, told on the console
    assert console[-1] == f"report: {run}/report.html"
    table = [ln for ln in console[-15:] if ln.startswith("|")]
    assert table[0] == "| metric | base | tuned |" and console[-2] == table[-1]
    assert not [ln for ln in console if "INFO" in ln or "WARNING" in ln]
    # Everything is in the object store; nothing was left on a node's disk for another to read.
    keys = set(s3.keys("pipeline/"))
    for key in ("report.html", "eval/eval.json", "final/model.safetensors", "final/config.json",
                "adapter/adapter_config.json", "data/prepare_report.json", "metrics.jsonl", "events.jsonl"):  # fmt: skip
        assert f"pipeline/{key}" in keys, key
    assert any(k.startswith("pipeline/data/train/part-") for k in keys)
    assert any(k.startswith("pipeline/ray/mn/checkpoint_") for k in keys)
    # The same steps as on one node with a local disk, through a node loss.
    check_same_steps(jsonl(s3.read("pipeline/metrics.jsonl")), reference)
    resumed = check_replayed(jsonl(s3.read("pipeline/events.jsonl")), reference)
    assert resumed["resumed_from"] > 0 and resumed["resumed_from"] % 5 == 0  # from a checkpoint, not from scratch
    assert {"prepare", "train", "eval"} <= set(json.loads(s3.read("pipeline/timings.json")))
    result = json.loads(s3.read("pipeline/eval/eval.json"))
    assert set(result["models"]) == {"base", "tuned"}
    assert set(result["generation"]["models"]) == {"base", "tuned"}  # greedy answers scored, both models
    assert "exact_match" in result["generation"]["comparisons"]["tuned"]
    # Through the endpoint, the tuned model scores every held-out pair as the reference's final model did in
    # training (the same weights): per-pair log-probs within fp32 noise, hence the same accuracy.
    served = jsonl(s3.read("pipeline/eval/pairs_tuned.jsonl"))
    trained = reference["heldout"]
    assert len(served) == len(trained) == 40
    for got, want in zip(served, trained, strict=True):
        tokens = got["len_chosen"] + got["len_rejected"]
        assert got["logp_chosen"] == pytest.approx(want["logp_chosen"], abs=1e-3 * tokens)
        assert got["logp_rejected"] == pytest.approx(want["logp_rejected"], abs=1e-3 * tokens)
    assert result["models"]["tuned"]["accuracy"] == pytest.approx(reference["final"]["eval/accuracy"])
    print("\nnode loss:", {"killed_node": victim.name, "killed_at_step": killed_at, **resumed})


def test_driver_killed_then_job_resubmitted_resumes_from_object_storage(cluster, reference):
    s3, nodes = cluster
    run = "s3://cpo-ray/driver"
    args = ["jobs/pipeline.py", "--config", CONFIG, f"output_dir={run}", "name=mn", "--skip", "eval",
            *TRAIN, *ON_TWO_NODES]  # fmt: skip
    job = submit(nodes, args, wait=False)
    wait_for_step(s3, "driver/metrics.jsonl", 7, job)
    drivers = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if "jobs/pipeline.py" in cmd and "output_dir=s3://cpo-ray/driver" in cmd and "ray job" not in cmd:
                drivers.append(p)
    assert drivers, "the job's driver process was not found"
    for p in drivers:
        p.send_signal(signal.SIGKILL)  # the driver dies: its trainer, workers and run log with it
    job.communicate(timeout=300)
    # A checkpoint cut short by the crash: newest by name, half written. The resume must not pick it.
    torn = "driver/ray/mn/checkpoint_2099-01-01_00-00-00.000000"
    s3.client().put_object(Bucket=s3.bucket, Key=f"{torn}/cpo_state.json", Body=b'{"step": 9')
    s3.client().put_object(Bucket=s3.bucket, Key=f"{torn}/ckpt/mp_rank_00_model_states.pt", Body=b"\x80\x02trunc")
    again = submit(nodes, args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "resumed at step" in again.stdout
    check_same_steps(jsonl(s3.read("driver/metrics.jsonl")), reference)
    print("\ndriver kill:", check_replayed(jsonl(s3.read("driver/events.jsonl")), reference))
    assert "driver/final/config.json" in set(s3.keys("driver/"))
