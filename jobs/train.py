"""Train: CPO with Ray Train TorchTrainer + DeepSpeed (+ LoRA); exports <output_dir>/final (merged HF model).

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/train.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml

Needs jobs/prepare.py first. Re-running with the same `name` resumes from the last checkpoint.
"""

import argparse

import ray

from cpo_ray.config import load_config
from cpo_ray.pipeline import stage_train

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
args = ap.parse_args()

cfg = load_config(args.config, args.overrides)
ray.init()
stage_train(cfg)  # workers stream the tokenized shard, checkpoint every train.checkpoint_every steps
