"""The training step on a GPU (issue 15, item 5): cpo-ray's step vs a plain padded transformers step, one process.

Run from the repository root on a CUDA machine (needs only torch, transformers and numpy: no Ray, DeepSpeed or
vLLM, no downloads, no data files), as one short command that fits a 15-minute device budget:

    python -m bench.gpu_step --shapes smollm2,qwen2.5-0.5b --steps 20 --warmup 3        # ~5 min on an H200
    python -m bench.gpu_step --device cpu --shapes tiny --steps 2 --warmup 1             # smoke run, any machine

For each shape a random model is built from a real architecture's config (SmolLM2-135M: Llama, 30 x 576, GQA
9/3, vocab 49,152, tied embeddings; Qwen2.5-0.5B: Qwen2, 24 x 896, GQA 14/2, vocab 151,936, tied embeddings).
Pairs are random token ids with HH-RLHF-like lengths (prompt ~150, responses ~60 tokens, lognormal, capped at
--max-length), --pairs per optimizer step. Every contender trains the same pairs from the same initial weights
with fp32 master weights under bf16 autocast, fused AdamW (lr 1e-5), grad-norm clip 1.0, sigmoid CPO + NLL:

  hf_padded  transformers' own forward on right-padded rows (sdpa), logits at EVERY position, log_softmax +
             gather at the response tokens (TRL's recipe, without TRL)
  padded     cpo-ray: the same rows, the LM head only at response positions (cpo_ray.train.logps.sequence_logps)
  packed     cpo-ray: sequences packed into rows as wide as the longest, block-diagonal mask (sdpa)
  shared     cpo-ray's default: one row, each prompt once for both responses, cpo-ray's per-segment SDPA

tokens/s counts prompt + response of both sequences of each pair (the same for every contender). MFU =
tokens/s x 6 x params / the measured bf16 matmul peak (best of 8192^3 torch.mm). Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "smollm2": (
        "LlamaConfig",
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    ),
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    ),
    "tiny": (
        "LlamaConfig",
        dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048),
    ),
}  # fmt: skip
CONTENDERS = ["hf_padded", "padded", "packed", "shared"]
BETA, CPO_ALPHA, LR = 0.1, 1.0, 1e-5


def log(msg: str) -> None:
    print(f"[gpu_step] {msg}", file=sys.stderr, flush=True)


def make_pairs(n: int, vocab: int, max_length: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p, c, r = (int(x) for x in rng.lognormal([4.8, 3.9, 3.9], 0.6).clip(4, max_length))
        if p + max(c, r) <= max_length:
            ids = lambda k: rng.integers(3, vocab, k).tolist()  # noqa: E731
            out.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": [ids(r)]})
    return out


def measure_bf16_peak(device: str, n: int = 8192, reps: int = 10) -> float:
    import torch

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    n = n if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12  # TFLOP/s


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def hf_padded_loss(model, raw: dict, pad_id: int, device: str):
    """transformers' forward on padded rows, full logits, log_softmax + gather: TRL's recipe."""
    import torch
    import torch.nn.functional as F

    from cpo_ray.train.collate import collate_padded
    from cpo_ray.train.loss import Objective, PolicyLogps

    batch = collate_padded(raw, pad_id)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    labels = torch.full_like(ids, -100)
    flat = labels.view(-1)
    flat[batch["pred_idx"].to(device) + 1] = batch["tgt_ids"].to(device)  # the real next tokens
    lab = labels[:, 1:]
    keep = lab != -100
    tok = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, lab.clamp_min(0).unsqueeze(2)).squeeze(2) * keep
    logp, count = tok.sum(-1), keep.sum(-1).float()
    loss, _ = Objective(beta=BETA, cpo_alpha=CPO_ALPHA)(PolicyLogps.split(logp, count, batch["num_chosen"]))
    return loss, batch["tokens"]


def cpo_ray_loss(model, batch: dict, device: str):
    from cpo_ray.train.logps import sequence_logps
    from cpo_ray.train.loss import Objective, PolicyLogps

    logp, count = sequence_logps(model, batch)
    logps = PolicyLogps.split(logp, count, batch["num_chosen"], batch["rejected_group"])
    loss, _ = Objective(beta=BETA, cpo_alpha=CPO_ALPHA)(logps)
    return loss, batch["tokens"]


def run(name: str, cfg, pairs: list[dict], args, state: dict) -> dict:
    import torch
    import transformers

    from cpo_ray.train.attention import use_varlen_attention
    from cpo_ray.train.collate import as_batch, collate_packed, collate_padded, collate_shared

    device = args.device
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.load_state_dict(state)
    model.to(device).train()
    model.config.use_cache = False
    collate = {"padded": collate_padded, "packed": collate_packed, "shared": collate_shared}.get(name)
    if name == "shared":
        use_varlen_attention(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=device == "cuda")
    steps = [as_batch(pairs[i * args.pairs : (i + 1) * args.pairs]) for i in range(args.warmup + args.steps)]
    tokens, t0 = 0, None
    for i, raw in enumerate(steps):
        if i == args.warmup:
            _sync(device)
            t0, tokens = time.perf_counter(), 0
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            if name == "hf_padded":
                loss, n = hf_padded_loss(model, raw, 0, device)
            else:
                loss, n = cpo_ray_loss(model, collate(raw, 0), device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n
    _sync(device)
    secs = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    del model, opt
    return {"tokens_per_s": tokens / secs, "step_s": secs / args.steps, "last_loss": float(loss), "peak_gpu_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2,qwen2.5-0.5b")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--pairs", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    import transformers

    t_start = time.perf_counter()
    peak = measure_bf16_peak(args.device)
    out = {"bench": "gpu_step", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "peak_bf16_mm_tflops": round(peak, 1), "shapes": {}}  # fmt: skip
    for shape in args.shapes.split(","):
        cls, kw = SHAPES[shape]
        cfg = getattr(transformers, cls)(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(args.seed)
        state = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).state_dict()
        n_params = sum(v.numel() for k, v in state.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight"))
        pairs = make_pairs(args.pairs * (args.warmup + args.steps), cfg.vocab_size, args.max_length, args.seed)
        res = {}
        for name in args.contenders.split(","):
            log(f"{shape}: {name}")
            r = run(name, cfg, pairs, args, state)
            r["mfu"] = r["tokens_per_s"] * 6 * n_params / (peak * 1e12)
            res[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            log(f"  {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.3f}")
        best = max((n for n in res if n != "hf_padded"), key=lambda n: res[n]["tokens_per_s"], default=None)
        out["shapes"][shape] = {
            "params": n_params,
            "pairs_per_step": args.pairs,
            "max_length": args.max_length,
            "contenders": res,
            "best_cpo_ray": best,
            "best_over_hf_padded": round(res[best]["tokens_per_s"] / res["hf_padded"]["tokens_per_s"], 3)
            if best and "hf_padded" in res
            else None,
            "mfu_target": 0.45,
        }
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
