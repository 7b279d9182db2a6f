"""Training throughput through Ray Train: 1 worker x 2 threads, 1 x 1 and 2 x 1, against the best one-process
cpo-ray step in the same run.

Run from the repository root:

    .venv/bin/python -m bench.train_scaling                               # defaults below, ~5 min on 2 cores
    .venv/bin/python -m bench.train_scaling --shape smollm2 --lora --contenders ray_1x1,ray_2x1   # issue 22's target
    .venv/bin/python -m bench.train_scaling --hidden 64 --layers 2 --steps 2 --warmup 1 \
        --max-length 128 --contenders varlen,ray_1x1,ray_2x1              # quick smoke run

The model, data, pairs, optimizer and loss are bench.train_vs_trl's (bench.common builds them): a random
Llama (~27M params by default) trained fp32 with fused AdamW lr 1e-5, betas 0.9/0.999, no weight decay,
clip 1.0, constant lr, sigmoid CPO + NLL (beta 0.1, cpo_alpha 1.0), full fine-tune, on the first
(warmup + steps) x pairs HH-RLHF pairs that fit max_length.

Contenders (--contenders, comma-separated):
  ray_1x2   cpo_ray.train.trainer.run_training (TorchTrainer + DeepSpeed) on a Parquet of the same pairs,
            1 worker x 2 torch threads; ray_1x1: 1 worker x 1 thread; ray_2x1: 2 workers x 1 thread
            (global batch stays --pairs: micro_batch_size = pairs / workers); ray_2x1_unbalanced: the same
            with train.balance_ranks off (each rank trains the pairs it read, not a token-balanced share). Ray Data streams the Parquet
            with the trainer's local shuffle, so its batches are the same pairs in another order.
            ray.init(num_cpus=2) of this process (own temp folder), resources_per_worker CPU 0.5,
            torch_threads explicit, --ray-collate batches, --zero-stage, --ray-group length grouping.
  varlen, varlen_grouped (default) or any other contender of bench.train_vs_trl (trl, padded, packed and
            their _grouped forms): run in this process first, at --threads threads, as there.

Timing: for ray_*, the sum of the timed steps' tokens over the sum of their wall times from metrics.jsonl
(the steps after --warmup); for the one-process contenders as in bench.train_vs_trl. MFU = tokens/s x 6 x
params / peak (best fp32 torch.mm GFLOP/s at --threads, start and end of this run). Targets: ray_2x1 >=
1.6x ray_1x1, and ray_2x1 >= 0.9x the best one-process cpo-ray contender.

Prints ONE JSON object on stdout (everything else goes to stderr). Not a test: numbers depend on the machine
and on its load (the JSON carries the 1-minute load average before and after).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.common import (
    BETA,
    BETAS,
    CPO_ALPHA,
    HH,
    LR,
    MAX_GRAD_NORM,
    add_training_args,
    contender_list,
    finish_training,
    load1,
    local_ray,
    log,
    prepare_training,
    ratio,
    run_bench,
)
from bench.train_vs_trl import CONTENDERS, best_one_process, run_one_process

# workers, torch threads per worker, train.balance_ranks
RAY_SHAPES = {
    "ray_1x2": (1, 2, True),
    "ray_1x1": (1, 1, True),
    "ray_2x1": (2, 1, True),
    "ray_2x1_unbalanced": (2, 1, False),
}
ALL = [*CONTENDERS, *RAY_SHAPES]
DEFAULT = ["shared", "shared_grouped", *RAY_SHAPES]


def write_parquet(pairs: list[dict], data_dir: Path) -> None:
    """The pairs as the train split prepare would write (kept columns, in order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cpo_ray.contract import KEPT_COLUMNS, PAIR_COLUMNS, SOURCE, TRAIN, TRUNCATED
    from cpo_ray.data.prepare import OUT_SCHEMA

    schema = pa.schema([OUT_SCHEMA.field(c) for c in KEPT_COLUMNS])
    table = pa.table(
        {
            **{k: [p[k] for p in pairs] for k in PAIR_COLUMNS},
            TRUNCATED: [False] * len(pairs),
            SOURCE: [f"{HH.name}:kept{i}" for i in range(len(pairs))],
        },
        schema=schema,
    )
    (data_dir / TRAIN).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / TRAIN / "part-00000.parquet")


