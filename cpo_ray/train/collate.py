"""Micro-batches of preference rows, collated for one forward, and how they are formed.

A micro-batch of B prompts, each with its chosen response and K_b >= 1 rejected ones, holds B + R sequences
(R = sum K_b): chosen 0..B-1, then the rejected ones prompt by prompt (`rejected_group[j]` = the prompt of
rejected j), scored by ONE forward (cpo_ray.train.logps). Rows are either padded (one sequence per row, right
padding) or packed (several sequences per row, position ids restarting at each, no padding inside; or each
prompt once with its responses attending to it, collate_shared). Either way the batch carries a flat list of
scored positions:

    pred_idx[t]  flat index (row * L + col) of the position whose output predicts token t
    tgt_ids[t]   the real response token at the next position (prompt and padding never appear)
    seq_idx[t]   which of the B + R sequences token t belongs to

Also here: length grouping of the stream (length_grouped) and the rank balancing of a step (balance_ranks).
"""

from __future__ import annotations

import numpy as np
import torch

from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS


def rejected_lists(batch: dict) -> list[list[np.ndarray]]:
    """Each prompt's rejected responses (Ray Data gives list<list<int>> as nested object arrays)."""
    return [list(rs) for rs in batch[REJECTED_IDS]]


def _sequences(batch: dict) -> list[tuple[np.ndarray, int]]:
    """(token ids, prompt length) for the B + R sequences: the chosen ones first, then the rejected."""
    prompts = batch[PROMPT_IDS]
    seqs = [(np.concatenate([p, c]), len(p)) for p, c in zip(prompts, batch[CHOSEN_IDS], strict=True)]
    seqs += [(np.concatenate([p, r]), len(p)) for p, rs in zip(prompts, rejected_lists(batch), strict=True) for r in rs]
    return seqs


def chosen_only(batch: dict) -> dict:
    """The batch without its rejected responses (the SFT warm-up trains on the chosen ones alone)."""
    empty = np.empty(len(batch[PROMPT_IDS]), dtype=object)
    empty[:] = [[] for _ in range(len(empty))]
    return {**batch, REJECTED_IDS: empty}


def _grouping(batch: dict) -> dict:
    """The fields every collate adds: which prompt each rejected response belongs to, and the counts."""
    k = [len(rs) for rs in batch[REJECTED_IDS]]
    group = np.repeat(np.arange(len(k)), k).astype(np.int64)
    return {"rejected_group": torch.from_numpy(group), "num_chosen": len(k), "num_seqs": len(k) + int(sum(k))}


def _targets(seqs, starts_rows, width):
    """pred_idx / tgt_ids / seq_idx for sequences placed at (row, col) offsets in a [R, width] grid."""
    pred, tgt, sid = [], [], []
    for s, ((ids, plen), (row, col)) in enumerate(zip(seqs, starts_rows, strict=True)):
        n = len(ids) - plen  # response tokens, all scored (EOS included)
        base = row * width + col
        pred.append(np.arange(base + plen - 1, base + len(ids) - 1))
        tgt.append(ids[plen:])
        sid.append(np.full(n, s))
    return (
        torch.from_numpy(np.concatenate(pred).astype(np.int64)),
        torch.from_numpy(np.concatenate(tgt).astype(np.int64)),
        torch.from_numpy(np.concatenate(sid).astype(np.int64)),
    )


def collate_padded(batch: dict, pad_id: int) -> dict:
    """One sequence per row, right-padded to the longest: works with every attention kernel."""
    seqs = _sequences(batch)
    width = max(len(ids) for ids, _ in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, (ids, _) in enumerate(seqs):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    pred, tgt, sid = _targets(seqs, [(i, 0) for i in range(len(seqs))], width)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": None,
        "pred_idx": pred,
        "tgt_ids": tgt,
        "seq_idx": sid,
        "tokens": int(mask.sum()),
        **_grouping(batch),
    }


def collate_packed(batch: dict, pad_id: int, row_tokens: int | None = None) -> dict:
    """Sequences concatenated into rows of at most row_tokens (default: the longest sequence's length).

    Position ids restart at 0 for each sequence; transformers turns restarting position ids (with
    no attention mask) into a block-diagonal causal mask, so no token attends across sequences.
    Rows are filled first-fit by decreasing length; only the row tails are padding.
    """
    seqs = _sequences(batch)
    width = max(row_tokens or 0, max(len(ids) for ids, _ in seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    fill: list[int] = []  # tokens used per row
    place = [None] * len(seqs)
    for i in order:
        n = len(seqs[i][0])
        row = next((r for r, used in enumerate(fill) if used + n <= width), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        place[i] = (row, fill[row])
        fill[row] += n
    width = max(fill)
    input_ids = np.full((len(fill), width), pad_id, dtype=np.int64)
    # Padding tails get their own restarting positions: they form a dummy "sequence" never scored.
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(fill), 1))
    for (ids, _), (row, col) in zip(seqs, place, strict=True):
        input_ids[row, col : col + len(ids)] = ids
        position_ids[row, col : col + len(ids)] = np.arange(len(ids))
    for row, used in enumerate(fill):
        position_ids[row, used:] = np.arange(width - used)
    pred, tgt, sid = _targets(seqs, place, width)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": None,
        "position_ids": torch.from_numpy(position_ids),
        "pred_idx": pred,
        "tgt_ids": tgt,
        "seq_idx": sid,
        "tokens": int(sum(fill)),
        **_grouping(batch),
    }


