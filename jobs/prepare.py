"""Tokenize preference shards to Parquet on Ray Data (train + held-out) with a prepare report.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/prepare.py --config configs/tiny-cpu.yaml

Locally (starts its own Ray): python jobs/prepare.py --config configs/tiny-cpu.yaml data.max_length=256
"""

import sys

from cpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
