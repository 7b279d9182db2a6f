"""What trains and what comes out: the causal LM (full or LoRA) and its export.

    model = build_model(cfg, model_path, torch.float32)        # transformers causal LM, peft-wrapped with LoRA
    export_model(engine, cfg, model_path, out_dir, rank)        # out_dir/final (merged) + out_dir/adapter

Imports torch, transformers and peft only inside functions, so the driver and the tests can import it without them.
"""

from __future__ import annotations

from pathlib import Path

from cpo_ray.config import Config
from cpo_ray.contract import ADAPTER, FINAL
from cpo_ray.model_source import load_tokenizer


def torch_dtype(cfg: Config, use_gpu: bool):
    """model.dtype as a torch dtype; auto = bf16 on GPU, fp32 on CPU (bf16 is slower on CPUs without AVX-512 BF16: bench/RESULTS.md)."""
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

    from cpo_ray.train.attention import VARLEN_ATTENTION

    model_cfg = cfg.model
    kwargs = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code, "use_safetensors": True}
    if model_cfg.attn_implementation and model_cfg.attn_implementation != VARLEN_ATTENTION:  # ours is set after loading
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
        if model_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


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