def collate_varlen(batch: dict, pad_id: int) -> dict:
    """All 2B sequences end to end in ONE row, no padding at all, with their boundaries (cu_seqlens).

    Needs an attention that reads the boundaries: `VARLEN_ATTENTION` (per-sequence causal SDPA, any
    device) or flash_attention_2/3 (varlen kernels on GPU). Plain sdpa/eager would still be correct
    (transformers masks by the restarting position ids) but pay dense attention over the whole row.
    """
    seqs = _sequences(batch)
    lengths = np.array([len(ids) for ids, _ in seqs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    input_ids = np.concatenate([ids for ids, _ in seqs])[None].astype(np.int64)
    position_ids = np.concatenate([np.arange(n) for n in lengths])[None]
    pred, tgt, sid = _targets(seqs, [(0, int(c)) for c in starts[:-1]], int(starts[-1]))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": None,
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(starts.astype(np.int32)),
        "max_seqlen": int(lengths.max()),
        "pred_idx": pred,
        "tgt_ids": tgt,
        "seq_idx": sid,
        "tokens": int(lengths.sum()),
        **_grouping(batch),
    }


def collate_shared(batch: dict, pad_id: int) -> dict:
    """ONE padding-free row in which each prompt is a group: the prompt ONCE, then its chosen and each of its
    rejected responses. Each response attends to its prompt and to itself, never to a sibling (the segments
    go to cpo_ray.train.attention as `cpo_segments`), so a prompt's hidden states are computed once for its 1 + K
    responses instead of once per sequence; positions of each response continue from the prompt's end. The
    first token of every response is predicted by the prompt's last position (that row is gathered 1 + K
    times).

    The same log-probs as collate_varlen (tests), with K x len(prompt) fewer tokens per prompt through the
    model. Needs VARLEN_ATTENTION: no other kernel reads the segments.
    """
    prompts, rejected = batch[PROMPT_IDS], rejected_lists(batch)
    n_chosen = len(prompts)
    first_rejected = n_chosen + np.cumsum([0] + [len(rs) for rs in rejected])  # sequence index of each group's
    ids, pos, segs, pred, tgt, sid = [], [], [], [], [], []
    off = seq_tokens = 0
    for b, p in enumerate(prompts):
        plen, p_start = len(p), off
        ids.append(p)
        pos.append(np.arange(plen))
        segs.append((off, off + plen, off, off))  # the prompt: causal over itself, no prefix
        off += plen
        responses = [(b, batch[CHOSEN_IDS][b])] + [(first_rejected[b] + k, r) for k, r in enumerate(rejected[b])]
        for s, resp in responses:
            n = len(resp)
            ids.append(resp)
            pos.append(np.arange(plen, plen + n))
            segs.append((off, off + n, p_start, p_start + plen))  # the response: its prompt, then itself
            pred.append(np.concatenate([[p_start + plen - 1], np.arange(off, off + n - 1)]))
            tgt.append(resp)
            sid.append(np.full(n, s))
            off += n
            seq_tokens += plen + n
    order = np.argsort(np.concatenate(sid), kind="stable")  # sequence-major, like the other collates
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)[None]),
        "attention_mask": None,
        "position_ids": torch.from_numpy(np.concatenate(pos).astype(np.int64)[None]),
        "segments": torch.tensor(segs, dtype=torch.int64),
        "pred_idx": torch.from_numpy(np.concatenate(pred).astype(np.int64)[order]),
        "tgt_ids": torch.from_numpy(np.concatenate(tgt).astype(np.int64)[order]),
        "seq_idx": torch.from_numpy(np.concatenate(sid).astype(np.int64)[order]),
        "tokens": seq_tokens,  # prompt + response per sequence, as the other collates count
        "tokens_computed": off,  # what actually goes through the model
        **_grouping(batch),
    }


