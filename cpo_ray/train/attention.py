"""Attention over packed rows: every sequence attends only to itself (or a response to its prompt and itself),
causally, with no padding anywhere.

    use_varlen_attention(model)        # registers VARLEN_ATTENTION with transformers and switches the model
    model(input_ids, position_ids, cu_seq_lens_q=..., ...)   # cpo_ray.train.logps passes the sequence bounds

transformers hands the function the bounds of the packed sequences (`cu_seq_lens_q`, as for flash-attention
varlen kernels). A block-diagonal mask over a packed row would make SDPA compute every (query, key) block of
the row; per-sequence causal calls compute only sum(L_i^2)/2 and take SDPA's causal fast path. Shared-prompt
rows (cpo_ray.train.collate.collate_shared) come as `cpo_segments`: each response's queries attend to its prompt's keys
and its own, causally aligned at the end. What some
architectures add to attention is implemented here too, per sequence: a sliding window (Mistral, Qwen2/3
with use_sliding_window, Gemma-2/3, Cohere2, Phi-3 variants) and tanh soft-capping of the scores (Gemma-2).
Attention sinks (gpt-oss `s_aux`) are refused. Without bounds (padded rows, generation) each row is one
right-padded sequence: causal attention never lets a real token see the padding after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "cpo_varlen_sdpa"


def _attend(q, k, v, scaling, window, softcap, dropout, gqa):
    """Causal attention of the queries q [1, H, Lq, D], the LAST Lq positions of the keys k/v [1, Hk, Lk, D]."""
    lq, lk = q.shape[2], k.shape[2]
    if softcap is None and (window is None or lk <= window) and lq == lk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
    qi = torch.arange(lk - lq, lk, device=q.device)[:, None]  # query positions among the keys
    ki = torch.arange(lk, device=q.device)[None, :]
    allowed = ki <= qi
    if window is not None:
        allowed &= qi - ki < window  # transformers' sliding window: the last `window` positions, self included
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )
    if gqa:  # the eager formula (Gemma-2): scores -> tanh soft-cap -> mask -> softmax in fp32
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scale / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout)
    return torch.matmul(probs, v)


def varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, **kwargs
):
    """transformers attention function: causal attention per packed sequence (bounds from cu_seq_lens_q)."""
    if kwargs.get("s_aux") is not None:  # attention sinks need their own kernel: fail loudly, never attend differently
        raise NotImplementedError(
            f"{VARLEN_ATTENTION} does not implement attention sinks (s_aux); set model.attn_implementation "
            "to sdpa (block-diagonal packing) or flash_attention_2"
        )
    # Some layers pass their window as a kwarg (Mistral, Qwen2); others only hold it as an attribute and leave it
    # to the mask transformers builds (Qwen2-MoE): this attention gets no mask, so it reads either.
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap")
    p = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    segments = kwargs.get("cpo_segments")
    if segments is not None:  # shared-prompt groups: (start, end, prefix start, prefix end), in row order
        parts = []
        for a, b, pa, pb in segments:
            k, v = key[:, :, a:b], value[:, :, a:b]
            if pb > pa:  # a response: its prompt's keys first, then its own (positions continue)
                k, v = torch.cat([key[:, :, pa:pb], k], dim=2), torch.cat([value[:, :, pa:pb], v], dim=2)
            parts.append(_attend(query[:, :, a:b], k, v, scaling, window, softcap, p, gqa))
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None
    if cu_seq_lens_q is not None and query.shape[0] == 1:
        bounds = cu_seq_lens_q.tolist()
        spans = [(0, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    else:  # one right-padded sequence per row
        spans = [(row, 0, query.shape[2]) for row in range(query.shape[0])]
    parts = [
        _attend(
            query[r : r + 1, :, a:b], key[r : r + 1, :, a:b], value[r : r + 1, :, a:b], scaling, window, softcap, p, gqa
        )
        for r, a, b in spans
    ]
    out = torch.cat(parts, dim=2) if cu_seq_lens_q is not None and query.shape[0] == 1 else torch.cat(parts, dim=0)
    return out.transpose(1, 2).contiguous(), None


def use_varlen_attention(model) -> None:
    """Switch a transformers model (peft/DeepSpeed wrappers included) to VARLEN_ATTENTION."""
    from transformers import AttentionInterface

    from cpo_ray.compat import attn_implementation

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN_ATTENTION)
    if attn_implementation(base) != VARLEN_ATTENTION:  # e.g. remote code that cannot switch
        raise ValueError(f"{type(base).__name__} did not switch to {VARLEN_ATTENTION}: set model.attn_implementation")
