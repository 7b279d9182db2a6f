"""CPO training with Ray Train TorchTrainer + DeepSpeed; exports <output_dir>/final (merged HF model).

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/train.py --config configs/qwen2.5-0.5b-lora-1gpu.yaml

Re-running with the same `name` resumes from the last checkpoint. Needs `jobs/prepare.py` first.
"""

import sys

from cpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
