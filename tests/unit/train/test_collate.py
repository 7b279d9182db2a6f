"""Sequence log-probs of the REAL response tokens, checked against an independent transformers forward."""

import numpy as np
import pytest
import torch

from cpo_ray.train.collate import balance_ranks, collate_packed, collate_padded, length_grouped, pair_cost
from cpo_ray.train.logps import sequence_logps


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def random_batch(seed, pairs=4):
    rng = np.random.default_rng(seed)

    def col(lo, hi):
        return np.array([rng.integers(3, 259, rng.integers(lo, hi)) for _ in range(pairs)] + [None], dtype=object)[:-1]

    return {"prompt_ids": col(1, 20), "chosen_ids": col(1, 15), "rejected_ids": one_each(col(1, 15))}


def one_each(column: np.ndarray) -> np.ndarray:
    """A rejected_ids column with one rejected response per prompt (a list of one)."""
    out = np.empty(len(column), dtype=object)
    out[:] = [[r] for r in column]
    return out


def flat(batch: dict, side: str) -> list:
    """(prompt, response) of every sequence on one side, in the batch's sequence order."""
    if side == "chosen_ids":
        return list(zip(batch["prompt_ids"], batch["chosen_ids"], strict=True))
    return [(p, r) for p, rs in zip(batch["prompt_ids"], batch["rejected_ids"], strict=True) for r in rs]


