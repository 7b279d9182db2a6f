"""`cpo-ray` command line: prepare | train | serve | eval | pipeline, each with --config and overrides.

cpo-ray prepare --config configs/tiny-cpu.yaml
cpo-ray train --config configs/tiny-cpu.yaml train.max_steps=100
cpo-ray pipeline --config configs/tiny-cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cpo_ray.config import Config, ConfigError, load_config


def init_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one for this process."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def model_path(cfg: Config) -> str:
    from cpo_ray.embedded import resolve_model_path

    return resolve_model_path(cfg.model, cfg.output_dir)


def cmd_prepare(cfg: Config, args) -> dict:
    from cpo_ray.data import prepare

    init_ray()
    report = prepare(cfg, model_path(cfg))
    for name, r in report["splits"].items():
        print(
            f"[cpo-ray] prepare {name}: {r['rows_read']} rows read, {r['rows_kept']} kept, "
            f"rejected {r['rejected_by_reason'] or 0}, {r['truncated']} truncated -> {cfg.data_dir}/{name}"
        )
    return report


def cmd_train(cfg: Config, args) -> None:
    from cpo_ray.train import run_training

    init_ray()
    run_training(cfg, model_path(cfg))
    print(f"[cpo-ray] exported {cfg.output_dir}/final")


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cpo-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--config", "-c", help="YAML config (configs/*.yaml); defaults otherwise")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, extra = parser.parse_known_args(argv)
    # argparse leaves positionals that follow an option in `extra`: they are overrides too.
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *extra]
    try:
        cfg = load_config(args.config, args.overrides)
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
