"""Serve: base and tuned models behind one OpenAI-compatible API (Ray Serve LLM + vLLM), left running.

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/serve.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml

The app stays up after the job ends (it lives on the cluster); stop it with
`ray job submit ... -- python jobs/serve.py --config C --stop` or `cpo-ray serve --stop`.
"""

import argparse

import ray

from cpo_ray.config import load_config
from cpo_ray.pipeline import served_models
from cpo_ray.serve import start_server, stop_server

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--stop", action="store_true", help="shut the Serve app down")
ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8001")
args = ap.parse_args()

cfg = load_config(args.config, args.overrides)
ray.init()
if args.stop:
    stop_server()
else:
    models = served_models(cfg)  # {"base": model, "tuned": <output_dir>/final} unless serve.models is set
    url = start_server(cfg.serve, models, detached=True)
    print(f"serving {sorted(models)} at {url}")
