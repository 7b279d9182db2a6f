"""Throughput of held-out pair scoring: Ray Serve LLM endpoint vs a plain transformers forward.

Run from the repository root:

    .venv/bin/python -m bench.eval_throughput --pairs 200 --concurrency 16 --pairs-per-request 1 8 16
    .venv/bin/python -m bench.eval_throughput --pairs 16 --pairs-per-request 8 --repeats 1   # quick smoke run

Builds the embedded tiny model and synthetic held-out pairs, starts a local Ray of its own (own temp
folder) + the Serve app with one id ("base"), scores every pair through /v1/completions (cpo_ray.evaluate,
prompt_logprobs; once per --pairs-per-request value), then with a batched no-grad transformers forward in
this process once Ray is down, and prints ONE JSON object on stdout (everything else goes to stderr):
pairs/s of each (best of --repeats), the ratio, and the max |logp difference| between the two (they must
agree). Not a test: numbers depend on the machine and its load (the JSON carries the load average).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import local_ray, run_bench


def make_tokenized_pairs(model_dir: str, n: int, max_length: int) -> list[dict]:
    from transformers import AutoTokenizer

    from cpo_ray.contract import PAIR_COLUMNS
    from cpo_ray.synthetic import make_pairs
    from cpo_ray.tokenize import Special, tokenize_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = make_pairs(n, held_out=True, max_number=999_999, eval_fraction=0.1, seed=0)
    cols = ([r[k] for r in raw] for k in ("prompt", "chosen", "rejected"))
    rows, _ = tokenize_batch(tok, Special.of(tok), *cols, max_length=max_length)
    return [{k: r[k] for k in PAIR_COLUMNS} for r in rows if r is not None]


def transformers_logps(model_dir: str, pairs: list[dict], batch_size: int) -> tuple[list[tuple[float, float]], float]:
    """(sum logp chosen, sum logp rejected) per pair from right-padded batches; also the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[float] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            seqs, starts = [], []
            for p in pairs[i : i + batch_size]:
                for resp in (p["chosen_ids"], p["rejected_ids"]):
                    seqs.append(p["prompt_ids"] + resp)
                    starts.append(len(p["prompt_ids"]))
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, s in enumerate(seqs):
                ids[j, : len(s)], attn[j, : len(s)] = torch.tensor(s), 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
            pos = torch.arange(1, width)[None, :]  # position of each predicted token
            scored = (pos >= torch.tensor(starts)[:, None]) & (attn[:, 1:] == 1)
            out += (tok_logp * scored).sum(-1).tolist()
    return list(zip(out[0::2], out[1::2], strict=True)), time.perf_counter() - t0


def bench(args, work: Path) -> dict:
    from cpo_ray.config import EvalConfig, ServeConfig
    from cpo_ray.contract import pairs_file
    from cpo_ray.embedded import build_embedded_model
    from cpo_ray.evaluate import evaluate_models
    from cpo_ray.serve import start_server, stop_server

    model = str(build_embedded_model(work / "model"))
    pairs = make_tokenized_pairs(model, args.pairs, max_length=256)
    with local_ray(args.num_cpus, work / "ray"):
        try:
            t0 = time.perf_counter()
            cfg = ServeConfig(port=args.port, device="cpu", max_model_len=512, kv_cache_memory_bytes=64 * 2**20)
            url = start_server(cfg, {"base": model}, detached=False, cache_dir=str(work / "cache"))
            startup_s = time.perf_counter() - t0
            endpoint_pps = {}
            for k in args.pairs_per_request:
                eval_cfg = EvalConfig(concurrency=args.concurrency, generate_samples=0, pairs_per_request=k)
                runs = [evaluate_models(url, ["base"], pairs, eval_cfg, work / "eval") for _ in range(args.repeats)]
                endpoint_pps[k] = max(r["models"]["base"]["pairs_per_s"] for r in runs)
            rows = [json.loads(line) for line in (work / "eval" / pairs_file("base")).read_text().splitlines()]
        finally:
            stop_server()
    # Engines are gone now: the transformers pass gets the whole machine, as the endpoint did.
    timed = [transformers_logps(model, pairs, args.batch_size) for _ in range(args.repeats)]
    ref, hf_pps = timed[0][0], max(len(pairs) / s for _, s in timed)
    diff = max(max(abs(r["logp_chosen"] - c), abs(r["logp_rejected"] - j)) for r, (c, j) in zip(rows, ref, strict=True))
    return {
        "pairs": len(pairs),
        "endpoint_pairs_per_s": {f"{k}_pairs_per_request": round(v, 2) for k, v in endpoint_pps.items()},
        "transformers_pairs_per_s": round(hf_pps, 2),
        "ratio_best_endpoint_over_transformers": round(max(endpoint_pps.values()) / hf_pps, 3),
        "max_abs_diff_logp": diff,
        "server_startup_s": round(startup_s, 1),
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "scoring": runs[0]["models"]["base"]["scoring"],  # the last setting's runs: all probe the same
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per transformers forward")
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    ap.add_argument("--pairs-per-request", type=int, nargs="+", default=[1, 8, 16], help="one timing per value")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings each (shared hosts are noisy)")
    args = ap.parse_args()
    run_bench(lambda work: bench(args, work), prefix="cpo-bench-")


if __name__ == "__main__":
    main()
