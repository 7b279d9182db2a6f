"""Fast checks of the evaluator's pure parts: log-prob sums, aggregation, Parquet loading, retries, report."""

import asyncio
import json
import math

import httpx
import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpo_ray.config import EvalConfig
from cpo_ray.contract import pairs_file
from cpo_ray.eval.render import markdown_table, write_report
from cpo_ray.eval.scorer import (
    EndpointScorer,
    LogprobsUnavailable,
    load_tokenized_pairs,
    make_client,
    pair_row,
    sum_echo_logprobs,
    sum_prompt_logprobs,
    summarize,
)

# Shape of a real vLLM /v1/completions choice (JSON-decoded: token ids are string keys).
PROMPT_LOGPROBS = [
    None,
    {"50": {"logprob": -5.41, "rank": 60, "decoded_token": "P"}},
    {"60": {"logprob": -5.47, "rank": 78}, "7": {"logprob": -0.1, "rank": 1}},  # top-1 besides the real token
    {"70": {"logprob": -5.70, "rank": 179}},
    {"2": {"logprob": -5.59, "rank": 131}},
]
IDS = [1, 50, 60, 70, 2]


def test_sum_prompt_logprobs_takes_the_real_token_over_response_positions():
    # prompt = [1, 50], response = [60, 70, 2]: the top-1 token 7 at position 2 must be ignored.
    assert sum_prompt_logprobs(PROMPT_LOGPROBS, IDS, start=2) == pytest.approx(-5.47 - 5.70 - 5.59)
    assert sum_prompt_logprobs(PROMPT_LOGPROBS, IDS, start=1) == pytest.approx(-5.41 - 5.47 - 5.70 - 5.59)
    int_keys = [None] + [{int(k): v for k, v in e.items()} for e in PROMPT_LOGPROBS[1:]]
    assert sum_prompt_logprobs(int_keys, IDS, start=2) == pytest.approx(-16.76)


def test_sum_prompt_logprobs_rejects_misaligned_or_missing_tokens():
    with pytest.raises(ValueError, match="positions"):
        sum_prompt_logprobs(PROMPT_LOGPROBS, IDS + [5], start=2)
    with pytest.raises(ValueError, match="real token 61"):
        sum_prompt_logprobs(PROMPT_LOGPROBS, [1, 50, 61, 70, 2], start=2)


def test_sum_echo_logprobs():
    token_logprobs = [None, -5.41, -5.47, -5.70, -5.59]
    assert sum_echo_logprobs(token_logprobs, n_tokens=5, start=2) == pytest.approx(-16.76)
    # echo with max_tokens=1 appends the generated token's log-prob: it must not be counted
    assert sum_echo_logprobs(token_logprobs + [-0.3], n_tokens=5, start=2) == pytest.approx(-16.76)
    with pytest.raises(ValueError):
        sum_echo_logprobs(token_logprobs[:3], n_tokens=5, start=2)


def test_pair_row_and_summary():
    pair = {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5, 6], "rejected_ids": [7, 8]}
    # Longer chosen with the larger total loss: wrong by sum, right per token.
    row = pair_row(0, pair, logp_chosen=-4.0, logp_rejected=-3.0)
    assert row["margin"] == -1.0 and row["correct"] is False
    assert row["mean_logp_chosen"] == -1.0 and row["mean_logp_rejected"] == -1.5 and row["correct_norm"] is True
    rows = [row, pair_row(1, pair, -1.0, -5.0), pair_row(2, pair, -2.0, -2.5)]
    s = summarize(rows)
    assert s["n"] == 3
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["accuracy_length_normalised"] == pytest.approx(1.0)
    assert s["mean_margin"] == pytest.approx((-1.0 + 4.0 + 0.5) / 3)
    assert s["median_margin"] == pytest.approx(0.5)
    assert summarize([])["accuracy"] is None


def test_pair_row_with_several_rejected_responses():
    """K = 2: margin and correctness against the hardest (most likely) rejected response; pairs won counted."""
    pair = {"prompt_ids": [1], "chosen_ids": [3, 2], "rejected_ids": [[4, 2], [5, 6, 7, 2]]}
    row = pair_row(0, pair, -3.0, [-4.0, -2.0])
    assert row["logp_rejected"] == -2.0 and row["len_rejected"] == 4 and row["margin"] == -1.0
    assert row["correct"] is False and row["pairs_won"] == 1 and row["logp_rejected_all"] == [-4.0, -2.0]
    assert row["correct_norm"] is False  # -1.5 per token vs the better -0.5 of the 4-token one
    s = summarize([row, pair_row(1, pair, -1.0, [-4.0, -2.0])])
    assert s["accuracy"] == 0.5 and s["pair_accuracy"] == 0.75 and s["rejected_per_prompt"] == 2.0


