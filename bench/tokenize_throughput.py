"""Tokenization throughput: cpo-ray's Ray Data prepare vs single-process tokenizing, same tokenizer and data.

Run from the repository root:

    .venv/bin/python -m bench.tokenize_throughput --tokenizer smollm2 --copies 44      # 101,728 pairs, SmolLM2's BPE
    .venv/bin/python -m bench.tokenize_throughput --copies 1 --cpu-budgets 2          # quick smoke run

Data: ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz (2,312 real HH-RLHF pairs), written as `--copies`
JSONL shards so there is enough work to spread. Contenders, in one run:
  loop          the usual per-row script: json.loads -> normalise -> tokenize -> truncate, one core
  batched_1t    the pipeline's own Tokenize UDF in this one process, batched tokenizer calls, one thread
  batched_Nt    the same with the tokenizer's own thread pool on (TOKENIZERS_PARALLELISM=true): the best a
                single process does on this machine's cores
  ray_<c>cpu    cpo_ray.data.prepare() end to end (read tasks, tokenizer actors, reject accounting, Parquet
                written by the driver) on a local Ray of <c> logical CPUs (--cpu-budgets), started by this
                script in its own temp folder and shut down; Ray start-up excluded, actor start-up included
Prints ONE JSON object on stdout (everything else goes to stderr): pairs/s of each and the ratios vs the best
single process. Not a test: numbers depend on the machine and its load (the JSON carries the load average).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

from bench.common import HH, local_ray, log, run_bench, smollm2_dir


def loop_baseline(files: list[str], tokenizer, max_length: int) -> tuple[int, int]:
    from cpo_ray.contract import RowError
    from cpo_ray.data.formats import detect_format, normalize
    from cpo_ray.data.tokenize import Special, truncate_pair

    sp = Special.of(tokenizer)
    kept = rejected = 0
    for f in files:
        for line in Path(f).read_text().splitlines():
            try:
                rec = json.loads(line)
                p, c, (r,) = normalize(rec, detect_format(rec), tokenizer)
                pi = tokenizer(p)["input_ids"]
                ci = tokenizer(p + c, add_special_tokens=False)["input_ids"][len(pi) :] + [sp.eos_id]
                ri = tokenizer(p + r, add_special_tokens=False)["input_ids"][len(pi) :] + [sp.eos_id]
                truncate_pair(pi, ci, [ri], max_length)
                kept += 1
            except RowError:
                rejected += 1
    return kept, rejected


def batched_single(files: list[str], model_path: str, cfg) -> int:
    from cpo_ray.data.prepare import Tokenize
    from cpo_ray.data.readers import READ_BATCH, read_file

    udf = Tokenize(model_path, cfg.data.model_dump())
    n = 0
    for f in files:
        for batch in read_file({"path": [f]}):
            for i in range(0, len(batch["raw"]), READ_BATCH):
                n += udf({k: v[i : i + READ_BATCH] for k, v in batch.items()}).num_rows
    return n


def bench(args, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from cpo_ray.config import load_config
    from cpo_ray.data.prepare import prepare
    from cpo_ray.embedded import build_embedded_model

    if args.tokenizer == "embedded":
        model_path = str(build_embedded_model(tmp / "model"))
    else:
        model_path = str(smollm2_dir()) if args.tokenizer == "smollm2" else args.tokenizer
    text = gzip.decompress(HH.read_bytes()).decode()
    files = []
    for i in range(args.copies):
        (tmp / f"shard-{i:02d}.jsonl").write_text(text)
        files.append(str(tmp / f"shard-{i:02d}.jsonl"))
    pairs = args.copies * len(text.splitlines())
    over = [f"data.max_length={args.max_length}", "data.format=implicit", "data.max_reject_fraction=0.05"]
    cfg = load_config(None, over)
    tok = AutoTokenizer.from_pretrained(model_path)
    threads = os.cpu_count()
    res: dict = {"pairs": pairs, "copies": args.copies, "tokenizer": args.tokenizer, "logical_cpus": threads}
    secs: dict[str, float] = {}

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    t = time.perf_counter()
    kept, rejected = loop_baseline(files, tok, args.max_length)
    secs["loop"] = time.perf_counter() - t
    log(f"loop: {pairs / secs['loop']:.0f} pairs/s")
    for name, parallel in (("batched_1t", "false"), (f"batched_{threads}t", "true")):
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
        t = time.perf_counter()
        assert batched_single(files, model_path, cfg) == pairs
        secs[name] = time.perf_counter() - t
        log(f"{name}: {pairs / secs[name]:.0f} pairs/s")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # Ray's workers: one thread per CPU they hold
    for cpus in args.cpu_budgets:
        name = f"ray_{cpus}cpu"
        t = time.perf_counter()
        with local_ray(cpus, tmp / f"ray{cpus}", logging_level="ERROR"):
            res[f"{name}_init_s"] = round(time.perf_counter() - t, 2)
            run_cfg = cfg.model_copy(update={"output_dir": str(tmp / f"out{cpus}")}, deep=True)
            run_cfg.data.train_files = files
            t = time.perf_counter()
            report = prepare(run_cfg, model_path)
            secs[name] = time.perf_counter() - t
        assert report["rows_read"] == pairs and report["rows_kept"] == kept, (report["rows_read"], report["rows_kept"])
        log(f"{name}: {pairs / secs[name]:.0f} pairs/s")
    best_single = min((n for n in secs if not n.startswith("ray_")), key=lambda n: secs[n])  # fastest one process
    for n, v in secs.items():
        res[f"{n}_s"] = round(v, 2)
        res[f"{n}_pairs_per_s"] = round(pairs / v, 1)
    res["best_single_process"] = best_single
    for cpus in args.cpu_budgets:
        res[f"ratio_ray_{cpus}cpu_vs_best_single"] = round(secs[best_single] / secs[f"ray_{cpus}cpu"], 3)
    res["ratio_target"] = 0.9
    res["loop_kept"], res["loop_rejected"] = kept, rejected
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--tokenizer", default="embedded", help="embedded (byte-level), smollm2, or a local HF tokenizer folder"
    )
    ap.add_argument(
        "--cpu-budgets", type=int, nargs="+", default=[1, os.cpu_count()], help="logical CPUs of each Ray run"
    )
    args = ap.parse_args()
    run_bench(lambda work: bench(args, work), prefix="cpo-bench-tok-")


if __name__ == "__main__":
    main()
