"""Generations on held-out prompts through the OpenAI API, scored against the chosen response.

    result = await generate_and_score(client, ["base", "tuned"], pairs, cfg, tokenizer)
    result["models"]["tuned"]["greedy"]["exact_match"]       # also chrf, bleu, the user scorer
    result["comparisons"]["tuned"]["exact_match"]            # vs the baseline: diff + bootstrap CI, McNemar

Each model answers every prompt greedily (and, with generation.samples = n, n times at a temperature in ONE
request, so the engine computes the prompt once), generation.prompts_per_request prompts per completions call,
eval.concurrency calls in flight, stopping at the model's end of turn (its EOS) or eval.stop. References are the
chosen responses decoded without special tokens. Per prompt: the answer(s) and their scores; per model: corpus
and mean scores; per model vs the baseline: paired differences with bootstrap intervals (cpo_ray.eval.stats).
"""

from __future__ import annotations

import asyncio

from cpo_ray.config import EvalConfig
from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS
from cpo_ray.eval import metrics, stats


async def _complete(client, gate, model: str, prompts: list[list[int]], cfg: EvalConfig, n: int, temperature: float,
                    seed: int | None = None):  # fmt: skip
    """Texts of n completions per prompt (prompt-major), and the completion tokens generated."""
    seed = cfg.generation.seed if seed is None else seed
    extra = {"seed": seed} if n > 1 or temperature > 0 else {}
    async with gate:
        resp = await client.completions.create(
            model=model, prompt=prompts, max_tokens=cfg.max_new_tokens, temperature=temperature, n=n,
            stop=cfg.stop or None, extra_body=extra or None,
        )  # fmt: skip
    choices = sorted(resp.choices, key=lambda c: c.index)
    texts = [c.text for c in choices]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))], (
        resp.usage.completion_tokens if resp.usage else 0
    )


async def generate(client, model: str, prompts: list[list[int]], cfg: EvalConfig) -> dict:
    """{"greedy": [text per prompt], "samples": [[n texts] per prompt], "tokens": generated, "seconds": wall}."""
    import time

    gen, gate = cfg.generation, asyncio.Semaphore(cfg.concurrency)
    chunks = [prompts[i : i + gen.prompts_per_request] for i in range(0, len(prompts), gen.prompts_per_request)]
    t0 = time.perf_counter()
    greedy = await asyncio.gather(*(_complete(client, gate, model, c, cfg, 1, 0.0) for c in chunks))
    out = {"greedy": [t[0] for texts, _ in greedy for t in texts], "tokens": sum(n for _, n in greedy)}
    if gen.samples:
        sampled = await asyncio.gather(
            *(_complete(client, gate, model, c, cfg, gen.samples, gen.temperature) for c in chunks)
        )
        out["samples"] = [t for texts, _ in sampled for t in texts]
        out["tokens"] += sum(n for _, n in sampled)
    out["seconds"] = time.perf_counter() - t0
    return out


async def sample(client, model: str, prompts: list[list[int]], cfg: EvalConfig, n: int, temperature: float,
                 seed: int = 0) -> tuple[list[list[str]], int]:  # fmt: skip
    """n answers per prompt at `temperature` (one request per chunk of prompts, n per prompt: each prompt's
    KV cache computed once for its n samples), and the tokens generated."""
    gate = asyncio.Semaphore(cfg.concurrency)
    step = cfg.generation.prompts_per_request
    chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]
    done = await asyncio.gather(*(_complete(client, gate, model, c, cfg, n, temperature, seed + k)
                                  for k, c in enumerate(chunks)))  # fmt: skip
    return [t for texts, _ in done for t in texts], sum(tokens for _, tokens in done)


def score_rows(prompts: list[str], refs: list[str], outputs: dict, cfg: EvalConfig) -> list[dict]:
    """Per prompt: the greedy answer and its scores (and the samples' mean / best-of-n exact match)."""
    user = metrics.load_scorer(cfg.generation.scorer) if cfg.generation.scorer else None
    rows = []
    for i, (prompt, ref, answer) in enumerate(zip(prompts, refs, outputs["greedy"], strict=True)):
        row = {"index": i, "response": answer, "reference": ref, "exact_match": metrics.exact_match(answer, ref),
               "chrf": metrics.sentence_chrf(answer, ref)}  # fmt: skip
        if user:
            row["user"] = float(user(prompt, answer, ref))
        if "samples" in outputs:
            em = [metrics.exact_match(s, ref) for s in outputs["samples"][i]]
            row |= {"samples": outputs["samples"][i], "sample_exact_match": sum(em) / len(em), "best_of_n": max(em)}
        rows.append(row)
    return rows


