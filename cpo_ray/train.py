"""CPO training: Ray Train TorchTrainer runs N workers, each a DeepSpeed engine over a causal LM.

    cpo-ray train --config configs/tiny-cpu.yaml train.max_steps=200

`train_loop` is the per-worker function and reads top to bottom: build the engine (cpo_ray.model) ->
resume -> one `for` over micro-batches (cpo_ray.stream) -> loss, backward, step, metrics -> held-out
scores, checkpoints from every rank -> export. `run_training` is the driver: it builds the TorchTrainer
and copies the exported model to `<output_dir>/final` (and `adapter/` with LoRA).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch

from cpo_ray.batch import chosen_only
from cpo_ray.config import Config
from cpo_ray.contract import (
    ADAPTER,
    CHECKPOINT_METRICS,
    CHECKPOINT_STATE,
    EVAL,
    FINAL,
    METRIC_KEYS,
    PAIR_COLUMNS,
    PHASE_KEYS,
    TRAIN,
    RunPaths,
)
from cpo_ray.loss import cpo_objective, sft_objective
from cpo_ray.runstate import append_row, following, resume


def train_loop(config: dict) -> None:
    """Per-worker function run by Ray Train."""
    WorkerRun(config).train()


class WorkerRun:
    """One Ray Train worker, top to bottom: __init__ builds the engine and resumes, train() runs the loop,
    then the final held-out score, checkpoint and export. A plain class: its state is the run's state."""

    def __init__(self, config: dict):
        import ray.train

        from cpo_ray.compat import disable_deepspeed_backward_allreduce, quiet_ray_train_report_logs
        from cpo_ray.gradsync import OverlappedGradSync
        from cpo_ray.heldout import load_heldout_rows
        from cpo_ray.model import build_engine, load_tokenizer, torch_dtype

        quiet_ray_train_report_logs()
        cfg = self.cfg = Config.model_validate(config["cfg"])  # the driver anchored its folders
        t = self.t = cfg.train
        self.paths, self.total, self.model_path = RunPaths.of(cfg), config["total_steps"], config["model_path"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))
        torch.manual_seed(t.seed + self.rank)
        self.pad_id = load_tokenizer(self.model_path, cfg.model.trust_remote_code).pad_token_id or 0

        use_gpu = t.use_gpu and torch.cuda.is_available()
        self.engine, self.scheduler, self.clip_in_loop, self.collate = build_engine(
            cfg, self.model_path, self.world, self.total, use_gpu, self.pad_id
        )
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # ZeRO-0 data parallel: our overlapped all-reduce replaces DeepSpeed's post-backward one (fp32
        # only: DeepSpeed's bf16/fp16 optimizers keep their own gradient buffers).
        self.grad_sync = None
        if t.overlap_grad_sync and t.zero_stage == 0 and self.world > 1 and torch_dtype(cfg, use_gpu) == torch.float32:
            self.grad_sync = OverlappedGradSync(self.engine.module.parameters(), self.world)
            disable_deepspeed_backward_allreduce(self.engine)
        self.state = resume(self.engine, self.paths, self.rank, t, self.total)
        # The same answer on every rank (ZeRO-3 scoring is collective): is there a held-out split?
        self.has_heldout = any(self.paths.split_dir(EVAL).glob("*.parquet"))
        self.heldout_rows = load_heldout_rows(self.paths.split_dir(EVAL), self.rank, self.world)
        # [metric sums..., tokens, per-rank forward+backward seconds x world, per-rank data digest x world]:
        # one all_reduce per step; kept across epochs, as is DeepSpeed's accumulation, when a step spans an
        # epoch boundary.
        self.sums = torch.zeros(len(METRIC_KEYS) + 1 + 2 * self.world, dtype=torch.float64, device=self.engine.device)
        # Seconds per phase of this rank's step (summed over micro-batches): data wait + collate, forward +
        # loss, backward (DeepSpeed's own gradient reduction included), the wait for our overlapped
        # all-reduce (ZeRO-0), optimizer step, metrics all-reduce.
        self.phase = dict.fromkeys(PHASE_KEYS, 0.0)
        self.grad_norm = 0.0

    def train(self) -> None:
        import ray.train

        from cpo_ray.stream import micro_batches

        t, state = self.t, self.state
        step = self.start_step = state["step"]
        self.start = self.window_t = time.time()
        metrics: dict = self.heldout(step) if step == 0 else {}
        if self.rank == 0 and metrics:  # the base model's held-out score: the curve's first point
            append_row(self.paths.metrics, {"step": 0, **metrics})
        self.engine.train()  # from_pretrained returns eval mode: LoRA dropout and checkpointing need train mode
        self.t_mark = time.perf_counter()
        shard = ray.train.get_dataset_shard(TRAIN)
        for epoch, i, raw in micro_batches(shard, t, state["epoch"], state["batch_in_epoch"], self.rank):
            boundary = self.micro_step(raw)
            state.update(epoch=epoch, batch_in_epoch=i + 1)
            if not boundary:
                continue
            step += 1
            state["step"] = step
            metrics = self.step_metrics(step)
            if t.eval_every and step % t.eval_every == 0 and step < self.total:
                metrics.update(self.heldout(step))
            if self.rank == 0:  # the driver follows metrics.jsonl for the console (cpo_ray.runstate.follow)
                append_row(self.paths.metrics, metrics)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < self.total:
                self.checkpoint(metrics)
            elif step % t.report_every == 0 or "eval/accuracy" in metrics:
                ray.train.report(metrics)
            self.window_t = time.time()  # eval, checkpoint and report time stay out of tokens/s
            self.t_mark = time.perf_counter()
            if step >= self.total:
                break
        metrics.update(self.heldout(step))
        metrics["step"] = step
        if self.rank == 0:
            append_row(self.paths.metrics, {**metrics, "final": True})
        self.checkpoint(metrics, final=True)

    def micro_step(self, raw: dict) -> bool:
        """Collate, forward + loss, backward, optimizer step (DeepSpeed steps on boundaries only); returns
        whether this micro-batch ended an optimizer step."""
        engine, t = self.engine, self.t
        sft = self.state["step"] < self.t.sft_steps  # warm-up: chosen responses only, NLL alone
        raw = chosen_only(raw) if sft else raw
        if t.balance_ranks and self.world > 1:
            raw = self._balanced(raw)
        batch = self.collate(raw)
        self._lap("time/data_s")
        loss, m = _cpo_forward(engine, batch, t, sft)
        self._lap("time/forward_s")
        # Asked before step(): DeepSpeed's answer afterwards is about the NEXT micro-batch.
        boundary = engine.is_gradient_accumulation_boundary()
        if self.grad_sync:
            self.grad_sync.prepare(boundary)
        engine.backward(loss)
        self._lap("time/backward_s")
        if self.grad_sync:
            self.grad_sync.finish()  # the wait for the last buckets (and for slower ranks)
            self._lap("time/grad_sync_s")
        if self.clip_in_loop and boundary:  # same clip as DeepSpeed's, but the norm is kept for the metrics
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm))
        engine.step()
        self._lap("time/optimizer_s")
        n_m = len(METRIC_KEYS)
        self.sums[:n_m] += torch.stack([m[k].double() for k in METRIC_KEYS])
        self.sums[n_m] += batch["tokens"]
        # Which pairs this rank trained: a CRC of the micro-batch's token ids (exact in float64 when summed).
        self.sums[n_m + 1 + self.world + self.rank] += zlib.crc32(batch["input_ids"].numpy().tobytes())
        return boundary

    def _balanced(self, raw: dict) -> dict:
        """This rank's share of all ranks' micro-batches, token-balanced (cpo_ray.batch.balance_ranks)."""
        import torch.distributed as dist

        from cpo_ray.batch import balance_ranks

        parts = [None] * self.world
        dist.all_gather_object(parts, {k: raw[k] for k in PAIR_COLUMNS})
        return balance_ranks(parts, self.rank, self.t.packing and self.t.shared_prompt)

    def step_metrics(self, step: int) -> dict:
        """All ranks' metric sums for the step that just ended (one all_reduce), as metrics.jsonl's row."""
        import torch.distributed as dist

        engine, sums, n_m = self.engine, self.sums, len(METRIC_KEYS)
        if engine.global_steps != step:  # cheap guard: our step count is DeepSpeed's optimizer steps
            raise RuntimeError(f"step {step} != DeepSpeed global_steps {engine.global_steps} (grad_accum bookkeeping)")
        sums[n_m + 1 + self.rank] = self.phase["time/forward_s"] + self.phase["time/backward_s"]
        if self.world > 1:
            dist.all_reduce(sums)  # also where a fast rank waits for a slow one
        self._lap("time/metrics_sync_s")
        now = time.time()
        metrics = {k: sums[j].item() / (self.t.grad_accum * self.world) for j, k in enumerate(METRIC_KEYS)}
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}  # the SFT warm-up has no preferences
        metrics["phase"] = "sft" if step <= self.t.sft_steps else "cpo"
        metrics.update(step=step, epoch=self.state["epoch"], batch_in_epoch=self.state["batch_in_epoch"])
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["elapsed_s"] = round(now - self.start, 2)  # since this worker group started training
        metrics["grad_norm"] = self.grad_norm if self.clip_in_loop else float(engine.get_global_grad_norm() or 0.0)
        metrics["tokens"] = int(sums[n_m].item())  # non-pad tokens of this step, all workers
        metrics["tokens_per_s"] = sums[n_m].item() / max(now - self.window_t, 1e-9)
        # Straggler view: each rank's forward+backward compute; the spread is what ranks wait for.
        metrics["time/rank_compute_s"] = [round(x, 4) for x in sums[n_m + 1 : n_m + 1 + self.world].tolist()]
        # Per rank, a digest of the token ids it trained this step: equal digests = the same pairs (resume checks).
        metrics["data/digest"] = [int(x) for x in sums[n_m + 1 + self.world :].tolist()]
        metrics.update({k: round(v, 4) for k, v in self.phase.items()})  # rank 0's phases
        self.phase = dict.fromkeys(PHASE_KEYS, 0.0)
        sums.zero_()
        return metrics

    def heldout(self, step: int) -> dict:
        """Held-out accuracy and margin of the model as it is now (all ranks; per-pair rows on rank 0)."""
        from cpo_ray.heldout import score_heldout

        if not self.has_heldout:
            return {}
        scores, per_pair = score_heldout(
            self.engine, self.heldout_rows, self.t.eval_batch_size, self.collate, self.pad_id, self.world
        )
        if self.rank == 0 and per_pair:
            self.paths.heldout_scores.write_text(json.dumps({"step": step, **scores, "pairs": per_pair}))
        return scores

    def checkpoint(self, metrics: dict, final: bool = False) -> None:
        """Every rank saves its DeepSpeed shard and reports it; the final one also carries the export."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag="ckpt")
            if self.rank == 0:
                (Path(tmp) / CHECKPOINT_STATE).write_text(json.dumps(self.state))
            if final:
                from cpo_ray.model import export_model

                export_model(self.engine, self.cfg, self.model_path, Path(tmp), self.rank)
                if self.rank == 0 and self.paths.metrics.exists():
                    shutil.copy(self.paths.metrics, Path(tmp) / CHECKPOINT_METRICS)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # Wait until the controller has committed it: otherwise workers run ahead and a crash in
            # the next seconds restarts from the previous checkpoint (or from scratch).
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def _lap(self, key: str) -> None:
        now = time.perf_counter()
        self.phase[key] += now - self.t_mark
        self.t_mark = now


def _cpo_forward(engine, batch: dict, t, sft: bool):
    """One packed forward of the micro-batch's B + R sequences (through DeepSpeed's root) -> (loss, metrics):
    the CPO objective, or in the SFT warm-up the chosen NLL alone."""
    logp, count = engine(batch)
    b = batch["num_chosen"]
    if sft:
        return sft_objective(logp[:b], count[:b])
    return cpo_objective(
        logp[:b],
        logp[b:],
        count[:b],
        count[b:],
        rejected_group=batch["rejected_group"].to(logp.device),
        loss_type=t.loss_type,
        beta=t.beta,
        cpo_alpha=t.cpo_alpha,
        label_smoothing=t.label_smoothing,
        simpo_gamma=t.simpo_gamma,
        alpha=t.alpha,
        length_normalize=t.length_normalize,
    )


def run_training(cfg: Config, model_path: str):
    """Driver: TorchTrainer over the tokenized train stream; copies the export into cfg.output_dir."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoConfig

    from cpo_ray.data import count_rows, train_stream
    from cpo_ray.heads import check_architecture
    from cpo_ray.stream import total_steps

    cfg = RunPaths.anchored(cfg)
    t, paths = cfg.train, RunPaths.of(cfg)
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    check_architecture(hf_config, t.packing, cfg.model.attn_implementation)  # before any worker starts
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    total = total_steps(t, count_rows(paths.split_dir(TRAIN)), t.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "total_steps": total},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=paths.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets={TRAIN: train_stream(paths.split_dir(TRAIN))},
        # Ray Data in order: every run (and every restart) splits the same blocks to the same ranks in the same
        # order, so resuming skips exactly the micro-batches trained before the checkpoint.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    t0 = time.time()
    every = max(t.log_every, total // 10)  # ~10 progress lines in a log; a terminal rewrites one line
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
    summary["train_seconds"] = round(time.time() - t0, 1)
    paths.train_summary.write_text(json.dumps(summary, indent=2))
    return result
