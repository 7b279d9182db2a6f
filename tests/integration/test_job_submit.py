"""`ray job submit` of jobs/pipeline.py on a private local cluster, stopped by its own processes.

The cluster runs `ray start --head --block` as a child of this test, on loopback, with its own temp
dir and free ports; teardown terminates that child and every process it spawned (never `ray stop`,
which would kill other people's Ray on the machine). Ray 2.60 clusters use token auth: the client
gets RAY_AUTH_MODE=token and the token `ray start` keeps in ~/.ray/auth_token.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_cluster():
    tmp = tempfile.mkdtemp(prefix="cpo-rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--num-cpus=4",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ],  # fmt: skip
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("private Ray head did not come up") from None
                time.sleep(1)
        yield url, env
    finally:
        procs = [head, *psutil.Process(head.pid).children(recursive=True)] if head.poll() is None else []
        procs = [p if isinstance(p, psutil.Process) else psutil.Process(p.pid) for p in procs]
        # also the processes Ray re-parented away from the head but started under our temp dir
        for p in psutil.process_iter(["cmdline"]):
            if any(tmp in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_pipeline_job_succeeds(private_cluster, tmp_path):
    url, env = private_cluster
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        "name=jobtest",
        "data.synthetic.train_pairs=1500",
        "data.synthetic.eval_pairs=40",
        "data.synthetic.max_number=999",
        "train.max_steps=30",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.generate_samples=2",
        "eval.max_new_tokens=16",
        f"serve.port={free_port()}",
    ]
    cmd = [str(VENV_BIN / "ray"), "job", "submit", f"--address={url}", "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "runtime_env.yaml"), "--",
           "python", "jobs/pipeline.py", "--config", "configs/tiny-cpu.yaml", *overrides]  # fmt: skip
    for _ in range(12):  # the dashboard answers before its job agent registers: retry that case only
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            break
        time.sleep(5)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    assert "succeeded" in proc.stdout.lower(), log
    # What the job's user reads: the driver's console, between Ray's "Tailing logs" banner and its verdict.
    lines = proc.stdout.split("Tailing logs until the job exits", 1)[1].splitlines()[1:]
    console = lines[: next(i for i, ln in enumerate(lines) if "SUCC cli.py" in ln)]  # up to Ray's verdict
    print("\n".join(["", "job console:", *console]))
    assert len(console) < 60, "\n".join(console)
    console = console[next(i for i, ln in enumerate(console) if ln.startswith("── ")) :]  # after Ray's 2 set-up lines
    assert [ln for ln in console if ln.startswith("── ")][:3] == [
        ln for ln in console if ln.startswith(("── prepare", "── train", "── eval"))
    ]  # stage headers, in order
    assert console[-1].startswith("report: ") and console[-1].endswith("report.html")
    table = [ln for ln in console[-15:] if ln.startswith("|")]
    assert table[0] == "| metric | base | tuned |" and console[-2] == table[-1]  # the table, then the report path
    assert not [ln for ln in console if "INFO" in ln or "WARNING" in ln]  # framework lines went to the logs
    assert (out / "logs" / "train.log").stat().st_size > 0
    assert (out / "report.html").exists() and (out / "final" / "model.safetensors").exists()
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert set(result["models"]) == {"base", "tuned"}
    timings = json.loads((out / "timings.json").read_text())
    assert {"prepare", "train", "eval"} <= set(timings)
