"""`cpo-ray iterate` end to end on the embedded model: serve the policy, evaluate it (preferences and greedy
generations through the endpoint), sample K answers per training prompt in one request each, score them, write
ranked rows through Ray Data, train a round from the policy, evaluate the new policy; then a re-run resumes:
every finished round is skipped, nothing is served again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT
from cpo_ray.contract import generations_file

OVERRIDES = [
    "data.synthetic.train_pairs=400",
    "data.synthetic.eval_pairs=20",
    "data.synthetic.max_number=99",
    "model.tiny.hidden_size=128",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.intermediate_size=256",
    "train.micro_batch_size=8",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.warmup_steps=1",
    "iterate.rounds=1",
    "iterate.prompts_per_round=48",
    "iterate.samples=3",
    "iterate.steps_per_round=4",
    "eval.generation.prompts=20",
    "eval.generate_samples=2",
    "eval.max_new_tokens=16",
]


def run(out, *extra):
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cpo_ray.cli", "iterate", "--config", "configs/tiny-cpu.yaml", f"output_dir={out}",
           "name=online", *OVERRIDES, *extra]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_iterate_rounds_end_to_end_then_resume(tmp_path):
    out = tmp_path / "online"
    console = run(out).splitlines()
    print("\n".join(["", "iterate console:", *console]))
    state = json.loads((out / "iterate.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [0, 1] and all(r["complete"] for r in state["rounds"])
    first, last = state["rounds"]
    s = first["sampling"]
    assert s["prompts"] == 48 and s["samples"] == 48 * 3 and 0 < s["ranked_rows"] <= 48
    assert s["sampling_s"] > 0 and s["generated_tokens"] > 0 and first["training_s"] > 0
    # the ranked rows the round trained on: the reference first and best, then the model's own wrong answers
    rows = [
        json.loads(ln) for f in (out / "rounds" / "0" / "samples").rglob("*.json") for ln in f.read_text().splitlines()
    ]
    assert len(rows) == s["ranked_rows"]
    assert all(
        r["scores"][0] == 1.0 and all(x < 1.0 for x in r["scores"][1:]) and len(r["responses"]) == 2 for r in rows
    )
    assert (out / "rounds" / "0" / "final" / "config.json").exists()
    assert last["policy"] == first["policy_after"] == str(out / "rounds" / "0" / "final")
    for r in (first, last):  # each policy evaluated through the endpoint: preferences and generations
        assert 0 <= r["eval"]["accuracy"] <= 1 and 0 <= r["eval"]["exact_match"] <= 1 and r["eval"]["chrf"] >= 0
        gen = [
            json.loads(ln)
            for ln in (out / "rounds" / str(r["round"]) / "eval" / generations_file("policy")).read_text().splitlines()
        ]
        assert len(gen) == 20 and all({"prompt", "response", "reference", "exact_match", "chrf"} <= set(g) for g in gen)
    assert (out / "report.html").read_text().count("<tr>") == 1 + 2  # header + a row per evaluated round
    assert console[-1] == f"report: {out / 'report.html'}"
    again = run(out)  # resume: both rounds done earlier, nothing served or trained again
    assert again.count("done earlier") == 2 and "starting vLLM" not in again and "── train" not in again
