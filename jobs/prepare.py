"""Prepare: preference shards -> tokenized Parquet (train + held-out) + prepare_report.json, on Ray Data.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/prepare.py --config configs/tiny-cpu.yaml

Locally (starts its own Ray): python jobs/prepare.py --config configs/tiny-cpu.yaml data.max_length=256
Same options, overrides, messages and exit codes as `cpo-ray prepare`.
"""

from cpo_ray.cli import cmd_prepare, job

with job("prepare") as (cfg, args):
    cmd_prepare(cfg, args)  # Ray Data: read -> normalise -> tokenize -> Parquet; exit 1 when too many rows are rejected
