"""Tokenization throughput: the Ray Data pipeline vs single-process loops, same tokenizer, same data.

Run from the repository root:

    .venv/bin/python -m bench.tokenize_throughput [--copies 8] [--tokenizer embedded|PATH]
    .venv/bin/python -m bench.tokenize_throughput --copies 1 --num-cpus 2     # quick smoke run

Data: ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz (2,312 real HH-RLHF pairs), written as
`--copies` JSONL shards so there is enough work to spread. Contenders, in one run:
  loop      the usual per-row script: json.loads -> normalise -> tokenizer() x3 -> truncate
  batched   the pipeline's own Tokenize UDF in this one process (batched tokenizer calls)
  ray_data  cpo-ray's Ray Data pipeline (read tasks + tokenizer actor pool, all CPUs of a local Ray this
            script starts in its own temp folder and shuts down)
Prints ONE JSON object on stdout (everything else goes to stderr): pairs/s of each and the ratios vs
`loop`. Ray start-up is excluded (timed separately); actor start-up is included. Not a test: numbers
depend on the machine and its load (the JSON carries the load average before and after).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

from bench.common import HH, local_ray, run_bench


def loop_baseline(files: list[str], tokenizer, max_length: int) -> tuple[int, int]:
    from cpo_ray.formats import detect_format, normalize
    from cpo_ray.tokenize import RowError, Special, truncate_pair

    sp = Special.of(tokenizer)
    kept = rejected = 0
    for f in files:
        for line in Path(f).read_text().splitlines():
            try:
                rec = json.loads(line)
                p, c, r = normalize(rec, detect_format(rec), tokenizer)
                pi = tokenizer(p)["input_ids"]
                ci = tokenizer(c, add_special_tokens=False)["input_ids"] + [sp.eos_id]
                ri = tokenizer(r, add_special_tokens=False)["input_ids"] + [sp.eos_id]
                truncate_pair(pi, ci, ri, max_length)
                kept += 1
            except RowError:
                rejected += 1
    return kept, rejected


def batched_single(files: list[str], model_path: str, cfg) -> int:
    from cpo_ray.data import READ_BATCH, Tokenize, read_file

    udf = Tokenize(model_path, cfg.data.model_dump())
    n = 0
    for f in files:
        for batch in read_file({"path": [f]}):
            for i in range(0, len(batch["raw"]), READ_BATCH):
                n += udf({k: v[i : i + READ_BATCH] for k, v in batch.items()}).num_rows
    return n


def ray_data(files: list[str], model_path: str, cfg) -> int:
    from cpo_ray.data import tokenized_dataset

    return sum(
        b.num_rows
        for b in tokenized_dataset(files, cfg, model_path).iter_batches(batch_format="pyarrow", batch_size=None)
    )


def bench(args, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from cpo_ray.config import load_config
    from cpo_ray.embedded import build_embedded_model

    model_path = str(build_embedded_model(tmp / "model")) if args.tokenizer == "embedded" else args.tokenizer
    text = gzip.decompress(HH.read_bytes()).decode()
    files = []
    for i in range(args.copies):
        (tmp / f"shard-{i:02d}.jsonl").write_text(text)
        files.append(str(tmp / f"shard-{i:02d}.jsonl"))
    pairs = args.copies * len(text.splitlines())
    cfg = load_config(None, [f"data.max_length={args.max_length}", "data.format=implicit"])
    tok = AutoTokenizer.from_pretrained(model_path)

    res: dict = {"pairs": pairs, "copies": args.copies, "cpus": args.num_cpus, "tokenizer": args.tokenizer}
    t = time.perf_counter()
    kept, rejected = loop_baseline(files, tok, args.max_length)
    res["loop_s"] = time.perf_counter() - t
    t = time.perf_counter()
    assert batched_single(files, model_path, cfg) == pairs
    res["batched_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with local_ray(args.num_cpus, tmp / "ray", logging_level="ERROR"):
        res["ray_init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        assert ray_data(files, model_path, cfg) == pairs
        res["ray_data_s"] = time.perf_counter() - t
        t = time.perf_counter()
        assert ray_data(files, model_path, cfg) == pairs  # second run: workers warm, as in a longer job
        res["ray_data_warm_s"] = time.perf_counter() - t
    for k in ("loop", "batched", "ray_data", "ray_data_warm"):
        res[f"{k}_pairs_per_s"] = round(pairs / res[f"{k}_s"], 1)
    for k in ("batched", "ray_data", "ray_data_warm"):
        res[f"ratio_{k}_vs_loop"] = round(res[f"{k}_pairs_per_s"] / res["loop_pairs_per_s"], 2)
    res["loop_kept"], res["loop_rejected"] = kept, rejected
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--tokenizer", default="embedded", help="embedded (byte-level) or a local HF tokenizer folder")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs of the local Ray")
    args = ap.parse_args()
    run_bench(lambda work: bench(args, work), prefix="cpo-bench-tok-")


if __name__ == "__main__":
    main()
