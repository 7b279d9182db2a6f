"""The whole run, stage by stage: prepare -> train (+export) -> serve base and tuned -> evaluate -> report.

    cpo-ray pipeline --config configs/tiny-cpu.yaml [--force train] [--skip eval] [overrides...]

Each stage leaves artifacts in cfg.output_dir and is skipped when they exist (prepare_report.json,
final/, eval/eval.json), so a re-run after a finished train does not retrain unless `--force train`.
A stopped train resumes from its last checkpoint (same run name). Wall time per stage goes to
timings.json and into the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cpo_ray.config import Config

STAGES = ("prepare", "train", "eval", "report")


def base_model_path(cfg: Config) -> str:
    from cpo_ray.embedded import resolve_model_path

    return resolve_model_path(cfg.model, cfg.output_dir)


def served_models(cfg: Config) -> dict[str, str]:
    """cfg.serve.models, or base (the configured model) + tuned (<output_dir>/final) when it exists."""
    if cfg.serve.models:
        return dict(cfg.serve.models)
    models = {"base": base_model_path(cfg)}
    final = Path(cfg.output_dir) / "final"
    if (final / "config.json").exists():
        models["tuned"] = str(final.resolve())
    return models


def stage_prepare(cfg: Config) -> dict:
    from cpo_ray.data import prepare

    report = prepare(cfg, base_model_path(cfg))
    for name, r in report["splits"].items():
        print(
            f"[cpo-ray] prepare {name}: {r['rows_read']} rows read, {r['rows_kept']} kept, "
            f"rejected {r['rejected_by_reason'] or 0}, {r['truncated']} truncated -> {cfg.data_dir}/{name}",
            flush=True,
        )
    return report


def stage_train(cfg: Config) -> None:
    from cpo_ray.train import run_training

    run_training(cfg, base_model_path(cfg))
    print(f"[cpo-ray] exported {Path(cfg.output_dir) / 'final'}", flush=True)


def stage_eval(cfg: Config, endpoint: str, model_ids: list[str], tokenizer_path: str | None = None) -> dict:
    """Score the held-out split (or cfg.eval.pairs) through the endpoint with every model id."""
    from cpo_ray.evaluate import evaluate_models, load_tokenized_pairs
    from cpo_ray.serve import resolve_api_key

    pairs_path = cfg.eval.pairs or str(Path(cfg.data_dir) / "eval")
    pairs = load_tokenized_pairs(pairs_path, cfg.eval.max_pairs)
    return evaluate_models(
        endpoint,
        model_ids,
        pairs,
        cfg.eval,
        cfg.eval_dir,
        api_key=resolve_api_key(cfg.serve),
        tokenizer_path=tokenizer_path,
        pairs_per_request=cfg.eval.pairs_per_request,
    )


def run_pipeline(cfg: Config, force: set[str] = frozenset(), skip: set[str] = frozenset()) -> dict:
    from cpo_ray.report import write_report

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

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
        timings_path.write_text(json.dumps(timings, indent=2))
        return result

    timed("prepare", (Path(cfg.data_dir) / "prepare_report.json").exists(), lambda: stage_prepare(cfg))
    timed("train", (out / "final" / "config.json").exists(), lambda: stage_train(cfg))
    eval_json, final_cfg = Path(cfg.eval_dir) / "eval.json", out / "final" / "config.json"
    fresh = eval_json.exists() and final_cfg.exists() and eval_json.stat().st_mtime > final_cfg.stat().st_mtime
    result = timed("eval", fresh, lambda: serve_and_eval(cfg, timings))
    if result is None and (Path(cfg.eval_dir) / "eval.md").exists():
        print((Path(cfg.eval_dir) / "eval.md").read_text(), flush=True)
    if "report" in skip:  # STAGES lists it, so --skip report must mean it
        print("[cpo-ray] report: skipped (--skip report)", flush=True)
    else:
        print(f"[cpo-ray] report: {write_report(out)}", flush=True)
    return timings


def serve_and_eval(cfg: Config, timings: dict) -> dict:
    """Serve base and tuned side by side, score held-out pairs through the endpoint, shut serving down."""
    from ray import serve

    from cpo_ray.serve import start_server

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
