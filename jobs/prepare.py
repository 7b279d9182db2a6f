"""Prepare: preference shards -> tokenized Parquet (train + held-out) + prepare_report.json, on Ray Data.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/prepare.py --config configs/tiny-cpu.yaml

Locally (starts its own Ray): python jobs/prepare.py --config configs/tiny-cpu.yaml data.max_length=256
"""

import argparse

import ray

from cpo_ray.config import load_config
from cpo_ray.pipeline import stage_prepare

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=256")
args = ap.parse_args()

cfg = load_config(args.config, args.overrides)
ray.init()  # joins the job's cluster under `ray job submit`, else starts a local one
report = stage_prepare(cfg)  # fails with a clear message when too many rows are rejected
print(f"rows read {report['rows_read']}, kept {report['rows_kept']}, rejected {report['rows_rejected']}")
