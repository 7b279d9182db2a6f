"""A pairwise LLM judge through any OpenAI-compatible endpoint: each model against the baseline, per prompt.

    result = await judge_against_baseline(cfg.eval.judge, prompts, rows_by_model, ["base", "tuned"])
    result["tuned"]["win_rate"], result["tuned"]["ci95"], result["tuned"]["sign_test_p"]

Every prompt is judged twice, the answers swapped (A = model, B = baseline, then A = baseline, B = model), so a
judge's preference for a position cancels: a prompt is a win when the model wins both orders or wins one and
ties the other, a loss symmetrically, a tie otherwise (a verdict that is neither A, B nor tie counts as a tie, and
is counted). The prompt comes from judge.template ({prompt}, {response_a}, {response_b}; the shipped
judge_prompt.txt by default); the key from the environment variable judge.api_key_env.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cpo_ray.config import JudgeConfig
from cpo_ray.eval import stats

TEMPLATE = Path(__file__).with_name("judge_prompt.txt")
VERDICTS = {"a": "A", "b": "B", "tie": "tie"}


def parse_verdict(text: str) -> str | None:
    """A, B or tie from the judge's reply (its first word, case and punctuation ignored); None otherwise."""
    words = text.strip().split()
    return VERDICTS.get(words[0].strip(".,:;!*\"'()[]").lower()) if words else None


def combine(first: str | None, second: str | None) -> float:
    """Per-prompt outcome for the model: `first` judged with the model as A, `second` with the model as B.
    1 = win, 0 = loss, 0.5 = tie."""
    score = {"A": 1, "B": -1}.get(first, 0) + {"B": 1, "A": -1}.get(second, 0)
    return 1.0 if score > 0 else 0.0 if score < 0 else 0.5


def load_template(cfg: JudgeConfig) -> str:
    text = Path(cfg.template).read_text() if cfg.template else TEMPLATE.read_text()
    missing = [k for k in ("{prompt}", "{response_a}", "{response_b}") if k not in text]
    if missing:
        raise ValueError(f"judge template {cfg.template or TEMPLATE}: missing placeholder(s) {missing}")
    return text


async def _verdict(client, gate, cfg: JudgeConfig, template: str, prompt: str, a: str, b: str) -> str | None:
    async with gate:
        resp = await client.chat.completions.create(
            model=cfg.model,
            messages=[{"role": "user", "content": template.format(prompt=prompt, response_a=a, response_b=b)}],
            max_tokens=cfg.max_tokens,
            temperature=0.0,
        )
    return parse_verdict(resp.choices[0].message.content or "")


async def judge_against_baseline(
    cfg: JudgeConfig, prompts: list[str], rows: dict[str, list[dict]], model_ids: list[str]
) -> dict:
    """{model: win rate vs the baseline (model_ids[0]) with CI, sign test, counts and per-prompt verdicts}."""
    from openai import AsyncOpenAI

    template = load_template(cfg)
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    client = AsyncOpenAI(base_url=cfg.base_url, api_key=key or "none", max_retries=4)
    gate = asyncio.Semaphore(cfg.concurrency)
    n = len(prompts) if cfg.prompts is None else min(cfg.prompts, len(prompts))
    base = rows[model_ids[0]]
    out = {}
    async with client:
        for model in model_ids[1:]:
            mine = rows[model]
            calls = [
                _verdict(client, gate, cfg, template, prompts[i], x, y)
                for i in range(n)
                for x, y in ((mine[i]["response"], base[i]["response"]), (base[i]["response"], mine[i]["response"]))
            ]
            verdicts = await asyncio.gather(*calls)
            pairs = [(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(n)]
            outcomes = [combine(a, b) for a, b in pairs]
            picks_a = sum(v == "A" for v in verdicts) / max(sum(v in ("A", "B") for v in verdicts), 1)
            out[model] = stats.win_rate(outcomes) | {
                "judge": cfg.model,
                "prompts": n,
                "invalid_verdicts": sum(v is None for v in verdicts),
                "share_of_decisive_verdicts_for_position_a": picks_a,  # 0.5 = no position bias
                "verdicts": [{"model_first": a, "model_second": b, "outcome": o} for (a, b), o in zip(pairs, outcomes, strict=True)],
            }  # fmt: skip
    return out
