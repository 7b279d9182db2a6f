"""`cpo-ray COMMAND`: prepare | train | serve | eval | pipeline | iterate | sweep, each with --config, its own options and
dotted overrides (anywhere on the line). `cpo-ray COMMAND --help` lists a command's options.

    cpo-ray pipeline --config configs/tiny-cpu.yaml          # everything, on the embedded default
    cpo-ray prepare  --config configs/tiny-cpu.yaml data.max_length=256
    cpo-ray train    --config configs/tiny-cpu.yaml train.max_steps=100
    cpo-ray serve    --config configs/tiny-cpu.yaml [--detach] [--model id=/path ...] | --stop
    cpo-ray eval     --endpoint http://127.0.0.1:8000/v1 --model base --model tuned --pairs runs/tiny-cpu/data/eval
    cpo-ray iterate  --config configs/smollm2-135m-numbers-online-cpu.yaml

jobs/*.py run the same commands through `job()`: the same parser, overrides, error messages and exit codes
(0 ok, 1 bad input or a failed run, 2 bad command line or config).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from cpo_ray import console
from cpo_ray.config import ConfigError, load_config
from cpo_ray.contract import Stage


def init_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one for this process. Worker
    output streams to this driver (log_to_driver), which cpo_ray.console sends to the stage's log file."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        ctx.print_on_execution_start = False


def cmd_prepare(cfg, args) -> None:
    from cpo_ray.pipeline import stage_prepare

    with console.stage(Stage.PREPARE):
        init_ray()
        stage_prepare(cfg)


def cmd_train(cfg, args) -> None:
    from cpo_ray.pipeline import stage_train

    with console.stage(Stage.TRAIN):
        init_ray()
        stage_train(cfg)


def cmd_serve(cfg, args) -> None:
    from cpo_ray.serve.app import lora_serving, resolve_api_key, served_models, start_server, stop_server

    if args.stop:
        with console.stage("serve"):
            stop_server()
        console.say("serve: stopped")
        return
    models = dict(m.split("=", 1) for m in args.model) if args.model else served_models(cfg)
    # serve.lora_adapters: every run's adapter under adapters_dir is loaded on first use as "base:<run name>",
    # so one engine serves the base and any number of tuned runs (evaluate them with `cpo-ray eval --model`)
    lora = lora_serving(cfg)
    with console.stage("serve"):
        url = start_server(cfg.serve, models, detached=args.detach, lora=lora)
    auth = " (Bearer auth)" if resolve_api_key(cfg.serve) else ""
    console.say(f"serving {', '.join(models)} at {url}{auth}")
    if lora:
        console.say(f"LoRA adapters in {lora['adapters']}/<run name> served as base:<run name>")
    if args.detach:
        console.say("running detached; stop with `cpo-ray serve --stop`")
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def cmd_eval(cfg, args) -> None:
    from cpo_ray.pipeline import stage_eval

    if args.pairs:
        cfg.eval.pairs = args.pairs
    endpoint = args.endpoint or cfg.eval.endpoint
    models = args.model or cfg.eval.models
    if not endpoint or not models:
        raise UsageError("needs --endpoint URL and at least one --model ID (or eval.endpoint / eval.models)")
    from cpo_ray.eval.render import markdown_table

    with console.stage(Stage.EVAL):
        result = stage_eval(cfg, endpoint, models, tokenizer_path=args.tokenizer)
    console.say(markdown_table(result))


def cmd_iterate(cfg, args) -> None:
    from cpo_ray.iterate import run_iterate

    init_ray()
    state = run_iterate(cfg)
    for x in state["rounds"]:
        e = x.get("eval") or {}
        em = "-" if e.get("exact_match") is None else f"{e['exact_match']:.1%}"
        acc = "-" if e.get("accuracy") is None else f"{e['accuracy']:.1%}"
        console.say(f"round {x['round']}: greedy exact match {em}, held-out accuracy {acc}")
    from cpo_ray.contract import RunPaths

    console.say(f"report: {RunPaths.of(cfg).report_html}")


def cmd_sweep(cfg, args) -> None:
    from cpo_ray.sweep import run_sweep, trials_table, write_sweep_report

    init_ray()
    out = run_sweep(cfg)
    result = None  # an interrupted sweep has no best trial (cpo_ray.sweep): nothing to evaluate
    if cfg.sweep.evaluate_best and out["best"]:
        from cpo_ray.pipeline import serve_and_eval

        with console.stage(Stage.EVAL):
            result = serve_and_eval(cfg, {})
    report = write_sweep_report(cfg, out)
    console.say(trials_table(out))
    if result:
        from cpo_ray.eval.render import markdown_table

        console.say()
        console.say(markdown_table(result))  # base vs the best trial, through the endpoint
    console.say(f"report: {report}")
    if out["unfinished"]:
        raise SystemExit(f"sweep interrupted: {out['unfinished']} of {len(out['trials'])} trials unfinished, no "
                         "model exported; the same command resumes it")  # fmt: skip


def cmd_pipeline(cfg, args) -> None:
    from cpo_ray.pipeline import run_pipeline

    init_ray()
    run_pipeline(cfg, force=set(args.force), skip=set(args.skip))


COMMANDS = {
    Stage.PREPARE: (cmd_prepare, "preference shards -> tokenized Parquet (Ray Data)"),
    Stage.TRAIN: (cmd_train, "CPO on Ray Train + DeepSpeed; exports the merged model"),
    "serve": (cmd_serve, "base and tuned behind an OpenAI-compatible API (Ray Serve + vLLM)"),
    Stage.EVAL: (cmd_eval, "score held-out pairs through an endpoint"),
    "pipeline": (cmd_pipeline, "prepare -> train -> serve + eval -> report; finished stages are skipped"),
    "iterate": (cmd_iterate, "online CPO: rounds of sample -> score -> train from the model's own answers"),
    "sweep": (cmd_sweep, "a Ray Tune hyperparameter search, trials stopped early on a held-out metric"),
}


class UsageError(ValueError):
    """A command line that cannot run: printed with the command's name, exit code 2."""

    user_error = True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpo-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = {}  # name -> that command's own parser
    for name, (_, text) in COMMANDS.items():
        c = p.commands[name] = sub.add_parser(name, help=text, description=text)
        c.add_argument("--config", "-c", help="YAML config (configs/*.yaml); defaults otherwise")
        c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        c.add_argument(
            "--verbose", "-v", action="store_true", help="show all framework output (also CPO_RAY_VERBOSE=1)"
        )
        c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
        if name == "serve":
            c.add_argument("--detach", action="store_true", help="leave the app running on the cluster and return")
            c.add_argument("--stop", action="store_true", help="shut down the Serve app on the running cluster")
            c.add_argument(
                "--model", action="append", default=[], help="id=/path/to/model (repeat); default base+tuned"
            )
        elif name == Stage.EVAL:
            c.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
            c.add_argument("--model", action="append", default=[], help="served model id (repeat; first = baseline)")
            c.add_argument("--pairs", help="held-out pairs: a tokenized Parquet folder/file")
            c.add_argument("--tokenizer", help="tokenizer folder, to decode sample generations")
        elif name == "pipeline":
            stages = [str(s) for s in Stage]
            c.add_argument("--force", action="append", default=[], choices=stages, help="re-run a finished stage")
            c.add_argument("--skip", action="append", default=[], choices=stages, help="leave a stage out")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The command's own parser, with overrides allowed between its options (exits 2 on a bad line)."""
    top = parser()
    if not argv or argv[0] not in COMMANDS:
        return top.parse_args(argv)  # help, or the usage error naming the valid commands
    args = top.commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


@contextlib.contextmanager
def exit_codes(command: str):
    """Bad input and bad command lines become one clear line on stderr and an exit code, not a traceback."""
    from cpo_ray.contract import DataError

    try:
        yield
    except (ConfigError, UsageError) as e:
        console.error(f"cpo-ray {command}: {e}")
        raise SystemExit(2) from None
    except DataError as e:  # names the file/row
        console.error(f"cpo-ray {command}: {e}")
        raise SystemExit(1) from None


@contextlib.contextmanager
def job(command: str, argv: list[str] | None = None):
    """What jobs/*.py run: `cpo-ray COMMAND` parsing (argv defaults to sys.argv[1:]) and error handling;
    yields (cfg, args)."""
    args = parse([command, *(sys.argv[1:] if argv is None else argv)])
    with exit_codes(command):
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            raise SystemExit(0)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from cpo_ray.contract import RunPaths

        console.start(RunPaths.of(cfg).logs, verbose=args.verbose)  # on the driver: its own disk
        yield cfg, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    try:
        with job(command, argv[1:]) as (cfg, args):
            COMMANDS[args.command][0](cfg, args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