def summarize(rows: list[dict], cfg: EvalConfig) -> dict:
    """One model's scores over the prompts: corpus metrics of the greedy answers, means of the rest."""
    corpus = metrics.corpus_scores([r["response"] for r in rows], [r["reference"] for r in rows])
    greedy = {k: corpus[k] for k in cfg.generation.metrics}
    greedy["chrf_mean"] = sum(r["chrf"] for r in rows) / max(len(rows), 1)  # per sentence, what the CIs compare
    if rows and "user" in rows[0]:
        greedy["user"] = sum(r["user"] for r in rows) / len(rows)
    out = {"n": len(rows), "greedy": greedy}
    if rows and "samples" in rows[0]:
        out["samples"] = {
            "n": len(rows[0]["samples"]),
            "temperature": cfg.generation.temperature,
            "exact_match": sum(r["sample_exact_match"] for r in rows) / len(rows),
            "best_of_n_exact_match": sum(r["best_of_n"] for r in rows) / len(rows),
        }
    return out


def compare(base: list[dict], rows: list[dict]) -> dict:
    """A model's per-prompt scores against the baseline's: exact match (McNemar + bootstrap CI of the
    difference), sentence chrF and the user score (bootstrap CI of the mean difference)."""
    a = [r["exact_match"] == 1.0 for r in base]
    b = [r["exact_match"] == 1.0 for r in rows]
    only_base, only_model = (
        sum(x and not y for x, y in zip(a, b, strict=True)),
        sum(y and not x for x, y in zip(a, b, strict=True)),
    )
    out = {
        "exact_match": stats.paired_mean_diff([float(x) for x in a], [float(y) for y in b])
        | {"only_baseline": only_base, "only_model": only_model, "mcnemar_p": stats.mcnemar_exact(only_base, only_model)},
        "chrf": stats.paired_mean_diff([r["chrf"] for r in base], [r["chrf"] for r in rows]),
    }  # fmt: skip
    if rows and "user" in rows[0]:
        out["user"] = stats.paired_mean_diff([r["user"] for r in base], [r["user"] for r in rows])
    return out


async def generate_and_score(client, model_ids: list[str], pairs: list[dict], cfg: EvalConfig, tokenizer) -> dict:
    """Every model's generations on the first generation.prompts held-out prompts, scored; the first model is
    the baseline of the comparisons (and of the judge, when one is configured)."""
    from cpo_ray.eval.judge import judge_against_baseline

    chosen = pairs[: cfg.generation.prompts] if cfg.generation.prompts else pairs
    prompt_ids = [list(p[PROMPT_IDS]) for p in chosen]
    prompts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    refs = [tokenizer.decode(p[CHOSEN_IDS], skip_special_tokens=True).strip() for p in chosen]
    outputs = dict(zip(model_ids, await asyncio.gather(*(generate(client, m, prompt_ids, cfg) for m in model_ids)),
                       strict=True))  # fmt: skip
    rows = {m: score_rows(prompts, refs, outputs[m], cfg) for m in model_ids}
    result = {
        "n_prompts": len(chosen),
        "models": {m: summarize(rows[m], cfg) | _speed(outputs[m]) for m in model_ids},
        "comparisons": {m: compare(rows[model_ids[0]], rows[m]) for m in model_ids[1:]},
    }
    if cfg.judge is not None and len(model_ids) > 1:
        bare = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
        result["judge"] = await judge_against_baseline(cfg.judge, bare, rows, model_ids)
    return result | {"rows": rows, "prompts": prompts}


def _speed(out: dict) -> dict:
    return {"generated_tokens": out["tokens"], "generation_s": round(out["seconds"], 2),
            "generated_tokens_per_s": out["tokens"] / max(out["seconds"], 1e-9)}  # fmt: skip
