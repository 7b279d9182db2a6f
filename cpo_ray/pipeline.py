"""The whole run, stage by stage: prepare -> train (+export) -> serve base and tuned -> evaluate -> report.

    cpo-ray pipeline --config configs/tiny-cpu.yaml [--force train] [--skip eval] [overrides...]

Each stage leaves artifacts in the run's folders (cpo_ray.contract.RunPaths) and is skipped when they exist
(prepare_report.json, final/, eval/eval.json), so a re-run after a finished train does not retrain unless
`--force train`. A stopped train resumes from its last checkpoint (same run name). Wall time per stage goes
to timings.json and into the report. The `stage_*` functions are also what `cpo-ray <stage>` runs.
"""

from __future__ import annotations

import json
import time

from cpo_ray.config import Config
from cpo_ray.contract import EVAL, FINAL_MARKER, RunPaths, Stage


def stage_prepare(cfg: Config) -> dict:
    from cpo_ray.data import prepare
    from cpo_ray.model import resolve_model_path

    report = prepare(cfg, resolve_model_path(cfg))
    for name, r in report["splits"].items():
        print(
            f"[cpo-ray] prepare {name}: {r['rows_read']} rows read, {r['rows_kept']} kept, "
            f"rejected {r['rejected_by_reason'] or 0}, {r['truncated']} truncated -> {RunPaths.of(cfg).split_dir(name)}",
            flush=True,
        )
    return report


def stage_train(cfg: Config) -> None:
    from cpo_ray.model import resolve_model_path
    from cpo_ray.train import run_training

    run_training(cfg, resolve_model_path(cfg))
    print(f"[cpo-ray] exported {RunPaths.of(cfg).final}", flush=True)


def stage_eval(cfg: Config, endpoint: str, model_ids: list[str], tokenizer_path: str | None = None) -> dict:
    """Score the held-out split (or cfg.eval.pairs) through the endpoint with every model id."""
    from cpo_ray.evaluate import evaluate_models, load_tokenized_pairs
    from cpo_ray.serve import resolve_api_key

    paths = RunPaths.of(cfg)
    pairs = load_tokenized_pairs(cfg.eval.pairs or paths.split_dir(EVAL), cfg.eval.max_pairs)
    return evaluate_models(
        endpoint,
        model_ids,
        pairs,
        cfg.eval,
        paths.eval_dir,
        api_key=resolve_api_key(cfg.serve),
        tokenizer_path=tokenizer_path,
    )


def serve_and_eval(cfg: Config, timings: dict) -> dict:
    """Serve base and tuned side by side, score held-out pairs through the endpoint, shut serving down."""
    from ray import serve

    from cpo_ray.serve import served_models, start_server

    models = served_models(cfg)
    t0 = time.time()
    url = start_server(cfg.serve, models, detached=False)
    timings["serve_start"] = round(time.time() - t0, 1)
    try:
        t1 = time.time()
        result = stage_eval(cfg, url, list(models), tokenizer_path=models.get("base"))
        timings["eval_scoring"] = round(time.time() - t1, 1)
    finally:
        serve.shutdown()
    return result


def run_pipeline(cfg: Config, force: set[str] = frozenset(), skip: set[str] = frozenset()) -> dict:
    from cpo_ray.report import write_report

    paths = RunPaths.of(cfg)
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    timings = json.loads(paths.timings.read_text()) if paths.timings.exists() else {}

    def timed(name: str, done: bool, fn):
        if name in skip:
            print(f"[cpo-ray] {name}: skipped (--skip {name})", flush=True)
            return None
        if done and name not in force:
            print(f"[cpo-ray] {name}: artifacts exist, not re-running (--force {name} to redo)", flush=True)
            return None
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        paths.timings.write_text(json.dumps(timings, indent=2))
        return result

    final_cfg = paths.final / FINAL_MARKER
    timed(Stage.PREPARE, paths.prepare_report.exists(), lambda: stage_prepare(cfg))
    timed(Stage.TRAIN, final_cfg.exists(), lambda: stage_train(cfg))
    eval_json = paths.eval_json
    fresh = eval_json.exists() and final_cfg.exists() and eval_json.stat().st_mtime > final_cfg.stat().st_mtime
    result = timed(Stage.EVAL, fresh, lambda: serve_and_eval(cfg, timings))
    if result is None and paths.eval_md.exists():
        print(paths.eval_md.read_text(), flush=True)
    if Stage.REPORT in skip:  # a stage like the others: --skip report must mean it
        print("[cpo-ray] report: skipped (--skip report)", flush=True)
    else:
        print(f"[cpo-ray] report: {write_report(cfg)}", flush=True)
    return timings
