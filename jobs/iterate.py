"""Online CPO: rounds of serve the policy -> sample K answers per training prompt -> score -> train -> evaluate.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/iterate.py --config configs/smollm2-135m-numbers-online-cpu.yaml

Finished rounds (and finished phases of a round) are skipped on a re-run; a round's training resumes from its
checkpoint. Ends with each round's greedy exact match and held-out accuracy, and <output_dir>/report.html.
Same options, overrides, messages and exit codes as `cpo-ray iterate`.
"""

from cpo_ray.cli import cmd_iterate, job

with job("iterate") as (cfg, args):
    cmd_iterate(cfg, args)  # rounds of sample -> score -> train, each evaluated through the endpoint
