"""`cpo-ray`: prepare | train | serve | eval | pipeline, each with --config and dotted overrides.

cpo-ray pipeline --config configs/tiny-cpu.yaml          # everything, on the embedded default
cpo-ray prepare  --config configs/tiny-cpu.yaml data.max_length=256
cpo-ray train    --config configs/tiny-cpu.yaml train.max_steps=100
cpo-ray serve    --config configs/tiny-cpu.yaml [--detach] [--model id=/path ...] | --stop
cpo-ray eval     --endpoint http://127.0.0.1:8000/v1 --model base --model tuned --pairs runs/tiny-cpu/data/eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cpo_ray.config import Config, ConfigError, load_config


def init_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one for this process."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def cmd_prepare(cfg: Config, args) -> None:
    from cpo_ray.pipeline import stage_prepare

    init_ray()
    stage_prepare(cfg)


def cmd_train(cfg: Config, args) -> None:
    from cpo_ray.pipeline import stage_train

    init_ray()
    stage_train(cfg)


def cmd_serve(cfg: Config, args) -> None:
    from cpo_ray.pipeline import served_models
    from cpo_ray.serve import start_server, stop_server

    if args.stop:
        stop_server()
        print("[cpo-ray] serve: stopped")
        return
    models = dict(m.split("=", 1) for m in args.model) if args.model else served_models(cfg)
    start_server(cfg.serve, models, detached=args.detach)
    if args.detach:
        print("[cpo-ray] serve: running detached; stop with `cpo-ray serve --stop`")
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def cmd_eval(cfg: Config, args) -> None:
    from cpo_ray.pipeline import stage_eval

    if args.pairs:
        cfg.eval.pairs = args.pairs
    endpoint = args.endpoint or cfg.eval.endpoint
    models = args.model or cfg.eval.models
    if not endpoint or not models:
        raise SystemExit(
            "cpo-ray eval: needs --endpoint URL and at least one --model ID (or eval.endpoint/eval.models)"
        )
    stage_eval(cfg, endpoint, models, tokenizer_path=args.tokenizer)
    print(f"[cpo-ray] eval: {cfg.eval_dir}/eval.json")


def cmd_pipeline(cfg: Config, args) -> None:
    from cpo_ray.pipeline import STAGES, run_pipeline

    unknown = (set(args.force) | set(args.skip)) - set(STAGES)
    if unknown:
        raise SystemExit(f"cpo-ray pipeline: unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    init_ray()
    run_pipeline(cfg, force=set(args.force), skip=set(args.skip))


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "serve": cmd_serve, "eval": cmd_eval, "pipeline": cmd_pipeline}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpo-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=list(COMMANDS))
    p.add_argument("--config", "-c", help="YAML config (configs/*.yaml); defaults otherwise")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g = p.add_argument_group("serve")
    g.add_argument("--detach", action="store_true", help="leave the app running on the cluster and return")
    g.add_argument("--stop", action="store_true", help="shut down the Serve app on the running cluster")
    g.add_argument("--model", action="append", default=[], help="serve: id=/path (repeat); eval: served id (repeat)")
    g = p.add_argument_group("eval")
    g.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--pairs", help="held-out pairs: a tokenized Parquet folder/file")
    g.add_argument("--tokenizer", help="tokenizer folder, to decode sample generations")
    g = p.add_argument_group("pipeline")
    g.add_argument("--force", action="append", default=[], help="re-run a stage whose artifacts exist (repeat)")
    g.add_argument("--skip", action="append", default=[], help="skip a stage (repeat)")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    # argparse leaves positionals that follow an option in `extra`: they are overrides too.
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        cfg = load_config(args.config, [*args.overrides, *extra])
    except ConfigError as e:
        print(f"cpo-ray: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cpo_ray.data import DataError

    try:
        COMMANDS[args.command](cfg, args)
    except DataError as e:  # bad input: a clear message naming file/row, not a traceback
        print(f"cpo-ray {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
