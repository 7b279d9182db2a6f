"""Sequence log-probs of the REAL response tokens, checked against an independent transformers forward."""

import numpy as np
import pytest
import torch

from cpo_ray.batch import collate_packed, collate_padded, sequence_logps


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def random_batch(seed, pairs=4):
    rng = np.random.default_rng(seed)

    def col(lo, hi):
        return np.array([rng.integers(3, 259, rng.integers(lo, hi)) for _ in range(pairs)] + [None], dtype=object)[:-1]

    return {"prompt_ids": col(1, 20), "chosen_ids": col(1, 15), "rejected_ids": col(1, 15)}


def reference_logps(model, batch):
    """One unpadded sequence at a time, full log_softmax, labels = the real next tokens."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p, r in zip(batch["prompt_ids"], batch[side], strict=True):
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
    lens = [len(r) for r in [*batch["chosen_ids"], *batch["rejected_ids"]]]
    assert n_pad.tolist() == lens == n_pack.tolist()


def test_packing_removes_padding():
    batch = random_batch(3, pairs=8)
    padded, packed = collate_padded(batch, 0), collate_packed(batch, 0, row_tokens=64)
    assert padded["tokens"] == packed["tokens"]
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # position ids restart at every sequence start
    assert (packed["position_ids"] == 0).sum() >= 16
