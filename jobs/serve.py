"""Serve: base and tuned models behind one OpenAI-compatible API (Ray Serve LLM + vLLM), left running.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/serve.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml

The app stays up after the job ends (it lives on the cluster); stop it with
`ray job submit ... -- python jobs/serve.py --config C --stop` or `cpo-ray serve --stop`.
Same options, overrides, messages and exit codes as `cpo-ray serve --detach`.
"""

from cpo_ray.cli import init_ray, job
from cpo_ray.serve import served_models, start_server, stop_server

with job("serve") as (cfg, args):
    init_ray()  # the job's cluster: the app must outlive this driver
    if args.stop:
        stop_server()
    else:
        models = dict(m.split("=", 1) for m in args.model) if args.model else served_models(cfg)  # base + tuned
        start_server(cfg.serve, models, detached=True)
