"""Evaluate: score held-out pairs through an OpenAI-compatible endpoint (prompt log-probs, chosen vs rejected).

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml \
        --endpoint http://127.0.0.1:8000/v1 --model base --model tuned

Writes <output_dir>/eval/: eval.json, pairs_<model>.jsonl, margins.png, eval.md, samples.md. Plain HTTP:
needs no Ray. Same options, overrides, messages and exit codes as `cpo-ray eval`.
"""

from cpo_ray.cli import cmd_eval, job

with job("eval") as (cfg, args):
    cmd_eval(cfg, args)  # --endpoint, --model (repeat; first = baseline), --pairs, --tokenizer
