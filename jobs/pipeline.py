"""Pipeline: prepare -> train -> export -> serve base + tuned -> evaluate through the endpoint -> report.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/tiny-cpu.yaml

Stages whose artifacts exist are skipped (`--force train` redoes one, `--skip eval` leaves one out).
Ends by printing the base-vs-tuned table and the path of <output_dir>/report.html.
"""

import argparse

import ray

from cpo_ray.config import load_config
from cpo_ray.pipeline import STAGES, run_pipeline

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--force", action="append", default=[], choices=STAGES, help="re-run a finished stage")
ap.add_argument("--skip", action="append", default=[], choices=STAGES, help="leave a stage out")
ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
args = ap.parse_args()

cfg = load_config(args.config, args.overrides)
ray.init()
timings = run_pipeline(cfg, force=set(args.force), skip=set(args.skip))
print(f"stage wall times (s): {timings}")
