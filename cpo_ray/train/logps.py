"""Sequence log-probs of the REAL response tokens, from one packed forward with the LM head on response
positions only.

    logp, count = sequence_logps(model, collate(batch))   # [B + R] summed log-probs and scored token counts
    engine = deepspeed.initialize(model=PairScorer(model), ...)   # the root module: engine(batch) = the same
    verify_logps(model, collate)                           # start-up check against the model's own forward

The collated batch (cpo_ray.train.collate) carries a flat list of scored positions: pred_idx[t] (the flat
position whose output predicts token t), tgt_ids[t] (the real response token) and seq_idx[t] (its sequence), so
log p(y|x) = sum_t [logit(tgt_t) - logsumexp(logits)] per sequence, and no [N, L, V] logits tensor or
full-vocabulary log_softmax copy ever exists.
"""

from __future__ import annotations

import torch

from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from cpo_ray.train.heads import base_model, output_head


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, scored token count) per sequence, [2B] each, from ONE forward of `model`.

    `model` is a transformers causal LM (optionally peft-wrapped): its decoder runs on all tokens, its LM
    head (with the architecture's own logit transforms, cpo_ray.train.heads) only on the positions that predict a
    response token.
    """
    device = next(model.parameters()).device
    varlen = {}
    if batch.get("cu_seqlens") is not None:  # read by VARLEN_ATTENTION and by flash-attention varlen
        cu = batch["cu_seqlens"].to(device)
        varlen = dict(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"]
        )
    elif batch.get("segments") is not None:  # shared-prompt groups: read by VARLEN_ATTENTION only
        varlen = {"cpo_segments": batch["segments"].tolist()}
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"].to(device),
        attention_mask=None if batch["attention_mask"] is None else batch["attention_mask"].to(device),
        position_ids=None if batch["position_ids"] is None else batch["position_ids"].to(device),
        use_cache=False,
        **varlen,
    ).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["pred_idx"].to(device))
    tok_logp = token_logps(output_head(model), h, batch["tgt_ids"].to(device))
    sid = batch["seq_idx"].to(device)
    n = batch["num_seqs"]
    logp = torch.zeros(n, device=device, dtype=tok_logp.dtype).index_add_(0, sid, tok_logp)
    count = torch.bincount(sid, minlength=n).to(tok_logp.dtype)
    return logp, count


HEAD_CHUNK_BYTES = 64 * 2**20  # fp32 logits held at once by token_logps (forward and backward)


class _TargetLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[t, tgt_t] per row, with the gradient built IN the saved logits buffer.

    Autograd's logsumexp + gather keep the logits and allocate a softmax and a scattered one-hot of the same
    [n, V] size in backward; here d/dlogits = g * (onehot - softmax) overwrites the logits (nothing else
    reads them: the head's last op saves its input, not its output), so a chunk costs one [n, V] buffer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, tgt)
        return logits.gather(1, tgt[:, None]).squeeze(1) - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, lse, tgt = ctx.saved_tensors
        grad = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])
        return grad.scatter_add_(1, tgt[:, None], g[:, None]), None


def token_logps(head, h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """log p(tgt_t) for each row of h, without ever holding [N, V] logits when that would be large.

    Small batches (or vocabularies): one head call. Otherwise chunks of rows, each under activation
    checkpointing: its logits exist only while that chunk is computed, in the forward and again in the
    backward (where the same buffer becomes their gradient, _TargetLogSoftmax), so the loss path holds at
    most HEAD_CHUNK_BYTES of logits (plus h) instead of N x V fp32 values, their log-softmax and gradient.
    Costs one more head matmul per chunk in backward.
    """

    def chunk(hc, tc):
        return _TargetLogSoftmax.apply(head(hc), tc)

    budget, w = HEAD_CHUNK_BYTES, getattr(head, "weight", None)
    if w is not None and w.requires_grad:
        # A trained head gets one [V, H] weight gradient per chunk, added into the accumulated one: chunks
        # whose logits are smaller than the weight save nothing but cost that add (and a weight-sized temporary).
        budget = max(budget, 4 * getattr(w, "ds_numel", w.numel()))
    rows = max(1, budget // (4 * head.vocab_size))
    if h.shape[0] <= rows:
        return chunk(h, tgt)
    from torch.utils.checkpoint import checkpoint

    parts = [
        checkpoint(chunk, h[i : i + rows], tgt[i : i + rows], use_reentrant=False) for i in range(0, h.shape[0], rows)
    ]
    return torch.cat(parts)


class PairScorer(torch.nn.Module):
    """The module DeepSpeed wraps: forward(batch) = sequence_logps(model, batch).

    The trainer calls engine(batch), so DeepSpeed's root-module hooks run: ZeRO-3 records its parameter
    trace on the first step and prefetches from the second, and counts micro-steps so gradients accumulate
    (called around the root, ZeRO-3 never prefetches and overwrites accumulated gradients)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch)


