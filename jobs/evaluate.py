"""Evaluate: score held-out pairs through an OpenAI-compatible endpoint (prompt log-probs, chosen vs rejected).

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml \
        --endpoint http://127.0.0.1:8000/v1 --model base --model tuned

Writes <output_dir>/eval/: eval.json, pairs_<model>.jsonl, margins.png, eval.md, samples.
"""

import argparse

from cpo_ray.config import load_config
from cpo_ray.pipeline import stage_eval

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
ap.add_argument("--model", action="append", required=True, help="served model id (repeat; first = baseline)")
ap.add_argument("--pairs", help="tokenized held-out pairs (default: <output_dir>/data/eval)")
ap.add_argument("--tokenizer", help="tokenizer folder, to decode sample generations")
ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.concurrency=32")
args = ap.parse_args()

cfg = load_config(args.config, args.overrides)
if args.pairs:
    cfg.eval.pairs = args.pairs
result = stage_eval(cfg, args.endpoint, args.model, tokenizer_path=args.tokenizer)  # no Ray needed: plain HTTP