def run_ray(name: str, model_dir: Path, data_dir: Path, args, work: Path) -> dict:
    from cpo_ray.config import Config
    from cpo_ray.contract import RunPaths
    from cpo_ray.train.trainer import run_training

    workers, threads, balance = RAY_SHAPES[name]
    # Every training setting the bench relies on is set here: the library defaults are for LoRA runs.
    cfg = Config.model_validate(
        {
            "name": f"bench-{name}",
            "output_dir": str(work / name),
            "data": {"output_dir": str(data_dir), "max_length": args.max_length},
            "model": {
                "name_or_path": str(model_dir),
                "dtype": "float32",
                # the trainer packs varlen unless an explicit sdpa asks for block-diagonal rows
                "attn_implementation": "sdpa" if args.ray_collate == "packed" else None,
                "gradient_checkpointing": False,
                # full fine-tune, as every other contender; --lora: the real CPU configs' LoRA (configs/smollm2-*:
                # r16 on every projection, no dropout), whose all-reduce is ~1/60 of the full gradient's
                "lora": (
                    {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
                    if args.lora
                    else {"enabled": False}
                ),
            },
            "train": {
                "num_workers": workers,
                "use_gpu": False,
                "cpus_per_worker": 0.5,
                "torch_threads": threads,
                "zero_stage": args.zero_stage,
                "overlap_grad_sync": True,
                "balance_ranks": balance,
                "micro_batch_size": args.pairs // workers,
                "grad_accum": 1,
                "lr": LR,
                "adam_betas": list(BETAS),
                "weight_decay": 0.0,
                "warmup_steps": 0,
                "lr_schedule": "constant",
                "max_grad_norm": MAX_GRAD_NORM,
                "loss_type": "sigmoid",
                "beta": BETA,
                "cpo_alpha": CPO_ALPHA,
                "label_smoothing": 0.0,
                "max_steps": args.warmup + args.steps,
                "epochs": 2,  # the Parquet holds exactly max_steps steps; max_steps ends the run
                "packing": args.ray_collate != "padded",
                "shared_prompt": args.ray_collate == "shared",  # the trainer's default layout
                "group_by_length": args.ray_group,
                "eval_every": 0,
                "checkpoint_every": 0,
                "report_every": 10,
                "log_every": 10,
                "max_failures": 0,
                "seed": args.seed,
            },
        }
    )
    t0 = time.perf_counter()
    run_training(cfg, str(model_dir))
    wall = time.perf_counter() - t0
    metrics = RunPaths.of(cfg).metrics
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if not r.get("final")]
    timed_rows = [r for r in rows if r["step"] > args.warmup]
    rates = [r["tokens_per_s"] for r in timed_rows]
    if len(rates) != args.steps:
        raise RuntimeError(f"{name}: expected {args.steps} timed steps in {metrics}, got {len(rates)}")
    toks = sum(r["tokens"] for r in timed_rows)
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed_rows)  # each step's own wall time
    phases = {
        k[5:]: round(statistics.fmean(r[k] for r in timed_rows), 4)
        for k in timed_rows[0]
        if k.startswith("time/") and not isinstance(timed_rows[0][k], list)
    }
    per_rank = [statistics.fmean(r["time/rank_compute_s"][j] for r in timed_rows) for j in range(workers)]
    # what the slowest rank costs the others: mean over steps of (max - min) forward+backward seconds
    spread = statistics.fmean(max(r["time/rank_compute_s"]) - min(r["time/rank_compute_s"]) for r in timed_rows)
    return {
        "tokens_per_s": toks / secs,  # aggregate, as for the one-process contenders
        "tokens_per_s_mean_of_steps": statistics.fmean(rates),
        "tokens_per_s_median": statistics.median(rates),
        "timed_steps": len(rates),
        "timed_tokens": toks,
        "rank0_phase_s_per_step": phases,
        "rank_compute_s_per_step": [round(x, 4) for x in per_rank],
        "rank_compute_spread_s_per_step": round(spread, 4),
        "run_training_wall_s": round(wall, 1),
        "batching": (
            f"Ray Data stream of the same pairs with the trainer's local shuffle; {workers} worker(s) x "
            f"{args.pairs // workers} pairs, {args.ray_collate} collate, group_by_length {args.ray_group}, "
            f"DeepSpeed ZeRO-{args.zero_stage}, balance_ranks {balance}, "
            f"{threads} torch thread(s) per worker"
        ),
    }


