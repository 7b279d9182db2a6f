"""Online CPO: rounds of sampling from the current model, scoring the samples, and training on its own mistakes.

    cpo-ray iterate --config configs/smollm2-135m-numbers-online-cpu.yaml

Round r (r = 0 .. iterate.rounds-1), policy_0 = the configured model, policy_{r+1} = round r's merged export:

    serve policy_r -> evaluate it (held-out preferences + greedy generations, as `cpo-ray eval`)
      -> sample iterate.samples answers for each of the round's training prompts (ONE request with n=K)
      -> score them against the reference with iterate.scorer -> ranked rows {prompt, responses, scores}
         (written through Ray Data into the round's storage; prompts whose samples are all right are left out:
         they teach no preference)
      -> prepare + train round r from policy_r (the configured loss: pairwise CPO over the K, or infonce)
    and after the last round, serve and evaluate the final policy.

Every round lives in <output_dir>/rounds/<r>/ (samples, data, the round's training run, its evaluation) and is
skipped when its artifacts exist, so a stopped iterate resumes by round, and inside a round's training from its
checkpoint (the round's run name). iterate.json and report.html carry each round's generation metric,
preference accuracy and time split (sampling / scoring / training) as curves.
"""

from __future__ import annotations

import asyncio
import json
import time

from cpo_ray import console
from cpo_ray.config import Config, ConfigError
from cpo_ray.contract import EVAL, RunPaths
from cpo_ray.storage import Location

POLICY = "policy"  # the served id of the round's model


def round_config(cfg: Config, r: int, policy: str, data_files: list[str], eval_files: list[str]) -> Config:
    """The config of round r's training run: its own folder and run name, the policy as the model, the round's
    ranked rows as training data (ranked format), the task's held-out pairs as the eval split."""
    it = cfg.iterate
    rc = cfg.model_copy(deep=True)
    root = Location(cfg.output_dir) / "rounds" / str(r)
    rc.name, rc.output_dir = f"{cfg.name}-round{r}", root.uri
    rc.local_dir = str(RunPaths.of(cfg).local_dir / "rounds" / str(r))
    rc.model.name_or_path = policy
    rc.data.synthetic, rc.data.format = None, "auto"
    rc.data.train_files, rc.data.eval_files = data_files, eval_files
    rc.data.eval_split, rc.data.output_dir = 0.0, None  # the round's own data/ folder, never the task's
    rc.data.min_score_gap = it.min_score_gap
    if it.steps_per_round:
        rc.train.max_steps = it.steps_per_round
    rc.train.sft_steps = 0
    return rc


def raw_files(cfg: Config) -> tuple[list[str], list[str]]:
    """The task's raw train and eval files: the configured ones, or the synthetic task written once."""
    from cpo_ray.data.readers import expand_files
    from cpo_ray.data.synthetic import write_task

    if cfg.data.synthetic is not None:
        raw = RunPaths.of(cfg).raw_dir
        if not (raw / "train.jsonl").is_file():
            write_task(raw, **cfg.data.synthetic.model_dump())
        return [(raw / "train.jsonl").uri], [(raw / "eval.jsonl").uri]
    return expand_files(cfg.data.train_files), expand_files(cfg.data.eval_files) if cfg.data.eval_files else []


def round_prompts(cfg: Config, files: list[str], r: int, model_path: str) -> list[dict]:
    """Round r's slice of the training records (disjoint per round, in file order), each with the prompt's
    token ids the policy is asked with and the reference answer: the same normalising and tokenizing as prepare."""
    from cpo_ray.data.prepare import Tokenize
    from cpo_ray.data.readers import read_file

    n = cfg.iterate.prompts_per_round
    first, last = r * n, (r + 1) * n
    tok = Tokenize(model_path, cfg.data.model_dump(), cfg.model.trust_remote_code)
    records, seen = [], 0
    for i, path in enumerate(files):
        for batch in read_file({"path": [path], "file_index": [i]}):
            take = [j for j in range(len(batch["raw"])) if first <= seen + j < last]
            seen += len(batch["raw"])
            if take:
                sub = {k: [v[j] for j in take] for k, v in batch.items()}
                table = tok(sub).to_pylist()
                records += [dict(row, raw=json.loads(raw)) for row, raw in zip(table, sub["raw"], strict=True)
                            if row["reason"] is None]  # fmt: skip
            if seen >= last:
                return records
    return records


