"""Score held-out preference pairs through any OpenAI-compatible endpoint (Ray Serve LLM, vLLM, ...).

    pairs = load_tokenized_pairs("runs/tiny/data/eval", max_pairs=500)
    result = evaluate_models("http://127.0.0.1:8000/v1", ["base", "tuned"], pairs, cfg.eval, "runs/tiny/eval")

Each response is scored by the sum of its tokens' log-probs given the prompt: one /v1/completions call per
cfg.pairs_per_request pairs sends each prompt+chosen and prompt+rejected as a token-id list with
`prompt_logprobs=0` (vLLM), falling back to `echo=True, logprobs=0`; cfg.concurrency calls in flight, each
retried by the openai client (cfg.retries: connection errors, 408/409/429, 5xx; exponential backoff that
honours Retry-After). Writes eval.json, eval.md, pairs_<model>.jsonl, margins.png and (with
generate_samples) samples.md into out_dir (cpo_ray.eval.render); paired statistics in cpo_ray.eval.stats.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

from cpo_ray.config import EvalConfig
from cpo_ray.contract import (
    API_KEY_ENV,
    CHOSEN_IDS,
    EVAL_JSON,
    PROMPT_IDS,
    REJECTED_IDS,
    generations_file,
    pairs_file,
    read_pairs,
)
from cpo_ray.storage import Location


class LogprobsUnavailable(RuntimeError):
    """The server answered but returned no prompt log-probs, so responses cannot be scored."""


def load_tokenized_pairs(path, max_pairs: int | None = None) -> list[dict]:
    """Rows {prompt_ids, chosen_ids, rejected_ids} (int lists) from one .parquet or a folder of them, on local
    disk or in storage (cpo_ray.contract.read_pairs)."""
    return read_pairs(path, max_pairs)


def sum_prompt_logprobs(prompt_logprobs: list, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start, from vLLM's prompt_logprobs.

    prompt_logprobs[i] maps token id (a string key once JSON-decoded) -> {"logprob": ...} and always
    holds the REAL token ids[i] besides any top-k; entry 0 is None (nothing predicts the first token).
    """
    if len(prompt_logprobs) != len(ids):
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} positions for {len(ids)} tokens")
    total = 0.0
    for i in range(start, len(ids)):
        entry = prompt_logprobs[i] or {}
        hit = entry.get(str(ids[i]), entry.get(ids[i]))
        if hit is None:
            raise ValueError(f"prompt_logprobs[{i}] lacks the real token {ids[i]}")
        total += hit["logprob"] if isinstance(hit, dict) else hit
    return total


def sum_echo_logprobs(token_logprobs: list, n_tokens: int, start: int) -> float:
    """The same sum from echo=True/logprobs token_logprobs (aligned with the prompt, first None)."""
    if len(token_logprobs) < n_tokens or any(x is None for x in token_logprobs[start:n_tokens]):
        raise ValueError(f"echo returned {len(token_logprobs)} log-probs for {n_tokens} prompt tokens")
    return float(sum(token_logprobs[start:n_tokens]))


def pair_row(index: int, pair: dict, logp_chosen: float, logp_rejected: float | list[float]) -> dict:
    """One held-out prompt's scores. With K rejected responses, `logp_rejected` / `len_rejected` / `margin` are
    the hardest one's (the most likely), `correct` means the chosen beats all K, `pairs_won` counts how many."""
    scores = logp_rejected if isinstance(logp_rejected, list) else [logp_rejected]
    rejected = pair[REJECTED_IDS] if scores is logp_rejected else [pair[REJECTED_IDS]]
    n_c, n_r = len(pair[CHOSEN_IDS]), [len(r) for r in rejected]
    hardest = max(range(len(scores)), key=lambda k: scores[k])
    mean_c, mean_r = logp_chosen / n_c, [s / n for s, n in zip(scores, n_r, strict=True)]
    margin = logp_chosen - scores[hardest]
    return {
        "index": index,
        "logp_chosen": logp_chosen,
        "logp_rejected": scores[hardest],
        "len_chosen": n_c,
        "len_rejected": n_r[hardest],
        "mean_logp_chosen": mean_c,
        "mean_logp_rejected": max(mean_r),
        "margin": margin,
        "correct": margin > 0,
        "correct_norm": mean_c > max(mean_r),
        "logp_rejected_all": scores,
        "pairs_won": sum(logp_chosen > s for s in scores),
    }


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {
            "n": 0,
            "accuracy": None,
            "accuracy_length_normalised": None,
            "mean_margin": None,
            "median_margin": None,
        }
    margins = [r["margin"] for r in rows]
    pairs = sum(len(r.get("logp_rejected_all", [0])) for r in rows)
    return {
        "n": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "pair_accuracy": sum(r.get("pairs_won", r["correct"]) for r in rows) / pairs,
        "rejected_per_prompt": pairs / len(rows),
        "accuracy_length_normalised": sum(r["correct_norm"] for r in rows) / len(rows),
        "mean_margin": statistics.fmean(margins),
        "median_margin": statistics.median(margins),
    }


