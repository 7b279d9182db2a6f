"""The driver of the train stage: a Ray Train TorchTrainer over the tokenized train stream.

    result = run_training(cfg, model_path)     # -> <output_dir>/final (merged), adapter/ (LoRA), train_summary.json

Checks the architecture before any worker starts, counts the run's steps, runs the workers (cpo_ray.train.worker)
with the console following their progress (cpo_ray.train.progress), and copies the final checkpoint's export
into the run's folders.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cpo_ray.config import Config
from cpo_ray.contract import ADAPTER, CHECKPOINT_METRICS, FINAL, TRAIN, RunPaths
from cpo_ray.train.progress import following


def run_training(cfg: Config, model_path: str):
    """Driver: TorchTrainer over the tokenized train stream; copies the export into cfg.output_dir."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoConfig

    from cpo_ray.data.prepare import count_rows, train_stream
    from cpo_ray.train.heads import check_architecture
    from cpo_ray.train.microbatches import total_steps
    from cpo_ray.train.worker import train_loop

    cfg = RunPaths.anchored(cfg)
    tc, paths = cfg.train, RunPaths.of(cfg)
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    check_architecture(hf_config, tc.packing, cfg.model.attn_implementation)  # before any worker starts
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    total = total_steps(tc, count_rows(paths.split_dir(TRAIN)), tc.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "total_steps": total},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=paths.storage_path,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        ),
        datasets={TRAIN: train_stream(paths.split_dir(TRAIN))},
        # Ray Data in order: every run (and every restart) splits the same blocks to the same ranks in the same
        # order, so resuming skips exactly the micro-batches trained before the checkpoint.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    started = time.time()
    every = max(tc.log_every, total // 10)  # ~10 progress lines in a log; a terminal rewrites one line
    with following(paths, total, every):
        result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        for name, dest in ((FINAL, paths.final), (ADAPTER, paths.adapter)):
            if (Path(d) / name).exists():
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(Path(d) / name, dest)
        if (Path(d) / CHECKPOINT_METRICS).exists() and not paths.metrics.exists():
            shutil.copy(Path(d) / CHECKPOINT_METRICS, paths.metrics)
    summary = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    summary["train_seconds"] = round(time.time() - started, 1)
    paths.train_summary.write_text(json.dumps(summary, indent=2))
    return result