def ranked_row(record: dict, samples: list[str], reference: str, score, max_negatives: int = 1) -> dict | None:
    """{prompt, responses, scores} from the model's samples and the reference (which scores best); samples
    as good as the reference are alternatives, not negatives, and repeated samples count once. None when no
    sample is worse than the reference (nothing to prefer)."""
    raw = record["raw"]
    best = score(reference)
    responses, scores, seen = [reference], [best], {reference.strip()}
    for text in samples:
        s = score(text)
        if s < best and text.strip() not in seen:
            responses.append(text)
            scores.append(s)
            seen.add(text.strip())
    if len(responses) < 2:
        return None
    keep = sorted(range(1, len(responses)), key=lambda i: scores[i])[:max_negatives]  # the worst first
    responses, scores = [responses[0], *(responses[i] for i in keep)], [scores[0], *(scores[i] for i in keep)]
    prompt = raw.get("prompt")
    if isinstance(prompt, list):  # conversational records: responses as assistant turns
        responses = [[{"role": "assistant", "content": t}] for t in responses]
    elif not isinstance(prompt, str):
        raise ValueError("iterate needs records with a `prompt` (a string or a message list): explicit, ranked or "
                         "conversational data")  # fmt: skip
    return {"prompt": prompt, "responses": responses, "scores": scores}


def scorer_of(cfg: Config, prompt: str):
    """fn(response) -> float for one prompt and its reference, from iterate.scorer."""
    from cpo_ray.eval import metrics

    name = cfg.iterate.scorer
    fn = {"exact_match": metrics.exact_match, "chrf": metrics.sentence_chrf}.get(name)
    if fn is not None:
        return lambda reference: lambda text: fn(text, reference)
    user = metrics.load_scorer(name)
    return lambda reference: lambda text: float(user(prompt, text, reference))


def sample_round(cfg: Config, url: str, records: list[dict], out: Location) -> dict:
    """K samples per prompt from the served policy, scored, as ranked JSONL rows written through Ray Data."""
    import ray

    from cpo_ray.eval.generate import sample
    from cpo_ray.eval.scorer import make_client
    from cpo_ray.serve.app import resolve_api_key

    it = cfg.iterate
    t0 = time.perf_counter()

    async def run():
        client = make_client(url, resolve_api_key(cfg.serve), cfg.eval)
        async with client:
            return await sample(client, POLICY, [r["prompt_ids"] for r in records], cfg.eval, it.samples,
                                it.temperature, it.seed)  # fmt: skip

    texts, tokens = asyncio.run(run())
    t1 = time.perf_counter()
    rows = []
    for record, samples in zip(records, texts, strict=True):
        reference = record["chosen_text"]
        score = scorer_of(cfg, record["raw"].get("prompt"))(reference)
        row = ranked_row(record, samples, reference, score, it.max_negatives)
        if row:
            rows.append(row)
    t2 = time.perf_counter()
    if rows:
        ds = ray.data.from_items(rows)
        ds.write_json(out.path, filesystem=out.fs)
    correct = sum(sum(ranked_row_is_right(r, s, cfg) for s in t) for r, t in zip(records, texts, strict=True))
    return {
        "prompts": len(records),
        "samples": len(records) * it.samples,
        "sample_exact_or_best": correct / max(1, len(records) * it.samples),
        "ranked_rows": len(rows),
        "prompts_all_right": len(records) - len(rows),
        "generated_tokens": tokens,
        "sampling_s": round(t1 - t0, 1),
        "scoring_s": round(t2 - t1, 1),
    }


def ranked_row_is_right(record: dict, text: str, cfg: Config) -> bool:
    """A sample scoring as well as the reference (the share of right samples, per round)."""
    ref = record["chosen_text"]
    score = scorer_of(cfg, record["raw"].get("prompt"))(ref)
    return score(text) >= score(ref)


def serve_policy(cfg: Config, policy: str) -> str:
    from cpo_ray.serve.app import start_server

    return start_server(cfg.serve, {POLICY: policy}, detached=False)


