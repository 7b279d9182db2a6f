"""CPO training: Ray Train TorchTrainer runs N workers, each a DeepSpeed engine over a causal LM.

    cpo-ray train --config configs/tiny-cpu.yaml train.max_steps=200

`train_loop` is the per-worker function and reads top to bottom: build model (full or LoRA) ->
DeepSpeed (ZeRO 0-3, optional offload) -> resume -> stream the dataset shard -> loss, step, report ->
checkpoint from every rank -> export. `run_training` is the driver: it builds the TorchTrainer,
copies the exported model to `<output_dir>/final` (and `adapter/` with LoRA).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cpo_ray.batch import (
    VARLEN_ATTENTION,
    collate_packed,
    collate_padded,
    collate_varlen,
    length_grouped,
    sequence_logps,
    use_varlen_attention,
)
from cpo_ray.config import Config
from cpo_ray.gradsync import OverlappedGradSync
from cpo_ray.loss import cpo_objective

PHASES = (
    "time/data_s",
    "time/forward_s",
    "time/backward_s",
    "time/grad_sync_s",
    "time/optimizer_s",
    "time/metrics_sync_s",
)
STATE_FILE = "cpo_state.json"  # step + data position, next to DeepSpeed's files in each checkpoint
METRIC_KEYS = [
    "loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


def lr_lambda(cfg, total_steps: int):
    """Linear warmup, then cosine/linear decay to min_lr_ratio (constant: flat after warmup)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def deepspeed_config(cfg: Config, world: int, bf16: bool, clip_in_loop: bool = False) -> dict:
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        # ZeRO-0 fp32: the loop clips (DeepSpeed's fp32 clip discards the norm it computes)
        "gradient_clipping": 0.0 if clip_in_loop else t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # A client torch AdamW: DeepSpeed's own CPU Adam compiles a C++ op for minutes on first use.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model(cfg: Config, model_path: str, dtype: torch.dtype):
    """transformers causal LM, LoRA-wrapped when cfg.model.lora.enabled."""
    from transformers import AutoModelForCausalLM

    m = cfg.model
    kwargs = {"dtype": dtype, "trust_remote_code": m.trust_remote_code, "use_safetensors": True}
    if m.attn_implementation and m.attn_implementation != VARLEN_ATTENTION:  # ours is set after loading
        kwargs["attn_implementation"] = m.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
        if m.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def lora_config(cfg: Config):
    """The peft LoraConfig of cfg.model.lora: the trainer and the exporter must build the same structure."""
    from peft import LoraConfig

    lo = cfg.model.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        modules_to_save=lo.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def load_eval_pairs(data_dir: str, rank: int, world: int) -> list[dict]:
    """This rank's share of the held-out split (row i goes to rank i % world), with global indices."""
    import pyarrow.parquet as pq

    path = Path(data_dir) / "eval"
    files = sorted(path.glob("*.parquet"))
    if not files:
        return []
    table = pq.read_table(files[0].parent, columns=["prompt_ids", "chosen_ids", "rejected_ids"])
    rows = table.to_pylist()
    return [dict(r, index=i) for i, r in enumerate(rows) if i % world == rank]


def _as_batch(rows: list[dict]) -> dict:
    return {
        k: np.array([np.asarray(r[k], dtype=np.int64) for r in rows] + [None], dtype=object)[:-1]
        for k in ("prompt_ids", "chosen_ids", "rejected_ids")
    }  # noqa: E501


def evaluate(engine, rows: list[dict], cfg: Config, pad_id: int, world: int) -> tuple[dict, list[dict]]:
    """Held-out accuracy and margin (summed logps), all ranks together; ZeRO-3 needs every rank to run
    the same number of forwards, so short ranks repeat their last batch and drop its results."""
    import torch.distributed as dist

    bs = cfg.train.micro_batch_size
    n_local = torch.tensor([math.ceil(len(rows) / bs)], device=engine.device)
    if world > 1:
        dist.all_reduce(n_local, op=dist.ReduceOp.MAX)
    engine.eval()
    out = []
    with torch.no_grad():
        for b in range(int(n_local.item())):
            chunk = rows[b * bs : (b + 1) * bs]
            real = bool(chunk)
            chunk = chunk or rows[-bs:] or None
            if chunk is None:  # a rank with no eval rows at all still joins the collectives
                continue
            logp, _ = sequence_logps(engine.module, collate_padded(_as_batch(chunk), pad_id))
            if real:
                k = len(chunk)
                for r, c, j in zip(chunk, logp[:k].tolist(), logp[k:].tolist(), strict=True):
                    out.append({"index": r["index"], "logp_chosen": c, "logp_rejected": j})
    engine.train()
    local = torch.tensor(
        [
            len(out),
            sum(o["logp_chosen"] > o["logp_rejected"] for o in out),
            sum(o["logp_chosen"] - o["logp_rejected"] for o in out),
        ],
        dtype=torch.float64,
        device=engine.device,
    )
    if world > 1:
        dist.all_reduce(local)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, out)
        out = [o for part in gathered for o in part]
    n = max(local[0].item(), 1)
    return {
        "eval/accuracy": local[1].item() / n,
        "eval/margin": local[2].item() / n,
        "eval/n": int(local[0].item()),
    }, sorted(out, key=lambda o: o["index"])  # noqa: E501


