"""The LM head as each architecture's own forward() applies it, reproduced for the response positions only.

cpo_ray.train.logps runs the decoder on every token but the head only where a response token is predicted, so what
a model's *ForCausalLM.forward() does between the final hidden state and the logits must be done here too, or
training optimises other log-probs than vLLM serves. Read from transformers 5.19's modeling files:

    Gemma-2/3/3n/4, VaultGemma, NanoChat   logits = cap * tanh(logits / cap)      (config.final_logit_softcapping)
    RecurrentGemma                         the same with config.logits_soft_cap
    Cohere, Cohere2, Cohere2-MoE           logits * model.logit_scale
    Granite, GraniteMoe(-Shared/-Hybrid)   logits / config.logits_scaling
    HyperCLOVAX                            logits * config.logits_scaling
    FalconH1                               logits * model.model.lm_head_multiplier
    MiniCPM3                               head(hidden / config.logits_scaling)

Architectures whose head we do not reproduce are refused by `check_architecture` before any worker starts,
and cpo_ray.train.logps.verify_logps checks every model against its own forward() on a probe batch at start-up.
"""

from __future__ import annotations

SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")
LOGIT_SCALE_ATTR = ("cohere", "cohere2", "cohere2_moe", "cohere_compass")
DIVIDE_BY_LOGITS_SCALING = (
    "granite",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "granite_swa",
    "granitemoe_swa",
)
# model_type -> why we refuse it (its forward does more than we reproduce)
REFUSED = {
    "inkling": "divides hidden states by a muP width multiplier and cuts padded vocabulary rows off the logits",
    "modernbert-decoder": "runs an extra decoder projection after lm_head",
}
# Their decoder layers drop the extra attention kwargs, so packed rows would attend across sequences.
NO_VARLEN = {"nemotron": "Nemotron", "stablelm": "StableLM"}


def check_architecture(hf_config, packing: bool, attn_implementation: str | None) -> None:
    """Refuse, before training starts, a model whose log-probs cpo-ray cannot compute like its forward()."""
    mt = getattr(hf_config, "model_type", "")
    if mt in REFUSED:
        raise ValueError(
            f"model_type {mt!r} is not supported: its forward() {REFUSED[mt]}, which cpo-ray does not reproduce"
        )
    if getattr(hf_config, "attn_logit_softcapping", None) and attn_implementation == "sdpa":
        raise ValueError(
            f"{mt}: transformers' sdpa attention ignores attn_logit_softcapping (vLLM applies it): leave "
            "model.attn_implementation unset (cpo-ray's attention soft-caps) or set eager"
        )
    if mt in NO_VARLEN and attn_implementation in (None, "cpo_varlen_sdpa"):
        raise ValueError(
            f"{NO_VARLEN[mt]} layers do not pass sequence bounds or windows to the attention function: set "
            "model.attn_implementation: sdpa (with packing: block-diagonal rows)"
        )


def base_model(model):
    """The transformers PreTrainedModel under peft/DeepSpeed wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model):
    """fn(hidden [N, H]) -> fp32 logits [N, V], as model.forward() computes them (see the module docstring)."""
    import torch

    hf = base_model(model)
    cfg, mt = hf.config, getattr(hf.config, "model_type", "")
    lm_head = model.get_output_embeddings()
    pre = getattr(cfg, "logits_scaling", None) if mt == "minicpm3" else None
    post = None
    if mt in LOGIT_SCALE_ATTR:
        post = float(hf.logit_scale)
    elif mt in DIVIDE_BY_LOGITS_SCALING:
        post = 1.0 / cfg.logits_scaling
    elif mt == "hyperclovax":
        post = float(cfg.logits_scaling)
    elif mt == "falcon_h1":
        post = float(hf.model.lm_head_multiplier)
    cap = next((getattr(cfg, f) for f in SOFTCAP_FIELDS if getattr(cfg, f, None)), None)

    def head(h):
        if pre is not None:
            h = h / pre
        logits = lm_head(h)
        if post is not None:
            logits = logits * post
        logits = logits.float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    head.vocab_size = cfg.get_text_config().vocab_size
    head.weight = lm_head.weight  # token_logps sizes its chunks by whether this is trained
    return head