def collate_for(packing: bool, attn: str | None, module, pad_id: int, shared_prompt: bool = True):
    """The collate function of the trainer's micro-batches; switches `module` to VARLEN_ATTENTION unless
    model.attn_implementation names another.

    Packing: by default one padding-free row per micro-batch with each prompt computed once for both of its
    responses (collate_shared); shared_prompt=False: one sequence per prompt+response (collate_varlen), which
    flash-attention models can read too. An explicit sdpa/eager keeps rows as wide
    as the longest sequence with a block-diagonal mask. No packing: one right-padded sequence per row (our
    attention then runs per row, with the sliding windows and soft-capping that transformers' sdpa drops).
    """
    from cpo_ray.train.attention import VARLEN_ATTENTION, use_varlen_attention

    if attn in (None, VARLEN_ATTENTION):
        use_varlen_attention(module)
        if packing and shared_prompt:
            return lambda b: collate_shared(b, pad_id)
    if packing and attn in (None, VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3"):
        return lambda b: collate_varlen(b, pad_id)
    if packing:
        return lambda b: collate_packed(b, pad_id)
    return lambda b: collate_padded(b, pad_id)


def length_grouped(buffers, micro_batch_size: int, rng: np.random.Generator):
    """Micro-batches of similar length from buffers of pairs (numpy batch dicts, e.g. Ray Data batches).

    Each buffer is sorted by pair length and cut into micro-batches of `micro_batch_size` pairs, which
    are yielded in a random order: padding (or packed row tails) shrinks to the length spread inside a
    micro-batch while the step order stays shuffled. A buffer that is not a multiple of micro_batch_size
    (the end of an epoch) leaves its remainder out, as drop_last would, chosen at random rather than
    always the longest pairs.
    """
    for buf in buffers:
        # prompt + the longest response: the width a row needs when padded
        cols = zip(buf[PROMPT_IDS], buf[CHOSEN_IDS], buf[REJECTED_IDS], strict=True)
        lengths = np.array([len(p) + max([len(c), *(len(r) for r in rs)]) for p, c, rs in cols], dtype=np.int64)
        keep = np.arange(len(lengths))
        if len(keep) % micro_batch_size:
            keep = np.sort(rng.choice(keep, len(keep) - len(keep) % micro_batch_size, replace=False))
        order = keep[np.argsort(lengths[keep], kind="stable")]
        chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
        for j in rng.permutation(len(chunks)):
            yield {k: v[chunks[j]] for k, v in buf.items()}


def pair_cost(batch: dict, shared_prompt: bool) -> np.ndarray:
    """Tokens each prompt's group puts through the model: the prompt once (shared) or once per response."""
    cols = zip(batch[PROMPT_IDS], batch[CHOSEN_IDS], batch[REJECTED_IDS], strict=True)
    out = []
    for p, c, rs in cols:
        responses = [len(c), *(len(r) for r in rs)]
        out.append(sum(responses) + len(p) * (1 if shared_prompt else len(responses)))
    return np.array(out, dtype=np.int64)


def _objects(column: np.ndarray) -> np.ndarray:
    """A column as a 1-D array of rows (Ray gives equal-length token lists as a 2-D array)."""
    if column.ndim == 1:
        return column
    out = np.empty(len(column), dtype=object)
    for i, row in enumerate(column):
        out[i] = row
    return out


def balance_ranks(parts: list[dict], rank: int, shared_prompt: bool) -> dict:
    """This rank's micro-batch once every rank's micro-batch (`parts`, in rank order) is pooled and re-split:
    each rank keeps as many pairs as it read, but the shares are chosen for near-equal token counts.

    Data-parallel ranks wait for the slowest at every gradient all-reduce; two micro-batches of HH pairs
    with the same pair count can differ by half their tokens. Greedy longest-first into the lightest share
    that still has room: deterministic, the same on every rank. Pair counts are kept, so the all-reduced
    mean of per-rank losses is the same objective as before; the step trains the same pooled pairs.
    """
    pooled = {k: np.concatenate([_objects(part[k]) for part in parts]) for k in parts[0]}
    cost = pair_cost(pooled, shared_prompt)
    room = [len(part[PROMPT_IDS]) for part in parts]
    load = [0] * len(parts)
    share = np.empty(len(cost), dtype=np.int64)
    for i in np.argsort(-cost, kind="stable"):
        r = min((j for j in range(len(parts)) if room[j]), key=lambda j: (load[j], j))
        share[i], room[r], load[r] = r, room[r] - 1, load[r] + int(cost[i])
    mine = np.flatnonzero(share == rank)  # in pooled order
    return {k: v[mine] for k, v in pooled.items()}


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def as_batch(rows: list[dict]) -> dict:
    """Rows of int lists -> the numpy object-array columns Ray Data yields (what the collators take)."""
    return {
        PROMPT_IDS: _object_array([np.asarray(r[PROMPT_IDS], dtype=np.int64) for r in rows]),
        CHOSEN_IDS: _object_array([np.asarray(r[CHOSEN_IDS], dtype=np.int64) for r in rows]),
        REJECTED_IDS: _object_array([[np.asarray(x, dtype=np.int64) for x in r[REJECTED_IDS]] for r in rows]),
    }