def make_client(endpoint: str, api_key: str | None, cfg: EvalConfig, http_client=None):
    """AsyncOpenAI for the endpoint; the client retries transient failures itself (cfg.retries)."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        base_url=endpoint,
        api_key=api_key or "none",
        timeout=cfg.timeout_s,
        max_retries=cfg.retries,
        http_client=http_client,
    )


class EndpointScorer:
    """Scores pairs for one model; mode is probed once: "prompt_logprobs" (vLLM) or "echo"."""

    def __init__(self, client, model: str, cfg: EvalConfig):
        self.client, self.model, self.cfg = client, model, cfg
        self.gate = asyncio.Semaphore(cfg.concurrency)
        self.mode: str | None = None

    async def _request(self, prompts: list[list[int]], mode: str):
        if mode == "prompt_logprobs":
            kw = {"max_tokens": 1, "extra_body": {"prompt_logprobs": 0}}
        else:
            kw = {"max_tokens": 0, "echo": True, "logprobs": 0}
        async with self.gate:
            resp = await self.client.completions.create(model=self.model, prompt=prompts, temperature=0.0, **kw)
        return sorted(resp.model_dump()["choices"], key=lambda c: c["index"])

    def _sums(self, choices: list[dict], seqs: list[list[int]], starts: list[int], mode: str) -> list[float] | None:
        out = []
        for choice, ids, start in zip(choices, seqs, starts, strict=True):
            if mode == "prompt_logprobs" and choice.get("prompt_logprobs"):
                out.append(sum_prompt_logprobs(choice["prompt_logprobs"], ids, start))
            elif mode == "echo" and (choice.get("logprobs") or {}).get("token_logprobs"):
                out.append(sum_echo_logprobs(choice["logprobs"]["token_logprobs"], len(ids), start))
            else:
                return None
        return out

    async def _probe(self, seqs: list[list[int]], starts: list[int]) -> list[float]:
        import openai

        said = []
        for mode in ("prompt_logprobs", "echo"):
            try:
                sums = self._sums(await self._request(seqs, mode), seqs, starts, mode)
            except openai.BadRequestError as e:
                said.append(f"{mode}: {e.message}")  # this server may reject the parameter: try the other way
                continue
            if sums is not None:
                self.mode = mode
                return sums
        raise LogprobsUnavailable(
            f"{self.model}: the server cannot return prompt log-probs (neither prompt_logprobs nor echo+logprobs), "
            "so responses cannot be scored; use a vLLM-based endpoint such as `cpo-ray serve`"
            + (f". Server said: {'; '.join(said)}" if said else "")
        )

    async def score(self, pairs: list[dict]) -> list[tuple[float, list[float]]]:
        """(logp chosen, [logp rejected, ...]) per prompt, all in ONE request (1 + K sequences per prompt)."""
        import openai

        seqs, starts = [], []
        for pair in pairs:
            prompt = list(pair[PROMPT_IDS])
            seqs += [prompt + list(r) for r in (pair[CHOSEN_IDS], *pair[REJECTED_IDS])]
            starts += [len(prompt)] * (1 + len(pair[REJECTED_IDS]))
        if self.mode is None:
            sums = await self._probe(seqs, starts)
        else:
            try:
                sums = self._sums(await self._request(seqs, self.mode), seqs, starts, self.mode)
            except openai.BadRequestError as e:  # e.g. a pair longer than the server's max_model_len
                longest = max(map(len, seqs))
                raise ValueError(
                    f"{self.model}: server rejected a request (longest {longest} tokens): {e.message}"
                ) from e
            if sums is None:
                raise LogprobsUnavailable(f"{self.model}: a response came back without log-probs")
        out, at = [], 0
        for pair in pairs:
            k = len(pair[REJECTED_IDS])
            out.append((sums[at], sums[at + 1 : at + 1 + k]))
            at += 1 + k
        return out


async def _score_model(client, model, pairs, cfg: EvalConfig, per_request: int) -> tuple[list[dict], str]:
    scorer = EndpointScorer(client, model, cfg)
    chunks = [pairs[i : i + per_request] for i in range(0, len(pairs), per_request)]
    first = await scorer.score(chunks[0])  # probes the scoring mode once, before fanning out
    rest = await asyncio.gather(*(scorer.score(c) for c in chunks[1:]))
    sums = [s for chunk in [first, *rest] for s in chunk]
    return [pair_row(i, p, *s) for i, (p, s) in enumerate(zip(pairs, sums, strict=True))], scorer.mode


async def _generate(client, model: str, prompt_ids: list[int], cfg: EvalConfig) -> str:
    """Greedy continuation; stops at the model's end-of-turn token, or at cfg.stop (e.g. "\n\nHuman:")."""
    out = await client.completions.create(
        model=model, prompt=list(prompt_ids), max_tokens=cfg.max_new_tokens, temperature=0.0, stop=cfg.stop or None
    )
    return out.choices[0].text


