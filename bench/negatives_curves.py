"""Held-out accuracy per second and per token of finished training runs, side by side (multi-negative / SFT study).

Reads each run's metrics.jsonl (the trainer's own log: nothing is re-run) and prints one JSON object: per run the
held-out evaluations with the training seconds and sequence tokens spent until then, the first step/second/token
at which each accuracy threshold was reached, and ratios against the first run. Train the runs first:

    for c in numbers-k1-pairwise numbers-k3-split-pairs numbers-k3-infonce numbers-sft-then-cpo; do
        .venv/bin/cpo-ray pipeline --config configs/$c-cpu.yaml --skip eval; done
    .venv/bin/python -m bench.negatives_curves runs/numbers-k1-pairwise-cpu runs/numbers-k3-split-pairs-cpu \\
        runs/numbers-k3-infonce-cpu runs/numbers-sft-then-cpo-cpu --plot bench/figures/multi_negative_sft.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> dict:
    """Evaluations of one run with the cumulative training time and tokens at their step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in rows if "loss" in r}
    tokens, seen = {0: 0}, 0
    for step in sorted(train):
        seen += train[step]["tokens"]
        tokens[step] = seen
    points = []
    for r in rows:
        if "eval/accuracy" not in r:
            continue
        step = r["step"]
        points.append(
            {
                "step": step,
                "train_s": train[step]["elapsed_s"] if step in train else 0.0,
                "seq_tokens": tokens.get(step, 0),
                "phase": train[step].get("phase") if step in train else None,
                "accuracy": round(r["eval/accuracy"], 4),
                "pair_accuracy": round(r.get("eval/pair_accuracy", r["eval/accuracy"]), 4),
            }
        )
    steps = sorted(train)
    last = train[steps[-1]]
    return {
        "points": points,
        "steps": steps[-1],
        "train_s": last["elapsed_s"],
        "seq_tokens": tokens[steps[-1]],
        "tokens_per_s": round(tokens[steps[-1]] / last["elapsed_s"], 1),
    }


def first_reaching(points: list[dict], threshold: float) -> dict | None:
    hit = next((p for p in points if p["accuracy"] >= threshold), None)
    return None if hit is None else {k: hit[k] for k in ("step", "train_s", "seq_tokens")}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in runs.items():
        pts = c["points"]
        axes[0].plot([p["train_s"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, label=name)
        axes[1].plot([p["seq_tokens"] / 1e6 for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, label=name)
    axes[0].set_xlabel("training seconds (2 workers x 1 CPU)")
    axes[1].set_xlabel("sequence tokens trained (millions)")
    for ax in axes:
        ax.set_ylabel("held-out accuracy (chosen beats every rejected)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (<output_dir>/<name>) holding metrics.jsonl")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--plot", type=Path, help="write accuracy vs seconds and vs tokens here (PNG)")
    args = ap.parse_args()
    runs = {run.name: curve(run) for run in args.runs}
    base = next(iter(runs))
    for c in runs.values():
        c["first_reaching"] = {str(t): first_reaching(c["points"], t) for t in args.thresholds}
        c["final_accuracy"] = c["points"][-1]["accuracy"]
        c["ratio_tokens_per_s_vs_" + base] = round(c["tokens_per_s"] / runs[base]["tokens_per_s"], 3)
    if args.plot:
        plot(runs, args.plot)
    print(json.dumps({"bench": "negatives_curves", "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
