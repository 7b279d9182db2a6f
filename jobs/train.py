"""Train: CPO with Ray Train TorchTrainer + DeepSpeed (+ LoRA); exports <output_dir>/final (merged HF model).

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/train.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml

Needs jobs/prepare.py first. Re-running with the same `name` resumes from the last checkpoint.
Same options, overrides, messages and exit codes as `cpo-ray train`.
"""

from cpo_ray.cli import cmd_train, job

with job("train") as (cfg, args):
    cmd_train(cfg, args)  # workers stream the tokenized shard, checkpoint every train.checkpoint_every steps, export
