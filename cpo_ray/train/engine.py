"""The DeepSpeed engine that trains: client AdamW + LR schedule around the PairScorer root module.

    engine, scheduler, clip_in_loop, collate = build_engine(cfg, model_path, world, total_steps, use_gpu, pad_id)
    changed = apply_hparams(engine, cfg.train)       # after a resume: the config's lr/betas/decay/clip win

Imports torch and DeepSpeed only inside functions (the driver imports this module without them).
"""

from __future__ import annotations

import math

from cpo_ray.config import Config, TrainConfig


def warmup_steps(tc: TrainConfig, total_steps: int) -> int:
    return tc.warmup_steps if tc.warmup_steps is not None else math.ceil(tc.warmup_ratio * total_steps)


def lr_lambda(tc: TrainConfig, total_steps: int):
    """Linear warmup, then cosine/linear decay to min_lr_ratio (constant: flat after warmup)."""
    warm = warmup_steps(tc, total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if tc.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.lr_schedule == "cosine" else 1 - progress
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * shape

    return f


def deepspeed_config(cfg: Config, world: int, dtype: str, clip_in_loop: bool = False) -> dict:
    """DeepSpeed's config for a client AdamW over fp32 weights. dtype "bfloat16"/"float16": DeepSpeed casts
    the module and keeps fp32 master weights and optimizer state; fp16 adds dynamic loss scaling."""
    tc = cfg.train
    zero: dict = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world,
        # ZeRO-0 fp32: the loop clips (DeepSpeed's fp32 clip discards the norm it computes)
        "gradient_clipping": 0.0 if clip_in_loop else tc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        # loss_scale 0 = dynamic: start at 2^16, halve on overflow (that step is skipped), grow after 1000 clean steps
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000},
        # A client torch AdamW: DeepSpeed's own CPU Adam compiles a C++ op for minutes on first use.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model_path: str, world: int, total_steps: int, use_gpu: bool, pad_id: int):
    """Model -> collate (+ the start-up log-prob check) -> client AdamW + LR schedule -> DeepSpeed engine
    around PairScorer. Returns (engine, scheduler, clip_in_loop, collate)."""
    import deepspeed
    import torch

    from cpo_ray.compat import skip_deepspeed_shm_comm_build
    from cpo_ray.train.collate import collate_for
    from cpo_ray.train.logps import PairScorer, verify_logps
    from cpo_ray.train.model import build_model, torch_dtype

    tc = cfg.train
    dtype = torch_dtype(cfg, use_gpu)
    # bf16/fp16 train from fp32 weights: DeepSpeed casts the module and keeps fp32 master weights.
    model = build_model(cfg, model_path, torch.float32)
    collate = collate_for(tc.packing, cfg.model.attn_implementation, model, pad_id, tc.shared_prompt)
    verify_logps(model, collate)
    params = [p for p in model.parameters() if p.requires_grad]
    clip_in_loop = tc.zero_stage == 0 and dtype == torch.float32 and tc.max_grad_norm > 0
    # fused: one kernel over all tensors, several times faster on CPU than the per-tensor loop
    # (bench/RESULTS.md), the same update.
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, total_steps))
    scorer = PairScorer(model)
    if cfg.model.lora.enabled:
        scorer.register_state_dict_post_hook(drop_frozen_tied_weights)
    skip_deepspeed_shm_comm_build()
    engine, _, _, scheduler = deepspeed.initialize(
        model=scorer,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, str(dtype).removeprefix("torch."), clip_in_loop),
        dist_init_required=False,
    )
    return engine, scheduler, clip_in_loop, collate


def drop_frozen_tied_weights(module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state_dict post-hook for LoRA checkpoints. DeepSpeed's exclude_frozen_parameters walks
    named_parameters(), which lists a tied weight once (embed_tokens), so the frozen duplicate (lm_head, the
    whole vocabulary matrix) stayed in every checkpoint; the base model on disk has it."""
    listed = {name for name, _ in module.named_parameters()}
    for name, param in module.named_parameters(remove_duplicate=False):
        if name not in listed and not param.requires_grad:
            state_dict.pop(prefix + name, None)


def apply_hparams(engine, tc: TrainConfig) -> dict:
    """After a resume: the checkpoint restored the optimizer's lr, betas and weight decay (and ZeRO-1/2 its
    clipping) from the old run. The config wins; returns {name: (old, new)} of what changed."""
    sched, groups = engine.lr_scheduler, engine.optimizer.param_groups
    old = {"lr": sched.base_lrs[0], "adam_betas": tuple(groups[0]["betas"]), "weight_decay": groups[0]["weight_decay"]}
    new = {"lr": tc.lr, "adam_betas": tuple(tc.adam_betas), "weight_decay": tc.weight_decay}
    for g, lam in zip(groups, sched.lr_lambdas, strict=True):
        g.update(
            initial_lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay, lr=tc.lr * lam(sched.last_epoch)
        )
    sched.base_lrs = [tc.lr] * len(groups)  # LambdaLR: lr = base_lr x lambda(step) from the next step on
    if getattr(engine.optimizer, "clip_grad", None) not in (None, 0.0):  # ZeRO-1/2 restore the old clip
        engine.optimizer.clip_grad = tc.max_grad_norm
    return {k: (old[k], new[k]) for k in old if old[k] != new[k]}
