"""One vLLM engine for the base model and its LoRA adapters (Ray Serve LLM, adapters in an S3-compatible store).

A tiny random Llama, a LoRA adapter with non-zero weights on every projection (peft), the adapter uploaded to
moto's S3 server and its merged copy kept as a folder. One app serves `base` with LoRA on (the adapter as
`base:tuned`, loaded from S3 on demand) and `merged` on a second engine. Through the OpenAI endpoint, the
evaluator's log-probs of the adapter equal the merged model's within 1e-3 nats per token, and differ from the
base's (the adapter is really applied).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from cpo_ray.config import EvalConfig, ServeConfig
from cpo_ray.contract import pairs_file
from cpo_ray.devcluster import S3Server, free_port

RANK = 8


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory):
    """moto S3, and a private local Ray whose processes see the store's settings in their environment."""
    import ray

    with S3Server(tmp_path_factory.mktemp("s3")) as s3:
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        tmp = tempfile.mkdtemp(prefix="cpo-ray-t-", dir="/tmp")
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
        try:
            yield s3
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def models(s3_ray, tmp_path_factory):
    """base/ (tiny Llama), an adapter in s3://cpo-ray/adapters/tuned/, merged/ (base + adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpo_ray.embedded import build_embedded_model
    from cpo_ray.storage import Location

    root = tmp_path_factory.mktemp("lora")
    base = build_embedded_model(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero (no change): give the adapter an effect
    peft.save_pretrained(root / "adapter")
    Location("s3://cpo-ray/adapters/tuned").publish_from(root / "adapter", marker="adapter_config.json")
    merged = peft.merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "merged")
    return {"base": str(base), "merged": str(root / "merged")}


def test_adapter_on_the_base_engine_scores_like_the_merged_model(s3_ray, models, tokenizer, tmp_path):
    from ray import serve

    from cpo_ray.data.synthetic import make_pairs
    from cpo_ray.data.tokenize import Special, tokenize_batch
    from cpo_ray.eval.scorer import evaluate_models
    from cpo_ray.serve.app import start_server

    cfg = ServeConfig(port=free_port(), max_model_len=256, kv_cache_memory_bytes=64 * 2**20)
    lora = {"adapters": "s3://cpo-ray/adapters", "rank": RANK}
    url = start_server(cfg, models, detached=False, lora=lora, adapters=("base:tuned",))
    try:
        raw = make_pairs(24, held_out=True, max_number=999, eval_fraction=0.5, seed=1)
        rows, _ = tokenize_batch(tokenizer, Special.of(tokenizer), [r["prompt"] for r in raw],
                                 [r["chosen"] for r in raw], [[r["rejected"]] for r in raw], 128)  # fmt: skip
        pairs = [r for r in rows if r]
        ids = ["base", "base:tuned", "merged"]
        result = evaluate_models(url, ids, pairs, EvalConfig(generate_samples=0), tmp_path)
    finally:
        serve.shutdown()
    rows = {m: [json.loads(ln) for ln in (tmp_path / pairs_file(m)).read_text().splitlines()] for m in ids}
    worst, moved = 0.0, 0.0
    for a, m, b in zip(rows["base:tuned"], rows["merged"], rows["base"], strict=True):
        for key, n in (("logp_chosen", a["len_chosen"]), ("logp_rejected", a["len_rejected"])):
            worst = max(worst, abs(a[key] - m[key]) / n)
            moved = max(moved, abs(b[key] - m[key]) / n)
    print(f"\nadapter vs merged: max {worst:.2e} nats/token; base vs merged: max {moved:.3f} nats/token")
    assert worst <= 1e-3, worst
    assert moved > 50 * max(worst, 1e-5)  # the adapter changes the scores: it is applied, not ignored
    assert set(result["models"]) == set(ids)