def reference_logps(model, batch):
    """One unpadded sequence at a time, full log_softmax, labels = the real next tokens."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p, r in flat(batch, side):
            ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            pos = torch.arange(len(p), ids.shape[1])
            out.append(logp[pos - 1, ids[0, pos]].sum().item())
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_and_packed_equal_plain_forward(model, seed):
    batch = random_batch(seed)
    ref = reference_logps(model, batch)
    with torch.no_grad():
        padded, n_pad = sequence_logps(model, collate_padded(batch, pad_id=0))
        packed, n_pack = sequence_logps(model, collate_packed(batch, pad_id=0, row_tokens=48))
    torch.testing.assert_close(padded, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    lens = [len(r) for side in ("chosen_ids", "rejected_ids") for _, r in flat(batch, side)]
    assert n_pad.tolist() == lens == n_pack.tolist()


def test_packing_removes_padding():
    batch = random_batch(3, pairs=8)
    padded, packed = collate_padded(batch, 0), collate_packed(batch, 0, row_tokens=64)
    assert padded["tokens"] == packed["tokens"]
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # position ids restart at every sequence start
    assert (packed["position_ids"] == 0).sum() >= 16


def _buffer(lengths, seed=0):
    """A Ray-Data-like numpy batch whose pair i has prompt length lengths[i] and tags its prompt with i."""
    rng = np.random.default_rng(seed)
    obj = lambda xs: np.array([*xs, None], dtype=object)[:-1]  # noqa: E731
    return {
        "prompt_ids": obj(np.full(n, i) for i, n in enumerate(lengths)),
        "chosen_ids": obj(np.full(rng.integers(1, 4), i) for i in range(len(lengths))),
        "rejected_ids": one_each(obj(np.full(rng.integers(1, 4), i) for i in range(len(lengths)))),
    }


def test_length_grouped_keeps_every_pair_once_and_whole():
    lengths = np.random.default_rng(0).integers(1, 200, 64)
    mbs = list(length_grouped([_buffer(lengths)], 8, np.random.default_rng(0)))
    assert [len(mb["prompt_ids"]) for mb in mbs] == [8] * 8
    tags = [int(p[0]) for mb in mbs for p in mb["prompt_ids"]]
    assert sorted(tags) == list(range(64))  # each pair exactly once
    for mb in mbs:  # the three columns of a pair stay together
        for p, c, r in zip(mb["prompt_ids"], mb["chosen_ids"], mb["rejected_ids"], strict=True):
            assert p[0] == c[0] == r[0][0]


def test_length_grouped_cuts_padding():
    lengths = np.random.default_rng(1).integers(1, 200, 128)
    buf = _buffer(lengths)

    def grid(mbs):  # padded positions: 2B rows x the longest sequence, summed over micro-batches
        return sum(collate_padded(mb, 0)["input_ids"].numel() for mb in mbs)

    stream = [{k: v[i : i + 8] for k, v in buf.items()} for i in range(0, 128, 8)]
    grouped = list(length_grouped([buf], 8, np.random.default_rng(0)))
    real = sum(collate_padded(mb, 0)["tokens"] for mb in stream)
    assert sum(collate_padded(mb, 0)["tokens"] for mb in grouped) == real
    # Hand-worked bound: sorted chunks of 8 among 1..199 pad to within the chunk's spread, far below
    # random chunks (which pad nearly to the maximum of 8 draws).
    assert grid(grouped) < 0.7 * grid(stream)
    assert grid(grouped) < 1.15 * real


def test_length_grouped_same_seed_gives_ranks_the_same_length_quantile():
    # Two ranks' buffers: other pairs, other order; prompt lengths 10 apart (responses add 1-3).
    a, b = 10 * np.arange(1, 33), (1000 + 10 * np.arange(1, 33))[::-1]
    mb_a = list(length_grouped([_buffer(a, seed=1)], 4, np.random.default_rng([7, 0])))
    mb_b = list(length_grouped([_buffer(b, seed=2)], 4, np.random.default_rng([7, 0])))
    rank = lambda mbs, base: [(min(len(p) for p in mb["prompt_ids"]) - base) // 40 for mb in mbs]  # noqa: E731
    assert rank(mb_a, 10) == rank(mb_b, 1010)  # step j: the same quantile on both ranks
    assert rank(mb_a, 1) != sorted(rank(mb_a, 1))  # and the step order is shuffled


def test_length_grouped_remainder_is_random_not_the_longest():
    lengths = np.arange(1, 11)  # 10 pairs, micro-batch 4: 2 left out
    left_out = set()
    for seed in range(20):
        mbs = list(length_grouped([_buffer(lengths)], 4, np.random.default_rng(seed)))
        assert len(mbs) == 2
        kept = {int(p[0]) for mb in mbs for p in mb["prompt_ids"]}
        left_out |= set(range(10)) - kept
    assert left_out - {8, 9}  # not always the two longest


def _pairs(*spec):
    """A micro-batch of pairs (tag, prompt length, chosen length, [rejected lengths]); every id is the tag."""
    obj = lambda xs: np.array([*xs, None], dtype=object)[:-1]  # noqa: E731
    return {
        "prompt_ids": obj(np.full(p, t) for t, p, _, _ in spec),
        "chosen_ids": obj(np.full(c, t) for t, _, c, _ in spec),
        "rejected_ids": obj([np.full(r, t) for r in rs] for t, _, _, rs in spec),
    }


def test_pair_cost_counts_the_prompt_once_when_shared():
    mb = _pairs((0, 10, 3, [4, 5]), (1, 2, 1, [1]))
    assert pair_cost(mb, shared_prompt=True).tolist() == [10 + 3 + 4 + 5, 2 + 1 + 1]
    assert pair_cost(mb, shared_prompt=False).tolist() == [3 * 10 + 3 + 4 + 5, 2 * 2 + 1 + 1]


def test_balance_ranks_equal_counts_near_equal_tokens_every_pair_once():
    # Rank 0 read the two long pairs, rank 1 the two short ones: costs (shared) 100, 90 | 12, 10.
    r0 = _pairs((0, 80, 10, [10]), (1, 70, 10, [10]))
    r1 = _pairs((2, 6, 3, [3]), (3, 4, 3, [3]))
    shares = [balance_ranks([r0, r1], rank, shared_prompt=True) for rank in (0, 1)]
    # Longest first into the lightest share with room: 100 -> 0 (tie: lower rank), 90 -> 1, 12 -> 1 (90 < 100),
    # 10 -> 0 (the only share with room left): 110 vs 102 tokens instead of 190 vs 22.
    tags = [sorted(int(p[0]) for p in sh["prompt_ids"]) for sh in shares]
    assert tags == [[0, 3], [1, 2]]
    assert [pair_cost(sh, True).sum() for sh in shares] == [110, 102]
    for sh in shares:  # a pair's columns stay together
        for p, c, rs in zip(sh["prompt_ids"], sh["chosen_ids"], sh["rejected_ids"], strict=True):
            assert p[0] == c[0] == rs[0][0]


def test_balance_ranks_keeps_each_ranks_pair_count_and_accepts_2d_columns():
    rng = np.random.default_rng(0)
    parts = [_pairs(*[(10 * r + i, int(rng.integers(1, 50)), 2, [2]) for i in range(3)]) for r in range(3)]
    parts[2]["chosen_ids"] = np.stack(list(parts[2]["chosen_ids"]))  # equal lengths: Ray may give a 2-D array
    shares = [balance_ranks(parts, r, shared_prompt=True) for r in range(3)]
    assert [len(sh["prompt_ids"]) for sh in shares] == [3, 3, 3]
    assert sorted(int(p[0]) for sh in shares for p in sh["prompt_ids"]) == sorted(
        10 * r + i for r in range(3) for i in range(3)
    )
    loads = [pair_cost(sh, True).sum() for sh in shares]
    assert max(loads) - min(loads) <= max(pair_cost(p, True).max() for p in parts)  # within one pair


@pytest.mark.parametrize("seed", [0, 5])
def test_varlen_one_row_equals_padded(tiny_model_dir, seed):
    """One padding-free row + per-sequence causal attention: the same log-probs as padding."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.attention import VARLEN_ATTENTION, use_varlen_attention
    from cpo_ray.train.collate import collate_varlen

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = random_batch(seed, pairs=5)
    with torch.no_grad():
        padded, n_pad = sequence_logps(m, collate_padded(batch, pad_id=0))
        use_varlen_attention(m)
        assert m.config._attn_implementation == VARLEN_ATTENTION
        vb = collate_varlen(batch, pad_id=0)
        varlen, n_var = sequence_logps(m, vb)
        again, _ = sequence_logps(m, collate_padded(batch, pad_id=0))  # padded still works after the switch
    assert vb["input_ids"].shape == (1, vb["tokens"])  # no padding at all
    torch.testing.assert_close(varlen, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, padded, atol=1e-5, rtol=0)
    assert n_var.tolist() == n_pad.tolist()


