"""Sweep: a Ray Tune search over the config's sweep.params, each trial a TorchTrainer on the same prepared data.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/sweep.py --config configs/tiny-cpu-sweep.yaml

A scheduler (ASHA) stops trials that fall behind on the held-out metric; the best trial's model lands in
<output_dir>/final. A stopped sweep resumes from its Tune state on a re-run. Same options, overrides, messages
and exit codes as `cpo-ray sweep`.
"""

from cpo_ray.cli import cmd_sweep, job

with job("sweep") as (cfg, args):
    cmd_sweep(cfg, args)  # trials under the scheduler -> the trials table -> report.html