async def _run(endpoint, model_ids, pairs, cfg: EvalConfig, api_key, tokenizer) -> dict:
    client = make_client(endpoint, api_key, cfg)
    result = {"endpoint": endpoint, "baseline": model_ids[0], "n_pairs": len(pairs), "models": {}, "rows": {}}

    async def score(model: str) -> None:
        t0 = time.perf_counter()
        rows, mode = await _score_model(client, model, pairs, cfg, cfg.pairs_per_request)
        elapsed = time.perf_counter() - t0
        summary = summarize(rows) | {"elapsed_s": elapsed, "pairs_per_s": len(rows) / elapsed, "scoring": mode}
        result["models"][model], result["rows"][model] = summary, rows

    async with client:
        # All models at once: each served model has its own engine (on CPU its own cores, cpo_ray.serve).
        t0 = time.perf_counter()
        await asyncio.gather(*(score(m) for m in model_ids))
        result["scoring_s"] = time.perf_counter() - t0
        result["models"] = {m: result["models"][m] for m in model_ids}  # baseline first
        if cfg.generation.enabled and tokenizer is not None:  # references are decoded chosen responses
            from cpo_ray.eval.generate import generate_and_score

            result["generation"] = await generate_and_score(client, model_ids, pairs, cfg, tokenizer)
        result["samples"] = await _samples(client, model_ids, pairs, cfg, tokenizer, result.get("generation"))
    return result


async def _samples(client, model_ids, pairs, cfg: EvalConfig, tokenizer, generation: dict | None) -> list[dict]:
    """The first generate_samples prompts side by side for the report: taken from the scored generations
    when there are some (no second request), else generated here."""
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)) if tokenizer else str
    samples = []
    for i, pair in enumerate(pairs[: cfg.generate_samples]):
        if generation and i < generation["n_prompts"]:
            texts = [generation["rows"][m][i]["response"] for m in model_ids]
        else:
            texts = await asyncio.gather(*(_generate(client, m, pair[PROMPT_IDS], cfg) for m in model_ids))
        sample = {"prompt": decode(pair[PROMPT_IDS]), "chosen": decode(pair[CHOSEN_IDS])}
        samples.append(sample | {"outputs": dict(zip(model_ids, texts, strict=True))})
    return samples


def evaluate_models(
    endpoint: str,
    model_ids: list[str],
    pairs: list[dict],
    cfg: EvalConfig,
    out_dir,
    api_key: str | None = None,
    tokenizer_path: str | None = None,
) -> dict:
    """Score every pair with every model (first = baseline), write the report files, return eval.json's dict."""
    from cpo_ray.eval import render
    from cpo_ray.eval.stats import compare

    if not model_ids or not pairs:
        raise ValueError("evaluate: need at least one model id and one pair")
    tokenizer = None
    if tokenizer_path:
        from cpo_ray.model_source import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)  # a storage URI is copied to this node first
    api_key = api_key or os.environ.get(API_KEY_ENV)
    pairs = pairs[: cfg.max_pairs] if cfg.max_pairs else pairs
    t0 = time.perf_counter()
    result = asyncio.run(_run(endpoint.rstrip("/"), list(model_ids), pairs, cfg, api_key, tokenizer))
    rows = result.pop("rows")
    base = model_ids[0]
    result["comparisons"] = {m: compare(rows[base], rows[m]) for m in model_ids[1:]}
    result |= {
        "pairs_per_request": cfg.pairs_per_request,
        "elapsed_s": time.perf_counter() - t0,
        "pairs_per_s": len(pairs) * len(rows) / result["scoring_s"],  # all models, scored concurrently
    }
    out = Location(out_dir)  # a local folder or the run's object storage
    out.mkdir()
    for model, model_rows in rows.items():
        (out / pairs_file(model)).write_text("".join(json.dumps(r) + "\n" for r in model_rows))
    if "generation" in result:  # per prompt: the answers, their scores, the judge's verdicts
        gen_rows, prompts = result["generation"].pop("rows"), result["generation"].pop("prompts")
        for model, model_rows in gen_rows.items():
            lines = [json.dumps({"prompt": p, **r}) for p, r in zip(prompts, model_rows, strict=True)]
            (out / generations_file(model)).write_text("".join(ln + "\n" for ln in lines))
    (out / EVAL_JSON).write_text(json.dumps(result, indent=2))
    render.write_report(result, rows, out)
    return result
