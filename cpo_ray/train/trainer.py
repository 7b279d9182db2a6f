"""The driver of the train stage: a Ray Train TorchTrainer over the tokenized train stream.

    result = run_training(cfg, model_path)     # -> <output_dir>/final (merged), adapter/ (LoRA), train_summary.json

Checks the architecture (and a resume's batch layout) before any worker starts, counts the run's steps, runs the
workers (cpo_ray.train.worker) with the console following their progress through the run log
(cpo_ray.train.runlog, cpo_ray.train.progress). Nothing here reads a file a worker wrote on its own disk.
"""

from __future__ import annotations

import json
import time

import ray

from cpo_ray.config import Config, ConfigError
from cpo_ray.contract import EVAL, TRAIN, RunPaths, has_rows
from cpo_ray.train.progress import following


def run_training(cfg: Config, model_path: str, callbacks: list | None = None):
    """Driver: TorchTrainer over the tokenized train stream. Rank 0 publishes the export to the run's storage
    (final/, adapter/); checkpoints go from every rank to train.storage_path; the run log (an actor on this
    node) carries metrics and events to the console and to storage. `callbacks`: Ray Train callbacks (a Tune
    trial passes its TuneReportCallback). Returns Ray Train's Result."""
    from cpo_ray.data.prepare import count_rows
    from cpo_ray.model_source import model_config
    from cpo_ray.train import runlog
    from cpo_ray.train.heads import check_architecture
    from cpo_ray.train.microbatches import total_steps
    from cpo_ray.train.runstate import check_layout

    cfg = RunPaths.anchored(cfg)
    tc, paths = cfg.train, RunPaths.of(cfg)
    # before any worker starts: an architecture we cannot score like its forward(), a resume under another layout
    check_architecture(model_config(model_path, cfg.model.trust_remote_code), tc.packing, cfg.model.attn_implementation)
    check_layout(paths.storage, cfg.name, tc)
    if tc.select_by and not has_rows(paths.split_dir(EVAL)):
        raise ConfigError(f"train.select_by={tc.select_by} picks the best held-out evaluation, but there are no "
                          f"held-out pairs in {paths.split_dir(EVAL)}: set data.eval_files or data.eval_split")  # fmt: skip
    total = total_steps(tc, count_rows(paths.split_dir(TRAIN)), tc.num_workers)
    log = runlog.start(cfg)
    trainer = _trainer(cfg, model_path, total, log, callbacks)
    started = time.time()
    every = max(tc.log_every, total // 10)  # ~10 progress lines in a log; a terminal rewrites one line
    with following(log, total, every):
        result = trainer.fit()
    ray.get(log.close.remote())  # persisted, and the trackers' runs closed
    if result.error:
        raise result.error
    summary = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    selected = [e for e in ray.get(log.read.remote("events")) if e.get("event") == "selected"]
    if selected:  # final/ is that evaluation's model, not the last step's
        summary["selected"] = {k: selected[-1][k] for k in ("step", "metric", "mode", "value")}
    summary["train_seconds"] = round(time.time() - started, 1)
    paths.train_summary.write_text(json.dumps(summary, indent=2))
    return result


def _trainer(cfg: Config, model_path: str, total: int, log, callbacks: list | None):
    """The TorchTrainer of a run: its workers, storage, failure and checkpoint settings, the ordered stream."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cpo_ray.data.prepare import train_stream
    from cpo_ray.train.worker import train_loop

    tc, paths = cfg.train, RunPaths.of(cfg)
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": 1} if tc.use_gpu else {})
    config = {"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "total_steps": total, "run_log": log}
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            # with a filesystem object Ray Train wants the path inside it ("bucket/prefix", not "s3://...")
            storage_path=paths.storage.path,
            storage_filesystem=paths.storage.fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets={TRAIN: train_stream(paths.split_dir(TRAIN))},
        # Ray Data in order: every run (and every restart) splits the same blocks to the same ranks in the same
        # order, on one node or many, so resuming skips exactly the micro-batches trained before the checkpoint.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