def test_varlen_attention_keeps_sequences_apart(tiny_model_dir):
    """Changing one sequence must not move another's log-prob (no attention across the boundary)."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.attention import use_varlen_attention
    from cpo_ray.train.collate import collate_varlen

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    use_varlen_attention(m)
    a = random_batch(7, pairs=3)
    b = {k: v.copy() for k, v in a.items()}
    b["chosen_ids"][0] = np.array([5, 6, 7, 8, 9, 10])  # sequence 0 changes; the others do not
    with torch.no_grad():
        la, _ = sequence_logps(m, collate_varlen(a, 0))
        lb, _ = sequence_logps(m, collate_varlen(b, 0))
    assert not torch.isclose(la[0], lb[0])
    torch.testing.assert_close(la[1:], lb[1:], atol=1e-6, rtol=0)


def test_varlen_gradients_equal_padded(tiny_model_dir):
    """Training sees the same gradients through the per-sequence attention as through padding."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.attention import use_varlen_attention
    from cpo_ray.train.collate import collate_varlen

    batch = random_batch(11, pairs=3)
    grads = []
    for varlen in (False, True):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if varlen:
            use_varlen_attention(m)
        logp, _ = sequence_logps(m, collate_varlen(batch, 0) if varlen else collate_padded(batch, 0))
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-4, msg=n)


