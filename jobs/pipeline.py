"""Pipeline: prepare -> train -> export -> serve base + tuned -> evaluate through the endpoint -> report.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/tiny-cpu.yaml

Stages whose artifacts exist are skipped (`--force train` redoes one, `--skip eval` leaves one out).
Ends by printing the base-vs-tuned table and the path of <output_dir>/report.html.
Same options, overrides, messages and exit codes as `cpo-ray pipeline`.
"""

from cpo_ray.cli import cmd_pipeline, job

with job("pipeline") as (cfg, args):
    cmd_pipeline(cfg, args)  # prepare -> train -> serve + eval -> report; finished stages are skipped
