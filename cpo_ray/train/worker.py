"""The per-worker function Ray Train runs: one DeepSpeed engine over a causal LM, trained on this rank's shard.

    trainer = TorchTrainer(train_loop, train_loop_config={"cfg": ..., "model_path": ..., "total_steps": ...})

`WorkerRun` reads top to bottom: build the engine (cpo_ray.train.engine) -> resume (cpo_ray.train.runstate)
-> one `for` over micro-batches (cpo_ray.train.microbatches) -> objective, backward, step, metrics -> held-out
scores, checkpoints from every rank -> the final checkpoint carries the export.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import zlib
from pathlib import Path

import torch

from cpo_ray.config import Config
from cpo_ray.contract import (
    ADAPTER,
    CHOSEN_IDS,
    EVAL,
    FINAL,
    METRIC_KEYS,
    PAIR_COLUMNS,
    PHASE_KEYS,
    TRAIN,
    RunPaths,
    has_rows,
)
from cpo_ray.train.collate import chosen_only
from cpo_ray.train.loss import Objective, PolicyLogps
from cpo_ray.train.runstate import resume, save_state


def train_loop(config: dict) -> None:
    """Per-worker function run by Ray Train."""
    WorkerRun(config).train()


class StepSums:
    """What the ranks add up once per optimizer step, as named views of ONE float64 buffer (one all_reduce):
    the metric sums (METRIC_KEYS order), non-pad tokens, each rank's forward+backward seconds and each rank's
    data digest (a rank fills only its own slot, so the sum gathers them)."""

    def __init__(self, world: int, device):
        n = len(METRIC_KEYS)
        self.buffer = torch.zeros(n + 1 + 2 * world, dtype=torch.float64, device=device)
        self.metrics = self.buffer[:n]
        self.tokens = self.buffer[n : n + 1]
        self.compute_s = self.buffer[n + 1 : n + 1 + world]
        self.digest = self.buffer[n + 1 + world :]


class WorkerRun:
    """One Ray Train worker, top to bottom: __init__ builds the engine and resumes, train() runs the loop,
    then the final held-out score, checkpoint and export. A plain class: its state is the run's state."""

    def __init__(self, config: dict):
        import ray.train

        from cpo_ray.compat import quiet_ray_train_report_logs
        from cpo_ray.model_source import loadable
        from cpo_ray.train.heldout import load_heldout_rows

        quiet_ray_train_report_logs()
        cfg = Config.model_validate(config["cfg"])  # the driver anchored its folders
        self.paths, self.log = RunPaths.of(cfg), config["run_log"]
        ctx = ray.train.get_context()
        model_path = loadable(config["model_path"])  # a node-local copy when the model is in storage
        self.setup(cfg, model_path, ctx.get_world_rank(), ctx.get_world_size(), config["total_steps"])
        self.state = resume(self.engine, self.log, self.rank, self.tc, self.total, cfg.model.lora.enabled)
        # The same answer on every rank (ZeRO-3 scoring is collective): is there a held-out split?
        self.has_heldout = has_rows(self.paths.split_dir(EVAL))
        self.heldout_rows = load_heldout_rows(self.paths.split_dir(EVAL), self.rank, self.world)

    def setup(self, cfg: Config, model_path: str, rank: int, world: int, total: int) -> None:
        """What a training step needs, in a process group of `world` ranks (Ray Train's, or any torch one):
        the engine, collate, objective and the ZeRO-0 gradient sync."""
        from cpo_ray.compat import disable_deepspeed_backward_allreduce
        from cpo_ray.model_source import load_tokenizer
        from cpo_ray.train.engine import build_engine
        from cpo_ray.train.gradsync import OverlappedGradSync
        from cpo_ray.train.model import torch_dtype

        self.cfg, self.tc, self.model_path = cfg, cfg.train, model_path
        self.rank, self.world, self.total = rank, world, total
        tc = self.tc
        torch.set_num_threads(tc.torch_threads or max(1, int(tc.cpus_per_worker)))
        torch.manual_seed(tc.seed + self.rank)
        self.pad_id = load_tokenizer(model_path, cfg.model.trust_remote_code).pad_token_id or 0
        self.objective = Objective.from_config(tc)
        use_gpu = tc.use_gpu and torch.cuda.is_available()
        self.engine, self.scheduler, self.clip_in_loop, self.collate = build_engine(
            cfg, model_path, world, total, use_gpu, self.pad_id
        )
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # ZeRO-0 data parallel: our overlapped all-reduce replaces DeepSpeed's post-backward one (fp32
        # only: DeepSpeed's bf16/fp16 optimizers keep their own gradient buffers).
        self.grad_sync = None
        fp32 = torch_dtype(cfg, use_gpu) == torch.float32
        if tc.overlap_grad_sync and tc.zero_stage == 0 and world > 1 and fp32:
            self.grad_sync = OverlappedGradSync(self.engine.module.parameters(), world)
            disable_deepspeed_backward_allreduce(self.engine)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        # Kept across epochs, as is DeepSpeed's accumulation, when a step spans an epoch boundary.
        self.sums = StepSums(world, self.engine.device)
        # Seconds per phase of this rank's step (summed over micro-batches): data wait + collate, forward +
        # loss, backward (DeepSpeed's own gradient reduction included), the wait for our overlapped
        # all-reduce (ZeRO-0), optimizer step, metrics all-reduce.
        self.phase = dict.fromkeys(PHASE_KEYS, 0.0)
        self.grad_norm = 0.0
        self.start = self.window_start = time.time()
        self.lap_start = time.perf_counter()

    def train(self) -> None:
        import ray.train

        from cpo_ray.train.microbatches import micro_batches, optimizer_steps

        tc, state = self.tc, self.state
        step = state["step"]
        self.start = self.window_start = time.time()
        metrics: dict = self.heldout(step) if step == 0 else {}
        if self.rank == 0 and metrics:  # the base model's held-out score: the curve's first point
            self.log.append.remote("metrics", {"step": 0, **metrics})
        self.engine.train()  # from_pretrained returns eval mode: LoRA dropout and checkpointing need train mode
        self.lap_start = time.perf_counter()
        shard = ray.train.get_dataset_shard(TRAIN)
        stream = micro_batches(shard, tc, state["epoch"], state["batch_in_epoch"], self.rank)
        for micro in optimizer_steps(stream, tc.grad_accum) if step < self.total else ():  # finished: nothing
            # The chosen NLL is one token mean over the WHOLE step: its denominator is known before the first
            # backward, so every split of the step (ranks x micro-batches) gives the one-device gradient.
            denominator = self.nll_denominator([raw for _, _, raw in micro])
            for epoch, i, raw in micro:
                self.micro_step(raw, denominator)
                state.update(epoch=epoch, batch_in_epoch=i + 1)
            step += 1
            state["step"] = step
            metrics = self.step_metrics(step)
            if tc.eval_every and step % tc.eval_every == 0 and step < self.total:
                metrics.update(self.heldout(step))
            if self.rank == 0:  # through Ray to the driver's console and the run's storage (cpo_ray.train.runlog)
                self.log.append.remote("metrics", metrics)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < self.total:
                self.checkpoint(metrics)
            elif step < self.total and (step % tc.report_every == 0 or "eval/accuracy" in metrics):
                # not on the last step: its report comes after the final evaluation and export, and a Tune
                # scheduler stops a trial at the first report that reaches max_t (losing both)
                ray.train.report(metrics)
            self.window_start = time.time()  # eval, checkpoint and report time stay out of tokens/s
            self.lap_start = time.perf_counter()
            if step >= self.total:
                break
        metrics.update(self.heldout(step))
        metrics["step"] = step
        if self.rank == 0:
            self.log.append.remote("metrics", {**metrics, "final": True})
        if self.tc.select_by is None:  # else the best evaluation was exported when it happened
            self.export()
        self.checkpoint(metrics)

    def nll_denominator(self, raws: list[dict]) -> float:
        """What each micro-batch divides its chosen log-probs by: the step's chosen tokens on ALL ranks (one
        all_reduce of a count, before the first backward) over the grad_accum x world micro-batches that
        DeepSpeed and the gradient sync average. Sum over those = the step's token-mean NLL, however split."""
        import torch.distributed as dist

        tokens = torch.tensor([float(sum(len(c) for raw in raws for c in raw[CHOSEN_IDS]))], dtype=torch.float64)
        if self.world > 1:
            tokens = tokens.to(self.engine.device)
            dist.all_reduce(tokens)
        return tokens.item() / (self.tc.grad_accum * self.world)

    def micro_step(self, raw: dict, nll_denominator: float) -> bool:
        """Collate, forward + loss, backward, optimizer step (DeepSpeed steps on boundaries only); returns
        whether this micro-batch ended an optimizer step."""
        engine, tc = self.engine, self.tc
        sft = self.state["step"] < tc.sft_steps  # warm-up: chosen responses only, NLL alone
        raw = chosen_only(raw) if sft else raw
        if tc.balance_ranks and self.world > 1:
            raw = self._balanced(raw)
        batch = self.collate(raw)
        self._lap("time/data_s")
        # One packed forward of the micro-batch's B + R sequences, through DeepSpeed's root module.
        logp, count = engine(batch)
        logps = PolicyLogps.split(logp, count, batch["num_chosen"], batch["rejected_group"])
        objective = self.objective.sft if sft else self.objective
        loss, values = objective(logps, nll_denominator)
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
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm))
        engine.step()
        self._lap("time/optimizer_s")
        self.sums.metrics += torch.stack([values[k].double() for k in METRIC_KEYS])
        self.sums.tokens += batch["tokens"]
        # Which pairs this rank trained: a CRC of the micro-batch's token ids (exact in float64 when summed).
        self.sums.digest[self.rank] += zlib.crc32(batch["input_ids"].numpy().tobytes())
        return boundary

    def _balanced(self, raw: dict) -> dict:
        """This rank's share of all ranks' micro-batches, token-balanced (cpo_ray.train.collate.balance_ranks)."""
        import torch.distributed as dist

        from cpo_ray.train.collate import balance_ranks

        parts = [None] * self.world
        dist.all_gather_object(parts, {k: raw[k] for k in PAIR_COLUMNS})
        return balance_ranks(parts, self.rank, self.tc.packing and self.tc.shared_prompt)

    def step_metrics(self, step: int) -> dict:
        """All ranks' sums for the step that just ended (one all_reduce), as metrics.jsonl's row."""
        import torch.distributed as dist

        engine, sums = self.engine, self.sums
        if engine.global_steps != step:  # cheap guard: our step count is DeepSpeed's optimizer steps
            raise RuntimeError(f"step {step} != DeepSpeed global_steps {engine.global_steps} (grad_accum bookkeeping)")
        sums.compute_s[self.rank] = self.phase["time/forward_s"] + self.phase["time/backward_s"]
        if self.world > 1:
            dist.all_reduce(sums.buffer)  # also where a fast rank waits for a slow one
        self._lap("time/metrics_sync_s")
        now = time.time()
        micro_batches = self.tc.grad_accum * self.world
        metrics = {k: v / micro_batches for k, v in zip(METRIC_KEYS, sums.metrics.tolist(), strict=True)}
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}  # the SFT warm-up has no preferences
        metrics["phase"] = "sft" if step <= self.tc.sft_steps else "cpo"
        metrics.update(step=step, epoch=self.state["epoch"], batch_in_epoch=self.state["batch_in_epoch"])
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["elapsed_s"] = round(now - self.start, 2)  # since this worker group started training
        metrics["grad_norm"] = self.grad_norm if self.clip_in_loop else float(engine.get_global_grad_norm() or 0.0)
        tokens = sums.tokens.item()
        metrics["tokens"] = int(tokens)  # non-pad tokens of this step, all workers
        metrics["tokens_per_s"] = tokens / max(now - self.window_start, 1e-9)
        # Straggler view: each rank's forward+backward compute; the spread is what ranks wait for.
        metrics["time/rank_compute_s"] = [round(x, 4) for x in sums.compute_s.tolist()]
        # Per rank, a digest of the token ids it trained this step: equal digests = the same pairs (resume checks).
        metrics["data/digest"] = [int(x) for x in sums.digest.tolist()]
        metrics.update({k: round(v, 4) for k, v in self.phase.items()})  # rank 0's phases
        self.phase = dict.fromkeys(PHASE_KEYS, 0.0)
        sums.buffer.zero_()
        return metrics

    def heldout(self, step: int) -> dict:
        """Held-out accuracy and margin of the model as it is now (all ranks; per-pair rows on rank 0)."""
        from cpo_ray.train.heldout import score_heldout

        if not self.has_heldout:
            return {}
        scores, per_pair = score_heldout(
            self.engine, self.heldout_rows, self.tc.eval_batch_size, self.collate, self.pad_id, self.world
        )
        if self.rank == 0 and per_pair:  # straight to the run's storage, from whichever node rank 0 is on
            self.paths.heldout_scores.write_text(json.dumps({"step": step, **scores, "pairs": per_pair}))
        self.select(step, scores)
        return scores

    def select(self, step: int, scores: dict) -> None:
        """train.select_by: when the held-out metric improves on every earlier evaluation, export now (all ranks:
        a collective under ZeRO-3) and record which step was picked and why (events.jsonl, the checkpoint)."""
        key, mode = self.tc.select_by, self.tc.select_mode
        if key is None:
            return
        best, value = self.state.get("best"), scores[key]
        if best is not None and not (value > best["value"] if mode == "max" else value < best["value"]):
            return
        self.export()
        self.state["best"] = {"step": step, "metric": key, "mode": mode, "value": value}
        if self.rank == 0:
            self.log.append.remote("events", {"event": "selected", "time": time.time(), **self.state["best"]})

    def checkpoint(self, metrics: dict) -> None:
        """Every rank saves its DeepSpeed shard and RNG states, and Ray Train uploads it from this node to the
        run's storage; rank 0 adds the step and data position. The run log is flushed first, so the metrics
        of every step the checkpoint covers are on storage when it is committed."""
        import ray
        import ray.train

        if self.rank == 0:
            ray.get(self.log.flush.remote())
        with tempfile.TemporaryDirectory() as tmp:
            # LoRA: the frozen base is the model on disk, so only trained weights go in (MB, not GB, per rank)
            self.engine.save_checkpoint(tmp, tag="ckpt", exclude_frozen_parameters=self.cfg.model.lora.enabled)
            save_state(Path(tmp), self.state, self.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # Wait until the controller has committed it: otherwise workers run ahead and a crash in
            # the next seconds restarts from the previous checkpoint (or from scratch).
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def export(self) -> None:
        """The merged model and the LoRA adapter, published by rank 0 to the run's storage (final/, adapter/):
        what serving and evaluation load, on whatever node they run. Collective under ZeRO-3."""
        from cpo_ray.train.model import export_model

        with tempfile.TemporaryDirectory() as tmp:
            export_model(self.engine, self.cfg, self.model_path, Path(tmp), self.rank)
            if self.rank == 0:
                self.paths.final.publish_from(Path(tmp) / FINAL, marker="config.json")
                if (Path(tmp) / ADAPTER).exists():
                    self.paths.adapter.publish_from(Path(tmp) / ADAPTER, marker="adapter_config.json")

    def _lap(self, key: str) -> None:
        now = time.perf_counter()
        self.phase[key] += now - self.lap_start
        self.lap_start = now
