"""The whole run, stage by stage: prepare -> train (+export) -> serve base and tuned -> evaluate -> report.

    cpo-ray pipeline --config configs/tiny-cpu.yaml [--force train] [--skip eval] [--verbose] [overrides...]

Each stage leaves artifacts in the run's folders (cpo_ray.contract.RunPaths) and is skipped when they exist
(prepare_report.json, final/, eval/eval.json), so a re-run after a finished train does not retrain unless
`--force train`. A stopped train resumes from its last checkpoint (same run name). Wall time per stage goes
to timings.json and into the report. The `stage_*` functions are also what `cpo-ray <stage>` runs. On the
console each stage prints a header, its progress and a summary (cpo_ray.console); the last lines are the
base-vs-tuned table and the report's path.
"""

from __future__ import annotations

import json
import time

from cpo_ray import console
from cpo_ray.config import Config
from cpo_ray.contract import EVAL, EVAL_JSON, FINAL_MARKER, RunPaths, Stage, has_rows
from cpo_ray.storage import Location


def stage_prepare(cfg: Config) -> dict:
    from cpo_ray.data.prepare import prepare
    from cpo_ray.model_source import resolve_model_path

    report = prepare(cfg, resolve_model_path(cfg))
    for name, r in report["splits"].items():
        rejected = ", ".join(f"{k} x{v}" for k, v in r["rejected_by_reason"].items()) or "none"
        console.say(
            f"{name}: {r['rows_kept']:,} pairs kept of {r['rows_read']:,} read (rejected: {rejected}; "
            f"{r['truncated']:,} truncated) -> {RunPaths.of(cfg).split_dir(name)}"
        )
    return report


def stage_train(cfg: Config) -> None:
    from cpo_ray.model_source import resolve_model_path
    from cpo_ray.train.trainer import run_training

    t0 = time.time()
    run_training(cfg, resolve_model_path(cfg))
    paths = RunPaths.of(cfg)
    last = next(
        (json.loads(ln) for ln in reversed(paths.metrics.read_text().splitlines()) if "eval/accuracy" in ln), {}
    )  # from the run's storage: the run log persisted it there
    held = f"; held-out accuracy {last['eval/accuracy']:.3f}" if last else ""
    console.say(f"trained in {time.time() - t0:,.0f}s{held} -> {paths.final}")


def stage_eval(cfg: Config, endpoint: str, model_ids: list[str], tokenizer_path: str | None = None) -> dict:
    """Score the held-out split (or cfg.eval.pairs) through the endpoint with every model id."""
    from cpo_ray.eval.scorer import evaluate_models, load_tokenized_pairs
    from cpo_ray.serve.app import resolve_api_key

    paths = RunPaths.of(cfg)
    pairs = load_tokenized_pairs(cfg.eval.pairs or paths.split_dir(EVAL), cfg.eval.max_pairs)
    result = evaluate_models(
        endpoint,
        model_ids,
        pairs,
        cfg.eval,
        paths.eval_dir,
        api_key=resolve_api_key(cfg.serve),
        tokenizer_path=tokenizer_path,
    )
    console.say(
        f"scored {len(pairs):,} held-out pairs x {len(model_ids)} models in {result['scoring_s']:.0f}s -> {paths.eval_json}"
    )
    return result


def serve_and_eval(cfg: Config, timings: dict) -> dict:
    """Serve base and tuned side by side (tuned as a merged model on its own engine, or with
    serve.lora_adapters as an adapter on the base's engine), score held-out pairs through the endpoint, shut
    serving down."""
    from ray import serve

    from cpo_ray.serve.app import lora_serving, served_adapters, served_models, start_server

    models, adapters, lora = served_models(cfg), served_adapters(cfg), lora_serving(cfg)
    t0 = time.time()
    ids = [*models, *adapters]
    console.live(f"starting vLLM engines for {', '.join(models)} ..." + (" (+ LoRA adapters)" if adapters else ""))
    url = start_server(cfg.serve, models, detached=False, lora=lora, adapters=tuple(adapters))
    timings["serve_start"] = round(time.time() - t0, 1)
    console.say(f"serving {', '.join(ids)} at {url} (ready in {timings['serve_start']:.0f}s)")
    try:
        t1 = time.time()
        result = stage_eval(cfg, url, ids, tokenizer_path=models.get("base"))
        timings["eval_scoring"] = round(time.time() - t1, 1)
    finally:
        serve.shutdown()
    return result


