"""What trains: the causal LM (full or LoRA), its tokenizer, the DeepSpeed engine around it, and the export.

    model_path = resolve_model_path(cfg)                        # hub id, folder, or embedded:tiny built offline
    engine, scheduler, clip, collate = build_engine(cfg, model_path, world, total_steps, use_gpu, pad_id)
    export_model(engine, cfg, model_path, out_dir, rank)        # out_dir/final (merged) + out_dir/adapter

Imports torch, transformers, peft and DeepSpeed only inside functions, so the driver and the tests can
import it without them.
"""

from __future__ import annotations

import math
from pathlib import Path

from cpo_ray.config import EMBEDDED_MODEL, Config, TrainConfig
from cpo_ray.contract import ADAPTER, CHOSEN_IDS, FINAL, PROMPT_IDS, REJECTED_IDS, RunPaths


def resolve_model_path(cfg: Config) -> str:
    """The folder or hub id to load: builds the embedded model, or converts a GGUF file, under the cache
    folder (model.cache_dir, else the run's output_dir) when asked for one."""
    from cpo_ray import gguf
    from cpo_ray.embedded import build_embedded_model

    m = cfg.model
    cache = Path(m.cache_dir) if m.cache_dir else RunPaths.of(cfg).model_cache
    if m.name_or_path == EMBEDDED_MODEL:
        return str(build_embedded_model(cache / "embedded-tiny", m.tiny).resolve())
    if gguf.is_gguf(m.name_or_path):
        return str(gguf.convert(m.name_or_path, cache).resolve())
    local = Path(m.name_or_path).expanduser()
    # Workers and replicas run in other directories: a local folder travels as an absolute path.
    return str(local.resolve()) if local.exists() else m.name_or_path


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def torch_dtype(cfg: Config, use_gpu: bool):
    """model.dtype as a torch dtype; auto = bf16 on GPU, fp32 on CPU (bf16 is 2-5x slower without AVX-512)."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return named.get(cfg.model.dtype, torch.bfloat16 if use_gpu else torch.float32)


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


def build_model(cfg: Config, model_path: str, dtype):
    """transformers causal LM (safetensors only), LoRA-wrapped when cfg.model.lora.enabled."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.attention import VARLEN_ATTENTION

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


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    return t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)


def lr_lambda(t: TrainConfig, total_steps: int):
    """Linear warmup, then cosine/linear decay to min_lr_ratio (constant: flat after warmup)."""
    warm = warmup_steps(t, total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return f


def deepspeed_config(cfg: Config, world: int, dtype: str, clip_in_loop: bool = False) -> dict:
    """DeepSpeed's config for a client AdamW over fp32 weights. dtype "bfloat16"/"float16": DeepSpeed casts
    the module and keeps fp32 master weights and optimizer state; fp16 adds dynamic loss scaling."""
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
        "bf16": {"enabled": dtype == "bfloat16"},
        # loss_scale 0 = dynamic: start at 2^16, halve on overflow (that step is skipped), grow after 1000 clean steps
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000},
        # A client torch AdamW: DeepSpeed's own CPU Adam compiles a C++ op for minutes on first use.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def verify_logps(model, collate, atol: float = 1e-4) -> float:
    """Start-up check: the trainer's packed, response-only-head log-probs of a probe batch equal
    log_softmax(model(ids).logits) at the real tokens, one sequence at a time. Raises naming the architecture
    otherwise (a head transform or an attention feature cpo-ray does not reproduce). Returns the max error."""
    import numpy as np
    import torch

    from cpo_ray.batch import sequence_logps
    from cpo_ray.heads import _hf
    from cpo_ray.heldout import as_batch

    hf = _hf(model)
    vocab = hf.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, vocab, n)  # noqa: E731
    rows = [  # two prompts, one rejected response and two
        {PROMPT_IDS: ids(7), CHOSEN_IDS: ids(5), REJECTED_IDS: [ids(3)]},
        {PROMPT_IDS: ids(4), CHOSEN_IDS: ids(2), REJECTED_IDS: [ids(6), ids(3)]},
    ]
    batch = as_batch(rows)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        got, _ = sequence_logps(model, collate(batch))
        want = []  # the order of the batch's sequences: the chosen ones, then the rejected ones by prompt
        seqs = [(r[PROMPT_IDS], r[CHOSEN_IDS]) for r in rows] + [
            (r[PROMPT_IDS], x) for r in rows for x in r[REJECTED_IDS]
        ]
        for p, resp in seqs:
            full = torch.from_numpy(np.concatenate([p, resp]))[None].to(next(model.parameters()).device)
            logp = torch.log_softmax(model(input_ids=full, use_cache=False).logits[0].float(), -1)
            pos = torch.arange(len(p), full.shape[1], device=full.device)
            want.append(logp[pos - 1, full[0, pos]].sum())
    model.train(was_training)
    err = float((got.cpu() - torch.stack(want).cpu()).abs().max())
    if not err <= atol * max(len(p) + len(r) for p, r in seqs):
        raise ValueError(
            f"{type(hf).__name__} ({hf.config.model_type}): cpo-ray's packed log-probs differ from the model's own "
            f"forward by {err:.3g} nats on a probe batch; its head or attention does something cpo-ray does not "
            "reproduce. Try model.attn_implementation: sdpa, or train.packing: false"
        )
    return err


