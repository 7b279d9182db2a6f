"""Serve: base and tuned models behind one OpenAI-compatible API (Ray Serve LLM + vLLM), left running.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/serve.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml

The app stays up after the job ends (it lives on the cluster); stop it with
`ray job submit ... -- python jobs/serve.py --config C --stop` or `cpo-ray serve --stop`.
Same options, overrides, messages and exit codes as `cpo-ray serve --detach`.
"""

from cpo_ray.cli import cmd_serve, init_ray, job

with job("serve") as (cfg, args):
    init_ray()  # the job's cluster: the app must outlive this driver
    args.detach = True
    cmd_serve(cfg, args)  # base + tuned unless --model id=/path; --stop shuts the app down