def bench(args, names: list[str], work: Path) -> dict:
    s = prepare_training(args, work)
    res: dict[str, dict] = {}
    for name in (n for n in names if n not in RAY_SHAPES):
        log(f"contender {name} (load {load1()})")
        res[name] = run_one_process(name, s, args, work)
        res[name].pop("step_tokens")
        res[name].pop("token_ids_equal_cpo_ray", None)
        log(f"  -> {res[name]['tokens_per_s']:.0f} tok/s")
    ray_names = [n for n in names if n in RAY_SHAPES]
    if ray_names:
        data_dir = work / "data"
        write_parquet(s.pairs, data_dir)
        with local_ray(2, work / "ray", log_to_driver=args.keep):
            for name in ray_names:
                log(f"contender {name} (load {load1()})")
                res[name] = run_ray(name, s.model_dir, data_dir, args, work)
                log(f"  -> {res[name]['tokens_per_s']:.0f} tok/s")
    head = finish_training("train_scaling", args, s, res)
    head["setup"]["ray"] = (
        f"ray.init(num_cpus=2), CPU 0.5 per worker, ZeRO-{args.zero_stage}, {args.ray_collate} collate, "
        f"group_by_length {args.ray_group}, " + ("LoRA r16 all-linear" if args.lora else "full fine-tune")
    )
    best = best_one_process(res)
    targets = {
        "one_process_best_variant": best,
        "ray_2x1_over_ray_1x1": ratio(res, "ray_2x1", "ray_1x1"),
        "ray_2x1_over_ray_1x1_target": 1.7 if args.lora else 1.6,
        "ray_2x1_over_ray_1x2": ratio(res, "ray_2x1", "ray_1x2"),
        "ray_2x1_over_ray_2x1_unbalanced": ratio(res, "ray_2x1", "ray_2x1_unbalanced"),
        f"ray_2x1_over_one_process_{args.ray_collate}": ratio(res, "ray_2x1", args.ray_collate),
        f"ray_2x1_over_one_process_{args.ray_collate}_grouped": ratio(res, "ray_2x1", f"{args.ray_collate}_grouped"),
        "ray_2x1_over_best_one_process": ratio(res, "ray_2x1", best),
        "ray_2x1_over_one_process_target": 0.9,
    }
    return {**head, "contenders": res, "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--contenders", default=",".join(DEFAULT), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument(
        "--ray-collate", choices=["shared", "varlen", "packed", "padded"], default="shared", help="batches of ray_*"
    )
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=0, help="train.zero_stage of ray_*")
    ap.add_argument("--ray-group", type=int, default=16, help="train.group_by_length of ray_* (0 = stream order)")
    ap.add_argument(
        "--lora", action="store_true", help="ray_* train LoRA r16 (the CPU configs') instead of all weights"
    )
    args = ap.parse_args()
    args.warmup = max(1, args.warmup)
    names = contender_list(args.contenders, ALL)
    for name in names:
        if name in RAY_SHAPES and args.pairs % RAY_SHAPES[name][0]:
            raise SystemExit(f"--pairs {args.pairs} is not divisible by {RAY_SHAPES[name][0]} workers ({name})")
    run_bench(lambda work: bench(args, names, work), prefix="cpo-train-bench-", keep=args.keep)


if __name__ == "__main__":
    main()