def _eager(q, k, v, window=None, softcap=None):
    """Hand-written reference: scores, tanh soft-cap, causal (+ window) mask, softmax, one sequence."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    ok = (j <= i) & ((i - j < window) if window else True)
    return torch.softmax(scores.masked_fill(~ok, float("-inf")), -1) @ v


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (None, 2.0), (4, 1.5)])
def test_varlen_attention_sliding_window_and_softcap(window, softcap):
    """Per packed sequence: the window counts back from each query (self included), soft-capping squashes the
    scores before the mask; no query attends across the boundary at 5."""
    from cpo_ray.train.attention import varlen_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    mod = torch.nn.Module().eval()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out, _ = varlen_attention(mod, q, k, v, None, cu_seq_lens_q=cu, sliding_window=window, softcap=softcap)
    want = torch.cat(
        [_eager(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], window, softcap) for a, b in ((0, 5), (5, 12))], 2
    )
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=0)


def test_varlen_attention_refuses_attention_sinks():
    """Attention sinks need their own kernel: a loud error, not silently different attention."""
    from cpo_ray.train.attention import varlen_attention

    q = torch.zeros(1, 2, 6, 4)
    with pytest.raises(NotImplementedError, match="attn_implementation"):
        varlen_attention(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3, 6]), s_aux=torch.zeros(2))


@pytest.mark.parametrize("seed", [0, 3])
def test_shared_prompt_row_equals_padded_and_computes_each_prompt_once(tiny_model_dir, seed):
    """Each pair's prompt once, both responses attending to it: the same log-probs and gradients as one
    padded row per sequence, with len(prompt) fewer tokens per pair through the model."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.attention import use_varlen_attention
    from cpo_ray.train.collate import collate_shared

    batch = random_batch(seed, pairs=4)
    sb = collate_shared(batch, 0)
    assert sb["tokens_computed"] == sum(len(p) for p in batch["prompt_ids"]) + sum(
        len(r) for side in ("chosen_ids", "rejected_ids") for _, r in flat(batch, side)
    )
    assert sb["tokens"] == collate_padded(batch, 0)["tokens"]  # counted per sequence, like the others
    out = []
    for shared in (False, True):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if shared:
            use_varlen_attention(m)
        logp, n = sequence_logps(m, sb if shared else collate_padded(batch, 0))
        logp.sum().backward()
        out.append((logp.detach(), n, {k: p.grad.clone() for k, p in m.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=0)
    assert out[1][1].tolist() == out[0][1].tolist()
    for k in out[0][2]:
        torch.testing.assert_close(out[1][2][k], out[0][2][k], atol=1e-4, rtol=1e-4, msg=k)


def test_shared_prompt_responses_do_not_see_each_other(tiny_model_dir):
    """Changing a pair's chosen response moves neither its rejected log-prob nor another pair's."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.attention import use_varlen_attention
    from cpo_ray.train.collate import collate_shared

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    use_varlen_attention(m)
    a = random_batch(9, pairs=3)
    b = {k: v.copy() for k, v in a.items()}
    b["chosen_ids"][1] = np.array([5, 6, 7, 8, 9, 10, 11])
    with torch.no_grad():
        la, _ = sequence_logps(m, collate_shared(a, 0))
        lb, _ = sequence_logps(m, collate_shared(b, 0))
    assert not torch.isclose(la[1], lb[1])
    keep = [0, 2, 3, 4, 5]  # every other sequence (chosen 0, 2; rejected 0, 1, 2)
    torch.testing.assert_close(la[keep], lb[keep], atol=1e-6, rtol=0)


def test_chunked_head_equals_one_call_in_values_and_gradients(monkeypatch):
    """Over HEAD_CHUNK_BYTES the LM head runs in checkpointed chunks: the same per-token log-probs and the
    same gradients for the hidden states and the head's weight as one [N, V] call."""
    from cpo_ray.train import logps as B

    torch.manual_seed(0)
    lm = torch.nn.Linear(16, 50)
    head = lambda h: lm(h).float()  # noqa: E731
    head.vocab_size = 50
    h = torch.randn(37, 16, requires_grad=True)
    tgt = torch.randint(0, 50, (37,))
    grads = []
    for chunk_bytes in (2**30, 4 * 50 * 8):  # one call; chunks of 8 rows (5 chunks, the last of 5)
        monkeypatch.setattr(B, "HEAD_CHUNK_BYTES", chunk_bytes)
        out = B.token_logps(head, h, tgt)
        (out * torch.linspace(0.5, 2, 37)).sum().backward()
        grads.append((out.detach(), h.grad.clone(), lm.weight.grad.clone()))
        h.grad, lm.weight.grad, lm.bias.grad = None, None, None
    # Reference: plain autograd through log_softmax + gather (cpo-ray builds the gradient in place).
    want = torch.log_softmax(lm(h), -1).gather(1, tgt[:, None]).squeeze(1)
    (want * torch.linspace(0.5, 2, 37)).sum().backward()
    torch.testing.assert_close(grads[0][0], want.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0][1], h.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0][2], lm.weight.grad, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
