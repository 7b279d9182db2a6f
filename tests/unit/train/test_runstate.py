"""What a checkpoint holds besides DeepSpeed's shards: RNG states per rank, and the batch layout a resume needs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cpo_ray.config import ConfigError, load_config
from cpo_ray.contract import CHECKPOINT_STATE
from cpo_ray.storage import Location
from cpo_ray.train.runstate import _restore_rngs, check_layout, layout, save_state


def test_rng_states_round_trip_so_dropout_masks_repeat(tmp_path):
    """Issue 21: replayed steps drew other LoRA dropout masks (workers never restored RNG state)."""
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    save_state(tmp_path, {"step": 5}, rank=1)
    want = torch.nn.functional.dropout(torch.ones(64), 0.5), np.random.rand(3), random.random()
    torch.manual_seed(99)  # a restarted worker: seeded afresh
    np.random.seed(99)
    random.seed(99)
    _restore_rngs(tmp_path, rank=1)
    got = torch.nn.functional.dropout(torch.ones(64), 0.5), np.random.rand(3), random.random()
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert not (tmp_path / CHECKPOINT_STATE).exists()  # only rank 0 writes the step and data position


def _checkpoint(storage: Location, name: str, ckpt: str, state: dict | str) -> None:
    text = state if isinstance(state, str) else json.dumps(state)
    (storage / name / ckpt / CHECKPOINT_STATE).write_text(text)


def test_resume_under_another_batch_layout_is_refused_before_training(tmp_path):
    """Issue 21: a resume with another micro_batch_size/grad_accum/group_by_length/num_workers silently skipped
    or repeated pairs (the position counts micro-batches of the old size)."""
    storage = Location(tmp_path)
    old = load_config(None, ["train.micro_batch_size=8", "train.num_workers=2"]).train
    _checkpoint(storage, "run", "checkpoint_2026-01-01_00-00-00.000000", {"step": 10, "layout": layout(old)})
    _checkpoint(storage, "run", "checkpoint_2099-01-01_00-00-00.000000", '{"step": 1')  # torn: skipped
    check_layout(storage, "run", old)  # the same layout resumes
    check_layout(storage, "other", load_config(None, ["train.micro_batch_size=4"]).train)  # no checkpoint: fresh
    new = load_config(None, ["train.micro_batch_size=4", "train.num_workers=2", "train.grad_accum=2"]).train
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size 8 -> 4, train\.grad_accum 1 -> 2.*new `name=`"):
        check_layout(storage, "run", new)