def evaluate_policy(cfg: Config, url: str, out: Location, tokenizer_path: str) -> dict:
    """The policy's held-out preference accuracy and generation scores through its endpoint (one model)."""
    from cpo_ray.eval.scorer import evaluate_models, load_tokenized_pairs
    from cpo_ray.serve.app import resolve_api_key

    pairs = load_tokenized_pairs(RunPaths.of(cfg).split_dir(EVAL), cfg.eval.max_pairs)
    return evaluate_models(url, [POLICY], pairs, cfg.eval, out, api_key=resolve_api_key(cfg.serve),
                           tokenizer_path=tokenizer_path)  # fmt: skip


def summary_of(result: dict) -> dict:
    """The numbers a round is judged by: preference accuracy, greedy exact match and chrF."""
    pol = result["models"][POLICY]
    gen = (result.get("generation") or {}).get("models", {}).get(POLICY, {}).get("greedy", {})
    return {"accuracy": pol["accuracy"], "exact_match": gen.get("exact_match"), "chrf": gen.get("chrf"),
            "pairs": pol["n"]}  # fmt: skip


def run_iterate(cfg: Config) -> dict:
    """All rounds, resumable phase by phase; returns iterate.json's dict (also kept in the run's storage)."""
    from cpo_ray.pipeline import stage_prepare

    cfg = RunPaths.anchored(cfg)
    if cfg.data.synthetic is None and not cfg.data.eval_files:
        # rounds sample prompts from the training files in order: a held-out carve of those same files
        # (data.eval_split) would put evaluation prompts into some round's training rows
        raise ConfigError("cpo-ray iterate evaluates every round on held-out prompts that no round samples: set "
                          "data.eval_files (data.eval_split carves from the files the rounds sample from)")  # fmt: skip
    paths = RunPaths.of(cfg)
    state_file = paths.output_dir / "iterate.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"rounds": []}
    if not paths.prepare_report.is_file():  # the task's held-out split, once: every round evaluates on it
        with console.stage("prepare"):
            stage_prepare(cfg)
    policy = None
    for r in range(cfg.iterate.rounds + 1):
        info = next((x for x in state["rounds"] if x["round"] == r), None) or {"round": r, "policy": policy}
        if info.get("complete"):
            policy = info["policy_after"] or policy
            console.say(f"── round {r}: done earlier ({json.dumps(info['eval'])})")
            continue
        with console.stage(f"round-{r}"):
            _round(cfg, r, info, lambda info=info: _save(state, info, state_file))
        policy = info["policy_after"] or policy
    write_iterate_report(cfg, state)
    return state


def _save(state: dict, info: dict, state_file: Location) -> None:
    state["rounds"] = sorted([x for x in state["rounds"] if x["round"] != info["round"]] + [info],
                             key=lambda x: x["round"])  # fmt: skip
    state_file.write_text(json.dumps(state, indent=2))


def _round(cfg: Config, r: int, info: dict, save) -> None:
    """One round, phase by phase (each saved as it ends): serve the policy -> evaluate it -> sample and score
    the round's prompts -> prepare + train; the last round only evaluates."""
    from ray import serve

    from cpo_ray.model_source import loadable, resolve_model_path
    from cpo_ray.pipeline import stage_prepare
    from cpo_ray.train.trainer import run_training

    base = resolve_model_path(cfg)
    policy = info["policy"] = info.get("policy") or base
    root, last = Location(cfg.output_dir) / "rounds" / str(r), r == cfg.iterate.rounds
    if "eval" not in info or (not last and "sampling" not in info):
        t0 = time.perf_counter()
        console.live(f"round {r}: serving the policy ({policy}) ...")
        url = serve_policy(cfg, policy)
        info["serve_start_s"] = round(time.perf_counter() - t0, 1)
        try:
            if "eval" not in info:
                info["eval"] = summary_of(evaluate_policy(cfg, url, root / EVAL, base))
                save()
                console.say(f"round {r} policy: {_line(info['eval'])}")
            if not last and "sampling" not in info:
                records = round_prompts(cfg, raw_files(cfg)[0], r, loadable(base))
                decode = _decoder(base)
                for rec in records:
                    rec["chosen_text"] = decode(rec["chosen_ids"])
                (root / "samples").rmtree()  # a sampling cut short is redone whole
                info["sampling"] = sample_round(cfg, url, records, root / "samples")
                save()
                s = info["sampling"]
                console.say(f"round {r} samples: {s['ranked_rows']:,} ranked rows from {s['prompts']:,} prompts x "
                            f"{cfg.iterate.samples} ({s['sample_exact_or_best']:.1%} of samples right) in "
                            f"{s['sampling_s']:.0f}s")  # fmt: skip
        finally:
            serve.shutdown()
    trains = not last and info["sampling"]["ranked_rows"] > 0
    if not last and not trains:  # every sample scored like the reference: nothing to prefer, the policy stays
        console.say(f"round {r}: no sample fell {cfg.iterate.min_score_gap} below its reference; not training")
    if trains:
        rc = round_config(cfg, r, policy, [(root / "samples").uri], raw_files(cfg)[1])
        t1 = time.perf_counter()
        if not RunPaths.of(rc).train_summary.is_file():  # written when training ends; inside a round: it resumes
            stage_prepare(rc)
            run_training(rc, policy)
        info["training_s"] = round(time.perf_counter() - t1, 1)
        info["trained_tokens"] = _trained_tokens(RunPaths.of(rc))
    info["policy_after"] = RunPaths.of(round_config(cfg, r, policy, [], [])).final.uri if trains else None
    info["complete"] = True
    save()


