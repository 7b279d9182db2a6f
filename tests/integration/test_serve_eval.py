"""Ray Serve LLM end to end on CPU: two served ids, OpenAI client calls, auth, errors, and endpoint scores
equal to a plain transformers forward. One app start (~2-3 min on 2 cores) shared by the module.

    .venv/bin/pytest -m integration tests/integration/test_serve_eval.py -s     # -s prints start-up time and RSS
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch is imported: no dynamo probes on CPU

import contextlib
import json
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from cpo_ray.config import EvalConfig, ServeConfig

KEY = "test-key-123"
MAX_LEN = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss_gb() -> float:
    """RSS of this process and all its descendants (GCS, raylet, replicas, vLLM engine processes)."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a process may exit while we walk the tree
            total += p.memory_info().rss
    return total / 2**30


@pytest.fixture(scope="module")
def server():
    import ray

    from cpo_ray.embedded import build_embedded_model
    from cpo_ray.serve.app import start_server, stop_server

    work = Path(tempfile.mkdtemp(prefix="cpo-serve-"))  # short: Ray's socket paths live under it
    # 2 logical CPUs like this host: the app must schedule there (0-CPU ingress, fractional engines).
    model = str(build_embedded_model(work / "model"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(work / "ray"), log_to_driver=False)
    cfg = ServeConfig(
        port=_free_port(), api_key=KEY, device="cpu", max_model_len=MAX_LEN, kv_cache_memory_bytes=32 * 2**20,
        max_num_seqs=16, ready_timeout_s=480,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        url = start_server(cfg, {"base": model, "tuned": model}, detached=False, cache_dir=str(work / "cache"))
        stats = {"startup_s": round(time.monotonic() - t0, 1), "rss_gb_ready": round(_tree_rss_gb(), 2)}
        yield {"url": url, "model": model, "work": work, "stats": stats}
        stats["rss_gb_end"] = round(_tree_rss_gb(), 2)
        print(f"\nserve integration: {json.dumps(stats)}")
        # Kept for the record (runs/ is git-ignored): start-up, memory, load-test latencies.
        results = ROOT / "runs" / "test-results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "serve.json").write_text(json.dumps(stats, indent=2))
    finally:
        stop_server()  # serve.shutdown() on the cluster this module started
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _client(server, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key=key, max_retries=0, timeout=120)


def test_lists_both_models_and_answers(server):
    c = _client(server)
    assert {m.id for m in c.models.list().data} == {"base", "tuned"}
    comp = c.completions.create(model="base", prompt="Write 12 in words:\n", max_tokens=4, temperature=0)
    assert comp.choices[0].finish_reason in ("length", "stop") and comp.usage.completion_tokens >= 1
    chat = c.chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": "Write 7 in words"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1


def _pairs(tokenizer, n):
    from cpo_ray.data.synthetic import make_pairs
    from cpo_ray.data.tokenize import Special, tokenize_batch

    raw = make_pairs(n, held_out=True, max_number=999_999, eval_fraction=0.1, seed=0)
    rows, errors = tokenize_batch(
        tokenizer, Special.of(tokenizer), [r["prompt"] for r in raw], [r["chosen"] for r in raw],
        [[r["rejected"]] for r in raw], max_length=MAX_LEN,
    )  # fmt: skip
    assert not any(errors)
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]


def _reference_logps(model_dir, pairs):
    """Sum of response-token log-probs from a plain transformers forward, per (chosen, rejected)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in pairs:
            sums = []
            for resp in (p["chosen_ids"], *p["rejected_ids"]):
                ids = torch.tensor([p["prompt_ids"] + resp])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
                sums.append(logp[len(p["prompt_ids"]) - 1 :].sum().item())
            out.append(tuple(sums))
    return out


def test_endpoint_scores_match_transformers(server, tmp_path):
    from transformers import AutoTokenizer

    from cpo_ray.eval.scorer import evaluate_models

    tok = AutoTokenizer.from_pretrained(server["model"])
    pairs = _pairs(tok, 6)
    cfg = EvalConfig(concurrency=4, generate_samples=1, max_new_tokens=4)
    result = evaluate_models(
        server["url"], ["base", "tuned"], pairs, cfg, tmp_path, api_key=KEY, tokenizer_path=server["model"]
    )
    ref = _reference_logps(server["model"], pairs)
    for model in ("base", "tuned"):
        rows = [json.loads(line) for line in (tmp_path / f"pairs_{model}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(len(pairs)))
        for row, (ref_c, ref_r) in zip(rows, ref, strict=True):
            assert abs(row["logp_chosen"] - ref_c) < 1e-3 and abs(row["logp_rejected"] - ref_r) < 1e-3
        assert result["models"][model]["n"] == 6 and result["models"][model]["scoring"] == "prompt_logprobs"
    for name in ("eval.json", "eval.md", "margins.png", "samples.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert set(result["samples"][0]["outputs"]) == {"base", "tuned"}
    server["stats"]["pairs_per_s"] = round(result["pairs_per_s"], 1)


def test_generations_scored_and_judged_through_the_endpoint(server, tmp_path, monkeypatch):
    """Greedy answers and n samples per prompt scored against the references, and a judge that cpo-ray itself
    serves (a weak one: the plumbing, the order swap and the statistics are what is checked). The two served ids
    are the same weights, so their greedy answers match and, asked in both orders, the judge must call a tie."""
    from transformers import AutoTokenizer

    from cpo_ray.config import GenerationConfig, JudgeConfig
    from cpo_ray.contract import generations_file
    from cpo_ray.eval.judge import combine
    from cpo_ray.eval.scorer import evaluate_models

    monkeypatch.setenv("CPO_TEST_JUDGE_KEY", KEY)  # the judge's key comes from the environment, never the config
    # The user's own template (the shipped one is longer than this byte-level model's 256-token context).
    template = tmp_path / "judge.txt"
    template.write_text("{prompt}\nA: {response_a}\nB: {response_b}\nBetter (A, B or tie):")
    pairs = _pairs(AutoTokenizer.from_pretrained(server["model"]), 6)
    cfg = EvalConfig(
        concurrency=4, generate_samples=2, max_new_tokens=6,
        generation=GenerationConfig(prompts=5, samples=2, temperature=1.0),
        judge=JudgeConfig(base_url=server["url"], model="base", api_key_env="CPO_TEST_JUDGE_KEY", max_tokens=2,
                          template=str(template)),
    )  # fmt: skip
    result = evaluate_models(
        server["url"], ["base", "tuned"], pairs, cfg, tmp_path, api_key=KEY, tokenizer_path=server["model"]
    )
    saved = json.loads((tmp_path / "eval.json").read_text())["generation"]
    assert saved["n_prompts"] == 5 and set(saved["models"]) == {"base", "tuned"}
    for model in ("base", "tuned"):
        m = saved["models"][model]
        assert m["n"] == 5 and 0 <= m["greedy"]["exact_match"] <= 1 and 0 <= m["greedy"]["chrf"] <= 100
        assert m["samples"]["n"] == 2 and m["generated_tokens"] >= 5
        rows = [json.loads(ln) for ln in (tmp_path / generations_file(model)).read_text().splitlines()]
        assert len(rows) == 5 and all(len(r["samples"]) == 2 for r in rows)
    cmp = saved["comparisons"]["tuned"]["exact_match"]
    assert cmp["only_baseline"] + cmp["only_model"] <= 5 and 0 <= cmp["mcnemar_p"] <= 1
    judged = saved["judge"]["tuned"]
    assert judged["prompts"] == 5 and len(judged["verdicts"]) == 5
    assert judged["wins"] + judged["ties"] + judged["losses"] == 5
    outcomes = [combine(v["model_first"], v["model_second"]) for v in judged["verdicts"]]
    assert [v["outcome"] for v in judged["verdicts"]] == outcomes
    assert judged["win_rate"] == pytest.approx(sum(outcomes) / 5)
    base_rows = [json.loads(ln) for ln in (tmp_path / generations_file("base")).read_text().splitlines()]
    tuned_rows = [json.loads(ln) for ln in (tmp_path / generations_file("tuned")).read_text().splitlines()]
    same = [i for i in range(5) if base_rows[i]["response"] == tuned_rows[i]["response"]]
    assert same, "the same weights gave different greedy answers"
    assert all(judged["verdicts"][i]["outcome"] == 0.5 for i in same)  # the swap cancels any position bias
    assert result["generation"]["judge"]["tuned"]["win_rate"] == judged["win_rate"]


def test_bad_requests_are_4xx_and_server_survives(server):
    import openai

    c = _client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model="base", prompt=[5] * (MAX_LEN + 10), max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="base", prompt=[5, 6], max_tokens=1, extra_body={"prompt_logprobs": -7})
    assert c.completions.create(model="tuned", prompt=[1, 70, 71], max_tokens=2).usage.completion_tokens >= 1


def test_api_key_required(server):
    import openai

    for key in ("wrong-key", KEY + "x"):
        with pytest.raises(openai.AuthenticationError):
            _client(server, key).completions.create(model="base", prompt="hi", max_tokens=1)
    with pytest.raises(urllib.error.HTTPError) as err:  # no Authorization header at all
        urllib.request.urlopen(f"{server['url']}/models", timeout=30)
    assert err.value.code == 401
    req = urllib.request.Request(f"{server['url']}/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert {m["id"] for m in json.load(resp)["data"]} == {"base", "tuned"}


def test_malformed_requests_are_4xx(server):
    """Invalid JSON, wrong types and negative max_tokens are client errors; the server keeps serving."""
    import httpx

    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server['url']}/completions"
    bodies = [
        b"{not json",
        json.dumps({"model": "base", "prompt": "hi", "max_tokens": -3}).encode(),
        json.dumps({"model": "base", "prompt": "hi", "max_tokens": "many"}).encode(),
        json.dumps({"model": "base", "prompt": {"a": 1}, "max_tokens": 1}).encode(),
        json.dumps({"model": 7, "prompt": "hi"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
    ]
    with httpx.Client(timeout=60) as c:
        codes = [c.post(url, content=b, headers=h).status_code for b in bodies]
        assert all(400 <= code < 500 for code in codes), codes
        ok = c.post(url, headers=h, json={"model": "base", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_200_concurrent_clients(server):
    """200 concurrent clients on loopback, 3 requests each (600, bounded by a 240 s budget): 0 failures."""
    import asyncio

    import httpx

    h = {"Authorization": f"Bearer {KEY}"}
    url = f"{server['url']}/completions"
    lat: list[float] = []
    errors: list[str] = []

    async def client(i: int, http: httpx.AsyncClient, deadline: float) -> None:
        for j in range(3):
            if time.monotonic() > deadline:
                return
            body = {"model": ("base", "tuned")[(i + j) % 2], "prompt": [1, 40 + i % 50, 41], "max_tokens": 4}
            t = time.monotonic()
            try:
                r = await http.post(url, json=body, headers=h)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
            lat.append(time.monotonic() - t)

    async def main() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=180, limits=limits) as http:
            deadline = time.monotonic() + 240
            await asyncio.gather(*(client(i, http, deadline) for i in range(200)))

    t0 = time.monotonic()
    asyncio.run(main())
    wall = time.monotonic() - t0
    lat.sort()
    stats = {
        "requests": len(lat),
        "failed": len(errors),
        "p50_s": round(lat[len(lat) // 2], 3),
        "p99_s": round(lat[int(len(lat) * 0.99) - 1], 3),
        "wall_s": round(wall, 1),
        "req_per_s": round(len(lat) / wall, 1),
    }
    server["stats"]["load"] = stats
    print(f"\nload: {json.dumps(stats)}")
    assert not errors, errors[:5]
    assert len(lat) >= 400  # the time budget is a guard, not the normal end


def test_stop_from_a_new_process(server):
    """Last in the module: `cpo-ray serve --stop` runs stop_server() in a fresh process on this cluster."""
    import subprocess
    import sys

    import ray

    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    code = "from cpo_ray.serve.app import stop_server; stop_server()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=180)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{server['url']}/models", timeout=10)