def track_results(cfg: Config, paths: RunPaths) -> None:
    """The endpoint's table and the run's files into the same tracked runs the training fed (train.report_to)."""
    from cpo_ray.tracking import Trackers

    trackers = Trackers.open(cfg)
    if trackers is None:
        return
    if paths.eval_json.is_file():
        res = json.loads(paths.eval_json.read_text())
        values = {f"endpoint/{m}/{k}": v for m, row in res["models"].items() for k, v in row.items()}
        for m, gen in (res.get("generation") or {}).get("models", {}).items():
            values |= {f"endpoint/{m}/generation/{k}": v for k, v in gen["greedy"].items()}
        trackers.summary(values)
        trackers.artifact(paths.eval_json)
    trackers.artifact(paths.report_html)
    trackers.close()


def run_pipeline(cfg: Config, force: set[str] = frozenset(), skip: set[str] = frozenset()) -> dict:
    from cpo_ray.eval.render import markdown_table
    from cpo_ray.report import write_report

    paths = RunPaths.of(cfg)
    paths.output_dir.mkdir()
    timings = json.loads(paths.timings.read_text()) if paths.timings.is_file() else {}

    def timed(name: str, done: bool, fn):
        if name in skip:
            console.say(f"── {name}: skipped (--skip {name})")
            return None
        if done and name not in force:
            console.say(f"── {name}: done earlier (its artifacts exist; --force {name} redoes it)")
            return None
        t0 = time.time()
        with console.stage(name):
            result = fn()
        timings[name] = round(time.time() - t0, 1)
        paths.timings.write_text(json.dumps(timings, indent=2))
        return result

    final_cfg = paths.final / FINAL_MARKER
    timed(Stage.PREPARE, paths.prepare_report.is_file(), lambda: stage_prepare(cfg))
    # train_summary.json is written when training ENDS (with train.select_by, final/ appears at the first
    # evaluation already): a run killed mid-training resumes instead of being taken as done
    trained = final_cfg.is_file() and paths.train_summary.is_file()
    timed(Stage.TRAIN, trained, lambda: stage_train(cfg))
    eval_json = paths.eval_json
    fresh = eval_json.is_file() and final_cfg.is_file() and eval_json.mtime() > final_cfg.mtime()
    if not (fresh or Stage.EVAL in skip) and not has_rows(cfg.eval.pairs or paths.split_dir(EVAL)):
        # Found before any engine starts: nothing to score (eval_split 0 and no eval_files, or all rejected).
        console.say(f"── eval: skipped (no held-out pairs in {cfg.eval.pairs or paths.split_dir(EVAL)}: set "
                    "data.eval_files or data.eval_split, or eval.pairs)")  # fmt: skip
        skip = {*skip, Stage.EVAL}
    timed(Stage.EVAL, fresh, lambda: serve_and_eval(cfg, timings))
    report = None
    if Stage.REPORT in skip:  # a stage like the others: --skip report must mean it
        console.say("── report: skipped (--skip report)")
    else:
        with console.stage(Stage.REPORT):
            report = write_report(cfg)
    track_results(cfg, paths)
    if not paths.output_dir.is_local:  # copies on the driver's own disk for the person at it
        if eval_json.is_file():
            Location(paths.local_dir / EVAL_JSON).write_text(eval_json.read_text())
        console.say(f"local copies of eval.json and report.html: {paths.local_dir}")
    if eval_json.is_file():  # the last lines: the result, then where the whole story is
        console.say()
        console.say(markdown_table(json.loads(eval_json.read_text())))
    if report:
        console.say(f"report: {report}")
    return timings