def export_model(engine, cfg: Config, model_path: str, out_dir: Path, rank: int) -> None:
    """Merged HF model (safetensors + tokenizer) to out_dir/final, and the adapter to out_dir/adapter.

    Under ZeRO-3 the parameters are partitioned: every rank joins the gather, rank 0 writes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.train.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; None off rank 0
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    state = {k: v.detach().cpu() for k, v in state.items()}
    # A fresh copy of the base in its own dtype (a bf16 model exports as bf16, not a 2x fp32 copy),
    # given the same peft structure as the trained module, so the gathered state loads key for key.
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype="auto", trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True
    )
    if cfg.model.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model.config.tie_word_embeddings
    if unexpected or [k for k in missing if not (tied and "lm_head" in k)]:
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.model.lora.enabled:
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    merged = model
    merged.config.use_cache = True
    merged.save_pretrained(out_dir / "final", safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir / "final")


def train_loop(config: dict) -> None:
    """Per-worker function run by Ray Train."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers import AutoTokenizer

    _quiet_ray_train_reports()
    cfg = Config.model_validate(config["cfg"])
    model_path, data_dir, out_dir = config["model_path"], config["data_dir"], Path(config["output_dir"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed + rank)
    use_gpu = t.use_gpu and torch.cuda.is_available()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        cfg.model.dtype, torch.bfloat16 if use_gpu else torch.float32
    )
    pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0

    # Build: model -> client AdamW + schedule -> DeepSpeed engine.
    model = build_model(cfg, model_path, torch.float32 if dtype == torch.bfloat16 else dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    clip_in_loop = t.zero_stage == 0 and dtype == torch.float32 and t.max_grad_norm > 0
    # fused: one kernel over all tensors; on CPU ~5x faster than the per-tensor loop (27M params:
    # 0.03 s vs 0.17 s per step at 1 thread), the same update.
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, t.max_steps))
    # The shared-memory comm op is only used with LOCAL_SIZE set; building it costs ~40 s per start.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, dtype == torch.bfloat16, clip_in_loop),
        dist_init_required=False,
    )

    # ZeRO-0 data parallel: our overlapped all-reduce replaces DeepSpeed's post-backward one (fp32
    # only: DeepSpeed's bf16/fp16 optimizers keep their own gradient buffers).
    grad_sync = None
    if t.overlap_grad_sync and t.zero_stage == 0 and world > 1 and dtype == torch.float32:
        grad_sync = OverlappedGradSync(engine.module.parameters(), world)
        engine.enable_backward_allreduce = False

    # Resume: DeepSpeed state (weights, optimizer, scheduler) + our step and data position.
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ckpt")
            state = json.loads((Path(d) / STATE_FILE).read_text())
    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not ckpt:  # a new run (not a resume) starts its own logs
            metrics_path.unlink(missing_ok=True)
            (out_dir / "events.jsonl").unlink(missing_ok=True)
        else:  # restarts (worker or driver crash, or a longer re-run) are recorded, not just printed
            _truncate_metrics(metrics_path, state["step"])
            _say(f"[cpo-ray] resumed at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
            with (out_dir / "events.jsonl").open("a") as f:
                f.write(json.dumps({"event": "resume", "time": time.time(), **state}) + "\n")

    eval_rows = load_eval_pairs(data_dir, rank, world)
    shard = ray.train.get_dataset_shard("train")
    # Packing: by default one padding-free row per micro-batch with per-sequence causal attention;
    # flash-attention models read the same sequence boundaries. An explicit sdpa/eager keeps rows
    # as wide as the longest sequence with a block-diagonal mask.
    attn = cfg.model.attn_implementation
    if t.packing and attn in (None, VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3"):
        if attn in (None, VARLEN_ATTENTION):
            use_varlen_attention(engine.module)
        collate = lambda b: collate_varlen(b, pad_id)  # noqa: E731
    elif t.packing:
        collate = lambda b: collate_packed(b, pad_id)  # noqa: E731
    else:
        collate = lambda b: collate_padded(b, pad_id)  # noqa: E731

    def checkpoint(metrics: dict, final: bool = False) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="ckpt")
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            if final:
                export_model(engine, cfg, model_path, Path(tmp), rank)
                if rank == 0 and metrics_path.exists():
                    shutil.copy(metrics_path, Path(tmp) / "metrics.jsonl")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # Wait until the controller has committed it: otherwise workers run ahead and a crash in
            # the next seconds restarts from the previous checkpoint (or from scratch).
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    # The same answer on every rank (ZeRO-3 evaluation is collective): is there a held-out split?
    has_eval = any((Path(data_dir) / "eval").glob("*.parquet"))

    def log_eval(step: int) -> dict:
        if not has_eval:
            return {}
        res, per_pair = evaluate(engine, eval_rows, cfg, pad_id, world)
        if rank == 0 and per_pair:
            (out_dir / "train_eval.json").write_text(json.dumps({"step": step, **res, "pairs": per_pair}))
        return res

    step, start, window_t = state["step"], time.time(), time.time()
    start_step = step
    metrics: dict = log_eval(step) if step == 0 else {}
    if rank == 0 and metrics:
        with metrics_path.open("a") as f:  # the base model's held-out score: the curve's first point
            f.write(json.dumps({"step": 0, **metrics}) + "\n")
        _say(f"[cpo-ray] step 0 eval: accuracy {metrics['eval/accuracy']:.3f} margin {metrics['eval/margin']:.3f}")
    epoch = state["epoch"]
    # [metric sums..., tokens, per-rank forward+backward seconds x world]: one all_reduce per step;
    # kept across epochs, as is DeepSpeed's accumulation, when a step spans an epoch boundary.
    n_m = len(METRIC_KEYS)
    sums = torch.zeros(n_m + 1 + world, dtype=torch.float64, device=engine.device)
    # Seconds per phase of this rank's step (summed over micro-batches): data wait + collate,
    # forward + loss, backward (DeepSpeed's own gradient reduction included), the wait for our
    # overlapped all-reduce (ZeRO-0), optimizer step, metrics all-reduce.
    phase = dict.fromkeys(PHASES, 0.0)
    grad_norm = 0.0
    group = max(1, t.group_by_length)
    while step < t.max_steps and epoch < t.epochs:
        batches = shard.iter_batches(
            batch_size=t.micro_batch_size * group,
            batch_format="numpy",
            # Every rank gets the same row count (equal split), hence the same micro-batch count.
            drop_last=False,
            local_shuffle_buffer_size=t.micro_batch_size * max(16, group),
            local_shuffle_seed=t.seed + epoch * 1000 + rank,
        )
        # One permutation seed for all ranks: at each step every rank trains the same length quantile
        # of its own buffer, so data-parallel ranks get similar work and rarely wait on each other.
        batches = length_grouped(batches, t.micro_batch_size, np.random.default_rng([t.seed, epoch]))
        t_mark = time.perf_counter()
        for i, raw in enumerate(batches):
            if epoch == state["epoch"] and i < state["batch_in_epoch"]:
                t_mark = time.perf_counter()
                continue  # resume: these micro-batches were trained before the checkpoint
            batch = collate(raw)
            t_mark = _lap(phase, "time/data_s", t_mark)
            logp, count = sequence_logps(engine, batch)
            b = batch["num_seqs"] // 2
            loss, m = cpo_objective(
                logp[:b],
                logp[b:],
                count[:b],
                count[b:],
                loss_type=t.loss_type,
                beta=t.beta,
                cpo_alpha=t.cpo_alpha,
                label_smoothing=t.label_smoothing,
                simpo_gamma=t.simpo_gamma,
                alpha=t.alpha,
            )
            t_mark = _lap(phase, "time/forward_s", t_mark)
            # Asked before step(): DeepSpeed's answer afterwards is about the NEXT micro-batch.
            boundary = engine.is_gradient_accumulation_boundary()
            if grad_sync:
                grad_sync.prepare(boundary)
            engine.backward(loss)
            t_mark = _lap(phase, "time/backward_s", t_mark)
            if grad_sync:
                grad_sync.finish()  # the wait for the last buckets (and for slower ranks)
                t_mark = _lap(phase, "time/grad_sync_s", t_mark)
            if clip_in_loop and boundary:  # same clip as DeepSpeed's, but the norm is kept for the metrics
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            engine.step()
            t_mark = _lap(phase, "time/optimizer_s", t_mark)
            sums[:n_m] += torch.stack([m[k].double() for k in METRIC_KEYS])
            sums[n_m] += batch["tokens"]
            state.update(epoch=epoch, batch_in_epoch=i + 1)
            if not boundary:
                continue
            step += 1
            state["step"] = step
            if engine.global_steps != step:  # cheap guard: our step count is DeepSpeed's optimizer steps
                raise RuntimeError(
                    f"step {step} != DeepSpeed global_steps {engine.global_steps} (grad_accum bookkeeping)"
                )
            sums[n_m + 1 + rank] = phase["time/forward_s"] + phase["time/backward_s"]
            if world > 1:
                dist.all_reduce(sums)  # also where a fast rank waits for a slow one
            t_mark = _lap(phase, "time/metrics_sync_s", t_mark)
            now = time.time()
            metrics = {k: sums[j].item() / (t.grad_accum * world) for j, k in enumerate(METRIC_KEYS)}
            metrics.update(step=step, epoch=epoch, batch_in_epoch=i + 1, lr=scheduler.get_last_lr()[0])
            metrics["elapsed_s"] = round(now - start, 2)  # since this worker group started training
            metrics["grad_norm"] = grad_norm if clip_in_loop else float(engine.get_global_grad_norm() or 0.0)
            metrics["tokens"] = int(sums[n_m].item())  # non-pad tokens of this step, all workers
            metrics["tokens_per_s"] = sums[n_m].item() / max(now - window_t, 1e-9)
            # Straggler view: each rank's forward+backward compute; the spread is what ranks wait for.
            metrics["time/rank_compute_s"] = [round(x, 4) for x in sums[n_m + 1 :].tolist()]
            metrics.update({k: round(v, 4) for k, v in phase.items()})  # rank 0's phases
            phase = dict.fromkeys(PHASES, 0.0)
            sums.zero_()
            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                metrics.update(log_eval(step))
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if step % t.log_every == 0 or "eval/accuracy" in metrics:
                    _progress(metrics, step, t.max_steps, start, start_step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                checkpoint(metrics)
            elif step % t.report_every == 0 or "eval/accuracy" in metrics:
                ray.train.report(metrics)
            window_t = time.time()  # eval, checkpoint and report time stay out of tokens/s
            t_mark = time.perf_counter()
            if step >= t.max_steps:
                break
        else:
            epoch += 1
            state.update(epoch=epoch, batch_in_epoch=0)
            continue
        break
    metrics.update(log_eval(step))
    metrics["step"] = step
    if rank == 0:
        with metrics_path.open("a") as f:
            f.write(json.dumps({**metrics, "final": True}) + "\n")
        _progress(metrics, step, t.max_steps, start, start_step)
    checkpoint(metrics, final=True)


def _lap(phase: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    phase[key] += now - since
    return now


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report() at INFO with all metrics; at one report per step that buries the
    progress line, so raise that one logger (named after its file) to WARNING."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _say(msg: str) -> None:
    """Console line from a worker. Ray Train tees print() to its logger AND stdout (every line twice in
    the driver's console); writing to the real stdout shows it once."""
    print(msg, file=sys.__stdout__, flush=True)


def _progress(m: dict, step: int, total: int, start: float, start_step: int) -> None:
    eta = (time.time() - start) / max(step - start_step, 1) * (total - step)
    ev = f" | eval acc {m['eval/accuracy']:.3f} margin {m['eval/margin']:.3f}" if "eval/accuracy" in m else ""
    _say(
        f"[cpo-ray] step {step}/{total} | loss {m.get('loss', float('nan')):.4f} | nll {m.get('nll_loss', float('nan')):.3f} "
        f"| acc {m.get('rewards/accuracies', float('nan')):.2f} | {m.get('tokens_per_s', 0):,.0f} tok/s | eta {eta:,.0f}s{ev}"
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint: those steps are trained again."""
    if not path.exists():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln and json.loads(ln).get("step", 0) <= step and not json.loads(ln).get("final")
    ]  # noqa: E501
    path.write_text("".join(ln + "\n" for ln in keep))


def run_training(cfg: Config, model_path: str):
    """Driver: TorchTrainer over the tokenized train stream; copies the export into cfg.output_dir."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cpo_ray.data import train_stream

    t = cfg.train
    out_dir = Path(cfg.output_dir).resolve()
    data_dir = str(Path(cfg.data_dir).resolve())
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "model_path": model_path,
            "data_dir": data_dir,
            "output_dir": str(out_dir),
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets={"train": train_stream(data_dir)},
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        for name in ("final", "adapter"):
            src = Path(d) / name
            if src.exists():
                shutil.rmtree(out_dir / name, ignore_errors=True)
                shutil.copytree(src, out_dir / name)
        if (Path(d) / "metrics.jsonl").exists() and not (out_dir / "metrics.jsonl").exists():
            shutil.copy(Path(d) / "metrics.jsonl", out_dir / "metrics.jsonl")
    summary = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    summary["train_seconds"] = round(time.time() - t0, 1)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return result