def _write(path, rows, extra=False):
    kind = {"rejected_ids": pa.list_(pa.list_(pa.int32()))}  # K rejected responses per prompt
    cols = {c: pa.array([r[c] for r in rows], type=kind.get(c, pa.list_(pa.int32()))) for c in rows[0]}
    if extra:
        cols["truncated"] = pa.array([False] * len(rows))
    pq.write_table(pa.table(cols), path)


def test_load_tokenized_pairs_dir_file_and_errors(tmp_path):
    rows = [{"prompt_ids": [1, i], "chosen_ids": [i, 2], "rejected_ids": [[i + 1, 2]]} for i in range(5)]
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "part-000.parquet", rows[:3], extra=True)
    _write(tmp_path / "d" / "part-001.parquet", rows[3:])
    assert load_tokenized_pairs(tmp_path / "d") == rows  # sorted files, extra columns dropped
    assert load_tokenized_pairs(tmp_path / "d", max_pairs=4) == rows[:4]
    assert load_tokenized_pairs(tmp_path / "d" / "part-001.parquet") == rows[3:]
    _write(tmp_path / "bad.parquet", [{"prompt_ids": [1], "chosen_ids": [2]}])
    with pytest.raises(ValueError, match="rejected_ids"):
        load_tokenized_pairs(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        load_tokenized_pairs(tmp_path / "empty-dir-that-does-not-exist")


def _status_error(code: int) -> openai.APIStatusError:
    req = httpx.Request("POST", "http://x/v1/completions")
    return openai.APIStatusError("boom", response=httpx.Response(code, request=req), body=None)


def test_client_retries_transient_errors_only():
    """The openai client does the retrying: 503/429 and dropped connections are retried (Retry-After
    honoured), a 400 is not."""
    seen = []
    ok = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [], "usage": None}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        fast = {"retry-after-ms": "1"}
        if len(seen) == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers=fast)
        if len(seen) == 2:
            return httpx.Response(429, json={"error": {"message": "slow down"}}, headers=fast)
        if len(seen) == 3:
            raise httpx.ConnectError("dropped", request=request)
        if len(seen) == 4:
            return httpx.Response(200, json=ok)
        return httpx.Response(400, json={"error": {"message": "bad"}})

    async def run(retries):
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = make_client("http://x/v1", None, EvalConfig(retries=retries, timeout_s=5), http_client=http)
        async with client:
            return await client.completions.create(model="m", prompt=[1, 2], max_tokens=1)

    assert asyncio.run(run(retries=4)).id == "c" and len(seen) == 4
    with pytest.raises(openai.BadRequestError):
        asyncio.run(run(retries=4))
    assert len(seen) == 5  # a 400 is final
    seen.clear()
    with pytest.raises(openai.InternalServerError):
        asyncio.run(run(retries=0))
    assert len(seen) == 1


class _Resp:
    def __init__(self, choices):
        self.choices = choices

    def model_dump(self):
        return {"choices": self.choices}


class _FakeCompletions:
    """Answers like a server that ignores prompt_logprobs but supports echo (OpenAI-style)."""

    def __init__(self, echo_supported: bool, reject_unknown: bool = False):
        self.echo_supported, self.reject_unknown = echo_supported, reject_unknown
        self.calls = []

    async def create(self, *, model, prompt, **kw):
        self.calls.append(kw)
        if self.reject_unknown and "extra_body" in kw:  # a strict server: 400 on unknown parameters
            raise openai.BadRequestError(
                "unknown field prompt_logprobs", response=_status_error(400).response, body=None
            )
        choices = []
        for i, ids in enumerate(prompt):
            lp = (
                {"token_logprobs": [None] + [-0.5] * (len(ids) - 1)} if kw.get("echo") and self.echo_supported else None
            )
            choices.append({"index": i, "text": "", "logprobs": lp})
        return _Resp(choices[::-1])  # out of order on purpose: the scorer sorts by index


class _FakeClient:
    def __init__(self, echo_supported, reject_unknown=False):
        self.completions = _FakeCompletions(echo_supported, reject_unknown)


