"""Peak memory and step time of one training process: SmolLM2-135M + LoRA, full steps (forward, backward, AdamW).

    .venv/bin/python -m bench.train_memory                       # varlen, shared, shared_ckpt x 2 and 4 pairs
    .venv/bin/python -m bench.train_memory --pairs 2 --dropout 0  # one micro-batch size, no LoRA dropout

Each contender runs in a fresh child process (peak RSS = VmHWM from after the model is built), on one micro-batch:
`--pairs` pairs of `--max-length`-token sequences shaped like the HH config's (60% prompt, 40% response, each
sequence at the limit), random token ids over the real vocabulary. Contenders: `varlen` = one packed sequence per
prompt + response (what packing did before shared prompts), `shared` = each prompt once for its responses (the
default), `shared_ckpt` = shared + model.gradient_checkpointing. Ratios are against varlen in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

from bench.common import log, run_bench, smollm2_dir

CONTENDERS = ("varlen", "shared", "shared_ckpt")


def _child(name: str, model_dir: str, pairs: int, max_length: int, dropout: float, steps: int, q) -> None:
    import time

    import numpy as np
    import torch

    from bench.common import peak_rss_gib, reset_peak_rss
    from cpo_ray.config import load_config
    from cpo_ray.contract import PAIR_COLUMNS
    from cpo_ray.train.collate import collate_for
    from cpo_ray.train.logps import sequence_logps
    from cpo_ray.train.model import build_model

    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            "model.lora.enabled=true",
            f"model.lora.dropout={dropout}",
            f"model.gradient_checkpointing={name == 'shared_ckpt'}",
        ],
    )
    model = build_model(cfg, model_dir, torch.float32)
    model.train()  # as the trainer: LoRA dropout and gradient checkpointing act in train mode only
    vocab = model.config.vocab_size
    after_build = reset_peak_rss()  # the model's weights stay: the peak below includes them
    collate = collate_for(True, None, model, pad_id=0, shared_prompt=name != "varlen")
    rng = np.random.default_rng(0)
    p, r = int(max_length * 0.6), max_length - int(max_length * 0.6)

    def column(n):
        out = np.empty(pairs, dtype=object)
        out[:] = [rng.integers(3, vocab, n).astype(np.int32) for _ in range(pairs)]
        return out

    raw = {PAIR_COLUMNS[0]: column(p), PAIR_COLUMNS[1]: column(r)}
    rej = np.empty(pairs, dtype=object)
    rej[:] = [[x] for x in column(r)]
    raw[PAIR_COLUMNS[2]] = rej
    batch = collate(raw)
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-4, fused=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logp, cnt = sequence_logps(model, batch)
        (-(logp.sum() / cnt.sum())).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_gib()
    q.put(
        {
            "peak_rss_gib": round(peak, 2),
            "model_built_rss_gib": round(after_build, 2),
            "step_s": round(min(times[1:] or times), 2),
            "tokens_computed": int(batch.get("tokens_computed", batch["tokens"])),
            "sequence_tokens": int(batch["tokens"]),
        }
    )


def bench(args, work) -> dict:
    model_dir = str(smollm2_dir())
    ctx = mp.get_context("spawn")
    res = {}
    for pairs in args.pairs:
        for name in args.contenders:
            q = ctx.Queue()
            proc = ctx.Process(
                target=_child, args=(name, model_dir, pairs, args.max_length, args.dropout, args.steps, q)
            )
            proc.start()
            out = q.get()
            proc.join()
            key = f"{name}_{pairs}pairs"
            res[key] = out
            log(f"{key}: {out}")
        base = res.get(f"varlen_{pairs}pairs")
        for name in args.contenders:
            r = res[f"{name}_{pairs}pairs"]
            if base:
                r["peak_ratio_vs_varlen"] = round(r["peak_rss_gib"] / base["peak_rss_gib"], 3)
                r["step_time_ratio_vs_varlen"] = round(r["step_s"] / base["step_s"], 3)
    return {
        "bench": "train_memory",
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1), LoRA r16 all-linear, fp32, 1 thread",
        "setup": {
            "max_length": args.max_length,
            "prompt_share": 0.6,
            "lora_dropout": args.dropout,
            "steps": args.steps,
        },
        "contenders": res,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[2, 4], help="pairs per micro-batch (each a run)")
    ap.add_argument("--max-length", type=int, default=384, help="tokens per sequence (prompt + one response)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (0 avoids its input copies)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per contender (time: best after the first)")
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = ap.parse_args()
    run_bench(lambda work: bench(args, work), prefix="cpo-ray-bench-mem-")


if __name__ == "__main__":
    main()