def build_engine(cfg: Config, model_path: str, world: int, total_steps: int, use_gpu: bool, pad_id: int):
    """Model -> collate (+ the start-up log-prob check) -> client AdamW + LR schedule -> DeepSpeed engine
    around PairScorer. Returns (engine, scheduler, clip_in_loop, collate)."""
    import deepspeed
    import torch

    from cpo_ray.batch import PairScorer, collate_for
    from cpo_ray.compat import skip_deepspeed_shm_comm_build

    t = cfg.train
    dtype = torch_dtype(cfg, use_gpu)
    # bf16/fp16 train from fp32 weights: DeepSpeed casts the module and keeps fp32 master weights.
    model = build_model(cfg, model_path, torch.float32)
    collate = collate_for(t.packing, cfg.model.attn_implementation, model, pad_id, t.shared_prompt)
    verify_logps(model, collate)
    params = [p for p in model.parameters() if p.requires_grad]
    clip_in_loop = t.zero_stage == 0 and dtype == torch.float32 and t.max_grad_norm > 0
    # fused: one kernel over all tensors; on CPU ~5x faster than the per-tensor loop (27M params:
    # 0.03 s vs 0.17 s per step at 1 thread), the same update.
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps))
    skip_deepspeed_shm_comm_build()
    engine, _, _, scheduler = deepspeed.initialize(
        model=PairScorer(model),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, str(dtype).removeprefix("torch."), clip_in_loop),
        dist_init_required=False,
    )
    return engine, scheduler, clip_in_loop, collate


def apply_hparams(engine, t: TrainConfig) -> dict:
    """After a resume: the checkpoint restored the optimizer's lr, betas and weight decay (and ZeRO-1/2 its
    clipping) from the old run. The config wins; returns {name: (old, new)} of what changed."""
    sched, groups = engine.lr_scheduler, engine.optimizer.param_groups
    old = {"lr": sched.base_lrs[0], "adam_betas": tuple(groups[0]["betas"]), "weight_decay": groups[0]["weight_decay"]}
    new = {"lr": t.lr, "adam_betas": tuple(t.adam_betas), "weight_decay": t.weight_decay}
    for g, lam in zip(groups, sched.lr_lambdas, strict=True):
        g.update(
            initial_lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, lr=t.lr * lam(sched.last_epoch)
        )
    sched.base_lrs = [t.lr] * len(groups)  # LambdaLR: lr = base_lr x lambda(step) from the next step on
    if getattr(engine.optimizer, "clip_grad", None) not in (None, 0.0):  # ZeRO-1/2 restore the old clip
        engine.optimizer.clip_grad = t.max_grad_norm
    return {k: (old[k], new[k]) for k in old if old[k] != new[k]}


def export_model(engine, cfg: Config, model_path: str, out_dir: Path, rank: int) -> None:
    """Merged HF model (safetensors + tokenizer) to out_dir/final, and the LoRA adapter to out_dir/adapter.

    Under ZeRO-3 the parameters are partitioned: every rank joins the gather, rank 0 writes.
    """
    from transformers import AutoModelForCausalLM

    from cpo_ray.compat import zero3_full_state_dict

    if cfg.train.zero_stage == 3:
        state = zero3_full_state_dict(engine)  # collective; None off rank 0 (keys of the PairScorer root)
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    state = {k.removeprefix("model."): v.detach().cpu() for k, v in state.items()}  # PairScorer's .model
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
    out = Path(out_dir)
    if cfg.model.lora.enabled:
        model.save_pretrained(out / ADAPTER, safe_serialization=True)
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out / FINAL, safe_serialization=True)
    load_tokenizer(model_path, cfg.model.trust_remote_code).save_pretrained(out / FINAL)