def test_scorer_falls_back_to_echo_then_keeps_that_mode():
    client = _FakeClient(echo_supported=True)
    scorer = EndpointScorer(client, "m", EvalConfig(concurrency=2))
    pair = {"prompt_ids": [1, 5], "chosen_ids": [6, 7, 2], "rejected_ids": [[8, 2]]}
    pair2 = {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [[2]]}
    assert asyncio.run(scorer.score([pair])) == [(-1.5, [-1.0])]
    assert scorer.mode == "echo"
    assert client.completions.calls[0]["extra_body"] == {"prompt_logprobs": 0}
    assert client.completions.calls[1]["echo"] is True and client.completions.calls[1]["max_tokens"] == 0
    # several pairs in one request, each with its own prompt length; choices come back reordered
    assert asyncio.run(scorer.score([pair, pair2])) == [(-1.5, [-1.0]), (-1.0, [-0.5])]
    assert len(client.completions.calls) == 3  # no second probe
    # K = 2 rejected responses: 3 sequences for that prompt, both rejected scores back in order
    three = {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [[2], [9, 9, 2]]}
    assert asyncio.run(scorer.score([three, pair2])) == [(-1.0, [-0.5, -1.5]), (-1.0, [-0.5])]


@pytest.mark.parametrize("reject_unknown", [False, True])
def test_scorer_falls_back_when_prompt_logprobs_is_ignored_or_rejected(reject_unknown):
    scorer = EndpointScorer(_FakeClient(True, reject_unknown), "m", EvalConfig())
    assert asyncio.run(scorer.score([{"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [[2]]}])) == [
        (-1.0, [-0.5])
    ]
    assert scorer.mode == "echo"


def test_scorer_without_logprobs_says_so():
    scorer = EndpointScorer(_FakeClient(echo_supported=False, reject_unknown=True), "m", EvalConfig())
    pair = {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [[8, 2]]}
    with pytest.raises(LogprobsUnavailable, match="cannot return prompt log-probs.*unknown field"):
        asyncio.run(scorer.score([pair]))


def test_report_files(tmp_path):
    pair = {"prompt_ids": [1], "chosen_ids": [3, 2], "rejected_ids": [4, 2]}
    rows = {
        "base": [pair_row(i, pair, -2.0 - i % 3, -2.5) for i in range(10)],
        "org/tuned:v1": [pair_row(i, pair, -1.0, -3.0 - i) for i in range(10)],
    }
    result = {
        "endpoint": "http://127.0.0.1:1/v1",
        "n_pairs": 10,
        "models": {m: summarize(r) | {"pairs_per_s": 12.5} for m, r in rows.items()},
        "samples": [
            {"prompt": "Write 5 in words:\n", "chosen": "five", "outputs": {"base": "fiv", "org/tuned:v1": "five"}}
        ],
    }
    write_report(result, rows, tmp_path)
    table = markdown_table(result)
    assert table.splitlines()[0] == "| metric | base | org/tuned:v1 |"
    assert "| accuracy (logp chosen > rejected) | 40.0% | 100.0% |" in table
    assert (tmp_path / "margins.png").stat().st_size > 1000
    assert "five" in (tmp_path / "samples.md").read_text()
    assert table in (tmp_path / "eval.md").read_text()
    assert pairs_file("org/tuned:v1") == "pairs_org_tuned_v1.jsonl"
    assert json.loads(json.dumps(result))  # eval.json content is JSON-serialisable
    assert not math.isnan(result["models"]["base"]["mean_margin"])


def test_paired_comparison_mcnemar_and_bootstrap():
    """McNemar's exact test on discordant pairs, worked by hand: the tuned model wins 9 pairs the base lost
    and loses 1 the base won; p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11/1024 = 0.021484375."""
    from cpo_ray.eval.stats import compare

    base = [{"correct": c} for c in [True] * 5 + [False] * 9 + [True] + [True] * 5]
    tuned = [{"correct": c} for c in [True] * 5 + [True] * 9 + [False] + [True] * 5]
    out = compare(base, tuned)
    assert (out["only_model_correct"], out["only_baseline_correct"]) == (9, 1)
    assert out["mcnemar_p"] == pytest.approx(2 * 11 / 1024)
    assert out["accuracy_diff"] == pytest.approx(8 / 20)
    lo, hi = out["diff_ci95"]
    assert 0 < lo < 0.4 < hi < 0.8
    same = compare(base, base)
    assert same["mcnemar_p"] == 1.0 and same["diff_ci95"] == [0.0, 0.0]