def verify_logps(model, collate, atol: float = 1e-4) -> float:
    """Start-up check: the trainer's packed, response-only-head log-probs of a probe batch equal
    log_softmax(model(ids).logits) at the real tokens of the model's OWN eager forward (its eager attention,
    with the masks transformers builds: sliding windows, soft-capping), one sequence at a time. The probe is
    longer than a short sliding window, so a window cpo-ray's attention missed shows. Raises naming the
    architecture otherwise (a head transform or an attention feature cpo-ray does not reproduce). Returns the
    max error."""
    import numpy as np

    from cpo_ray.compat import attn_implementation
    from cpo_ray.train.collate import as_batch

    hf = base_model(model)
    text = hf.config.get_text_config()
    vocab, window = text.vocab_size, getattr(text, "sliding_window", None) or 0
    long = min(max(7, window + 4), 256)  # past the window when the window is short
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, vocab, n)  # noqa: E731
    rows = [  # two prompts, one rejected response and two
        {PROMPT_IDS: ids(long), CHOSEN_IDS: ids(5), REJECTED_IDS: [ids(3)]},
        {PROMPT_IDS: ids(4), CHOSEN_IDS: ids(2), REJECTED_IDS: [ids(long + 2), ids(3)]},
    ]
    batch = as_batch(rows)
    was_training, trained_attn = model.training, attn_implementation(hf)
    model.eval()
    with torch.no_grad():
        got, _ = sequence_logps(model, collate(batch))
        want = []  # the order of the batch's sequences: the chosen ones, then the rejected ones by prompt
        seqs = [(r[PROMPT_IDS], r[CHOSEN_IDS]) for r in rows] + [
            (r[PROMPT_IDS], x) for r in rows for x in r[REJECTED_IDS]
        ]
        hf.set_attn_implementation("eager")  # the reference is the architecture's own attention, not ours
        try:
            for p, resp in seqs:
                full = torch.from_numpy(np.concatenate([p, resp]))[None].to(next(model.parameters()).device)
                logp = torch.log_softmax(model(input_ids=full, use_cache=False).logits[0].float(), -1)
                pos = torch.arange(len(p), full.shape[1], device=full.device)
                want.append(logp[pos - 1, full[0, pos]].sum())
        finally:
            hf.set_attn_implementation(trained_attn)
    model.train(was_training)
    err = float((got.cpu() - torch.stack(want).cpu()).abs().max())
    if not err <= atol * max(len(p) + len(r) for p, r in seqs):
        raise ValueError(
            f"{type(hf).__name__} ({hf.config.model_type}): cpo-ray's packed log-probs differ from the model's own "
            f"eager forward by {err:.3g} nats on a probe batch; its head or attention does something cpo-ray does "
            "not reproduce. Try model.attn_implementation: sdpa, or train.packing: false"
        )
    return err
