"""Sampling speed of `cpo-ray iterate`: K answers per prompt through the Ray Serve LLM endpoint (vLLM, one
request with n=K per chunk of prompts, as cpo_ray.eval.generate.sample sends them) vs transformers `generate`
of the same model on the same prompts in this process (batched, left-padded, num_return_sequences=K).

Run from the repository root:

    .venv/bin/python -m bench.sampling_speed                        # SmolLM2-135M-Instruct, 96 prompts x 4
    .venv/bin/python -m bench.sampling_speed --prompts 16 --samples 2  # smoke run

The prompts are held-out numbers-task questions rendered with SmolLM2's chat template exactly as the
smollm2-135m-numbers configs prepare them; both sides sample at --temperature, stop at the end of the turn
(<|im_end|>, the model's EOS) or after --max-new-tokens, and count only the tokens generated (up to and
including the stop token). A local Ray of its own serves ONE model (its engine gets every core); transformers
runs after Ray is down, with the same cores (--threads). Prints ONE JSON object on stdout: generated tokens/s
of each and their ratio. Not a test: numbers depend on the machine and its load (the JSON carries the load).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.common import load1, local_ray, log, run_bench, smollm2_dir


def chat_prompts(model_dir: str, n: int, max_length: int) -> list[list[int]]:
    """Prompt token ids of n held-out numbers questions, as data.chat_template: true renders them."""
    from transformers import AutoTokenizer

    from cpo_ray.data.formats import normalize
    from cpo_ray.data.synthetic import make_pairs
    from cpo_ray.data.tokenize import Special, tokenize_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [normalize(r, "explicit", tok, chat=True) for r in make_pairs(n, held_out=True, max_number=999_999,
                                                                          eval_fraction=0.1, seed=0)]  # fmt: skip
    p, c, r = (list(x) for x in zip(*texts, strict=True))
    rows, _ = tokenize_batch(tok, Special.of(tok), p, c, r, max_length=max_length)
    return [list(row["prompt_ids"]) for row in rows if row is not None]


def endpoint_tokens_per_s(url: str, prompts: list[list[int]], args) -> tuple[float, int, float]:
    from cpo_ray.config import EvalConfig, GenerationConfig
    from cpo_ray.eval.generate import sample
    from cpo_ray.eval.scorer import make_client

    cfg = EvalConfig(concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                     generation=GenerationConfig(prompts_per_request=args.prompts_per_request))  # fmt: skip

    async def run():
        async with make_client(url, None, cfg) as client:
            t0 = time.perf_counter()
            _, tokens = await sample(client, "base", prompts, cfg, args.samples, args.temperature)
            return tokens, time.perf_counter() - t0

    tokens, seconds = asyncio.run(run())
    return tokens / seconds, tokens, seconds


def transformers_tokens_per_s(model_dir: str, prompts: list[list[int]], args) -> tuple[float, int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad, eos = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                num_return_sequences=args.samples, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                pad_token_id=pad,
            )[:, width:]  # fmt: skip
            for row in out.tolist():  # generated tokens up to and including the first EOS, as vLLM counts them
                tokens += row.index(eos) + 1 if eos in row else len(row)
    seconds = time.perf_counter() - t0
    return tokens / seconds, tokens, seconds


def bench(args, work: Path) -> dict:
    import torch

    from cpo_ray.config import ServeConfig
    from cpo_ray.serve.app import start_server, stop_server

    model = str(smollm2_dir())
    prompts = chat_prompts(model, args.prompts, 96)
    log(f"{len(prompts)} prompts x {args.samples} samples, mean {sum(map(len, prompts)) / len(prompts):.1f} tokens")
    with local_ray(args.num_cpus, work / "ray"):
        try:
            t0 = time.perf_counter()
            cfg = ServeConfig(port=args.port, device="cpu", max_model_len=256, kv_cache_memory_bytes=256 * 2**20)
            url = start_server(cfg, {"base": model}, detached=False, cache_dir=str(work / "cache"))
            startup_s = time.perf_counter() - t0
            endpoint_tokens_per_s(url, prompts[: args.prompts_per_request], args)  # warm-up: first-request costs
            ep, ep_tokens, ep_s = endpoint_tokens_per_s(url, prompts, args)
            log(f"endpoint: {ep_tokens} tokens in {ep_s:.1f} s = {ep:.1f} tokens/s")
        finally:
            stop_server()
    torch.set_num_threads(args.threads)
    hf, hf_tokens, hf_s = transformers_tokens_per_s(model, prompts, args)
    log(f"transformers generate: {hf_tokens} tokens in {hf_s:.1f} s = {hf:.1f} tokens/s")
    return {
        "model": "SmolLM2-135M-Instruct",
        "prompts": len(prompts),
        "samples_per_prompt": args.samples,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "endpoint": {
            "generated_tokens": ep_tokens,
            "seconds": round(ep_s, 2),
            "tokens_per_s": round(ep, 1),
            "prompts_per_request": args.prompts_per_request,
            "concurrency": args.concurrency,
            "server_startup_s": round(startup_s, 1),
        },
        "transformers_generate": {
            "generated_tokens": hf_tokens,
            "seconds": round(hf_s, 2),
            "tokens_per_s": round(hf, 1),
            "batch_size": args.batch_size,
            "threads": args.threads,
        },
        "ratio_endpoint_over_transformers": round(ep / hf, 2),
        "load1": load1(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt (iterate.samples)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--prompts-per-request", type=int, default=16, help="eval.generation.prompts_per_request")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per transformers generate call")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers pass")
    ap.add_argument("--port", type=int, default=18741)
    ap.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    args = ap.parse_args()
    run_bench(lambda work: bench(args, work), prefix="cpo-bench-")


if __name__ == "__main__":
    main()