def _line(e: dict) -> str:
    em = "-" if e["exact_match"] is None else f"{e['exact_match']:.1%}"
    chrf = "-" if e["chrf"] is None else f"{e['chrf']:.1f}"
    return f"held-out accuracy {e['accuracy']:.1%}, greedy exact match {em}, chrF {chrf}"


def write_iterate_report(cfg: Config, state: dict) -> Location:
    """report.html of the iterate run: per round its policy's scores (curves and a table) and time split."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [x for x in state["rounds"] if x.get("eval")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, title) in zip(axes, (("exact_match", "greedy exact match"), ("chrf", "greedy chrF"),
                                       ("accuracy", "held-out preference accuracy")), strict=True):  # fmt: skip
        pts = [(x["round"], x["eval"][key]) for x in rounds if x["eval"].get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o")
        ax.set(title=title, xlabel="round (0 = the model before any online training)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    head = ["round", "policy", "accuracy", "exact match", "chrF", "ranked rows", "right samples", "sampling s",
            "scoring s", "training s", "trained tokens"]  # fmt: skip
    body = ""
    for x in rounds:
        s, e = x.get("sampling", {}), x["eval"]
        cells = [x["round"], html.escape(str(x["policy"]).rsplit("/", 2)[-2] if "/" in str(x["policy"]) else str(x["policy"])),
                 f"{e['accuracy']:.1%}", "-" if e["exact_match"] is None else f"{e['exact_match']:.1%}",
                 "-" if e["chrf"] is None else f"{e['chrf']:.1f}", s.get("ranked_rows", "-"),
                 f"{s['sample_exact_or_best']:.1%}" if s else "-", s.get("sampling_s", "-"), s.get("scoring_s", "-"),
                 x.get("training_s", "-"), x.get("trained_tokens", "-")]  # fmt: skip
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    text = (f"<!doctype html><html lang=en><meta charset='utf-8'><title>cpo-ray iterate: {html.escape(cfg.name)}</title>"
            f"<h1>cpo-ray iterate: {html.escape(cfg.name)}</h1><p>{cfg.iterate.rounds} rounds of {cfg.iterate.prompts_per_round:,} prompts "
            f"x {cfg.iterate.samples} samples (T={cfg.iterate.temperature}, scorer {html.escape(cfg.iterate.scorer)})</p>"
            f"<img src='data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}'>"
            "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{body}</table></html>\n")  # fmt: skip
    paths = RunPaths.of(cfg)
    paths.report_html.write_text(text)
    local = Location(paths.local_dir) / paths.report_html.name
    if local != paths.report_html:
        local.write_text(text)
    return paths.report_html


def _decoder(model_ref: str):
    from cpo_ray.model_source import load_tokenizer

    tok = load_tokenizer(model_ref)
    return lambda ids: tok.decode(ids, skip_special_tokens=True).strip()


def _trained_tokens(paths: RunPaths) -> int:
    rows = [json.loads(ln) for ln in paths.metrics.read_text().splitlines() if ln.strip()]
    return sum(r.get("tokens", 0) for r in rows if "loss" in r and not r.get("final"))
