"""The trainer's stream of micro-batches: epochs over a worker's dataset shard, length grouping, resume.

    for epoch, index, raw in micro_batches(shard, cfg.train, start_epoch, skip, rank):
        ...  # raw: numpy columns of micro_batch_size pairs; (epoch, index + 1) is the data position

On resume the first `skip` micro-batches of `start_epoch` are read and dropped (the checkpoint's data
position), so the loop that consumes this is a single `for`.
"""

from __future__ import annotations

import numpy as np

from cpo_ray.train.collate import length_grouped


def micro_batches(shard, tc, start_epoch: int, skip: int, rank: int):
    """(epoch, index in epoch, raw micro-batch) from start_epoch to tc.epochs, skipping `skip` at the start."""
    group = max(1, tc.group_by_length)
    for epoch in range(start_epoch, tc.epochs):
        if not tc.shuffle:  # file order: the stream's own order, cut into micro-batches (a short tail dropped)
            for i, raw in enumerate(shard.iter_batches(batch_size=tc.micro_batch_size, batch_format="numpy",
                                                      drop_last=True)):  # fmt: skip
                if epoch > start_epoch or i >= skip:
                    yield epoch, i, raw
            continue
        batches = shard.iter_batches(
            batch_size=tc.micro_batch_size * group,
            batch_format="numpy",
            # Every rank gets the same row count (equal split), hence the same micro-batch count.
            drop_last=False,
            local_shuffle_buffer_size=tc.micro_batch_size * max(16, group),
            local_shuffle_seed=tc.seed + epoch * 1000 + rank,
        )
        # One permutation seed for all ranks: at each step every rank trains the same length quantile
        # of its own buffer, so data-parallel ranks get similar work and rarely wait on each other.
        batches = length_grouped(batches, tc.micro_batch_size, np.random.default_rng([tc.seed, epoch]))
        for i, raw in enumerate(batches):
            if epoch == start_epoch and i < skip:
                continue  # resume: trained before the checkpoint
            yield epoch, i, raw


def optimizer_steps(stream, grad_accum: int):
    """The micro-batch stream in optimizer steps: lists of grad_accum (epoch, index, raw) items (a step may span
    an epoch boundary; a trailing partial step, which total_steps never counts, is not yielded)."""
    step = []
    for item in stream:
        step.append(item)
        if len(step) == grad_accum:
            yield step
            step = []


def steps_per_epoch(rows: int, world: int, micro_batch_size: int, grad_accum: int) -> float:
    """Optimizer steps one epoch of `rows` pairs gives: each rank reads rows // world of them (equal split)
    and length grouping leaves out a remainder smaller than a micro-batch."""
    return (rows // world // micro_batch_size) / grad_accum


def total_steps(tc, rows: int, world: int) -> int:
    """The run's optimizer steps: max_steps, or fewer when the epochs run out first."""
    by_epochs = int(tc.epochs * steps_per_epoch(rows, world, tc.micro_batch_size, tc.grad_accum))
    if by_epochs < 1:
        raise ValueError(
            f"{rows} training pairs give no optimizer step with {world} worker(s) x micro_batch_size "
            f"{tc.micro_batch_size} x grad_accum {tc.grad_accum}"
        )
    return by_epochs if tc.max_steps is None else min(tc.max_steps, by_epochs)
