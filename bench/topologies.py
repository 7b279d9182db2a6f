"""The embedded default on one node with a local disk against three nodes with object storage only, in one run.

Run from the repository root (as root: the worker nodes get their own mount namespaces):

    .venv/bin/python -m bench.topologies                       # the whole embedded default twice, ~15 min
    .venv/bin/python -m bench.topologies train.max_steps=100   # overrides go to both runs

(a) `cpo-ray pipeline --config configs/tiny-cpu.yaml` on a local Ray: 1 node x 2 workers, output_dir on the local
disk. (b) The same config submitted with `ray job submit` to a cpo_ray.devcluster cluster: a head (1 CPU) and two
worker nodes (2 CPUs each, private /tmp and HOME) sharing only moto's S3 server; train.cpus_per_worker=1.5, so
2 nodes x 1 worker, output_dir s3://. Both on this machine's 2 cores, one after the other.

Prints ONE JSON object: each run's stage wall times and their ratio (what the cluster and the object store cost),
the largest per-step loss difference and whether every step's per-rank data digests are equal, the held-out
accuracy through the endpoint of both, and what the bucket holds by prefix (bytes). Logs on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny-cpu.yaml"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def steps(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if "loss" in r and not r.get("final")}


def one_node(work: Path, overrides: list[str]) -> dict:
    out = work / "local"
    env = dict(os.environ, RAY_ADDRESS="local")
    cmd = [sys.executable, "-m", "cpo_ray.cli", "pipeline", "--config", CONFIG, f"output_dir={out}", "name=topo",
           *overrides]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "timings": json.loads((out / "timings.json").read_text()),
        "rows": rows,
        "eval": json.loads((out / "eval" / "eval.json").read_text()),
    }


def three_nodes(work: Path, overrides: list[str]) -> dict:
    from cpo_ray.devcluster import VENV_BIN, RayNodes, S3Server, free_port

    with S3Server(work / "s3") as s3, RayNodes(work / "nodes", env=s3.env) as nodes:
        nodes.start_head(num_cpus=1)
        nodes.add_node(num_cpus=2)
        nodes.add_node(num_cpus=2)
        args = ["jobs/pipeline.py", "--config", CONFIG, "output_dir=s3://cpo-ray/topo", "name=topo",
                "train.cpus_per_worker=1.5", f"serve.port={free_port()}", *overrides]  # fmt: skip
        cmd = [str(VENV_BIN / "ray"), "job", "submit", f"--address={nodes.dashboard}", "--working-dir", str(ROOT),
               "--runtime-env", str(ROOT / "runtime_env.yaml"), "--", "python", *args]  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(12):  # the dashboard answers before its job agent registers: retry that case only
            done = subprocess.run(cmd, cwd=ROOT, env=nodes.client_env(), capture_output=True, text=True)
            if "No available agent to submit job" not in done.stdout + done.stderr:
                break
            time.sleep(5)
        if done.returncode:
            raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        read = lambda key: s3.read(f"topo/{key}")  # noqa: E731
        by_prefix: dict[str, int] = {}
        for obj in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="topo/").get("Contents", []):
            top = obj["Key"].split("/")[1]
            by_prefix[top] = by_prefix.get(top, 0) + obj["Size"]
        return {
            "wall_s": round(time.perf_counter() - t0, 1),
            "timings": json.loads(read("timings.json")),
            "rows": [json.loads(ln) for ln in read("metrics.jsonl").decode().splitlines()],
            "eval": json.loads(read("eval/eval.json")),
            "bucket_bytes_by_prefix": by_prefix,
        }


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="cpo-topo-bench-") as tmp:
        work = Path(tmp)
        log("one node, local disk ...")
        a = one_node(work, overrides)
        log(f"  {a['wall_s']} s; three nodes, object storage only ...")
        b = three_nodes(work, overrides)
        log(f"  {b['wall_s']} s")
    sa, sb = steps(a["rows"]), steps(b["rows"])
    common = sorted(set(sa) & set(sb))
    stages = sorted(set(a["timings"]) & set(b["timings"]))
    acc = {name: {m: r["eval"]["models"][m]["accuracy"] for m in r["eval"]["models"]} for name, r in (("one_node", a), ("three_nodes", b))}  # fmt: skip
    out = {
        "config": CONFIG,
        "overrides": overrides,
        "one_node_local_disk": {"wall_s": a["wall_s"], "stage_s": a["timings"]},
        "three_nodes_object_storage": {
            "wall_s": b["wall_s"],
            "stage_s": b["timings"],
            "bucket_bytes_by_prefix": b["bucket_bytes_by_prefix"],
        },  # fmt: skip
        "stage_ratio_three_over_one": {k: round(b["timings"][k] / max(a["timings"][k], 1e-9), 2) for k in stages},
        "steps_compared": len(common),
        "same_steps": sorted(sa) == sorted(sb),
        "max_abs_loss_diff": max(abs(sa[s]["loss"] - sb[s]["loss"]) for s in common),
        "all_digests_equal": all(sa[s]["data/digest"] == sb[s]["data/digest"] for s in common),
        "endpoint_accuracy": acc,
        # the whole tables (accuracies, margins, McNemar, CIs): the one-node run IS the embedded default
        "endpoint": {
            name: {k: r["eval"].get(k) for k in ("models", "comparisons")}
            for name, r in (("one_node", a), ("three_nodes", b))
        },  # fmt: skip
        "final_heldout_in_training": {
            name: next((x for x in reversed(r["rows"]) if "eval/accuracy" in x), {})
            for name, r in (("one_node", a), ("three_nodes", b))
        },  # fmt: skip
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
