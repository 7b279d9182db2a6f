"""OverlappedGradSync: after finish(), every gradient is the mean over ranks of that rank's own
gradient (summed over the step's micro-batches), checked against gradients computed without any
sync and all-gathered. Two real gloo processes on loopback; tiny buckets so several are in flight."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpo_ray.train.gradsync import OverlappedGradSync


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank
        self.emb = torch.nn.Embedding(50, 16)
        self.body = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
        self.head = torch.nn.Linear(16, 50)
        self.sometimes = torch.nn.Linear(16, 16)  # used on rank 0 only: a data-dependent branch

    def forward(self, ids, use_extra: bool):
        h = self.emb(ids)
        for layer in self.body:
            h = torch.tanh(layer(h))
        if use_extra:
            h = h + self.sometimes(h)
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def _batches(rank: int, n: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 50, (3, 7), generator=g) for _ in range(n)]


def _worker(rank: int, world: int, port: int, micro_batches: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        use_extra = rank == 0
        # Reference: this rank's own gradients, no sync, then the mean over ranks by all_gather.
        ref = Net()
        for ids in _batches(rank, micro_batches):
            ref(ids, use_extra).backward()
        expected = {}
        for name, p in ref.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g)
            expected[name] = torch.stack(parts).mean(0)

        net = Net()
        sync = OverlappedGradSync(net.parameters(), world, bucket_bytes=2048)  # ~1 layer per bucket
        assert len(sync.buckets) > 3
        for step in range(2):  # the second step checks re-arming after zero_grad(set_to_none)
            for j, ids in enumerate(_batches(rank, micro_batches)):
                sync.prepare(boundary=j == micro_batches - 1)
                net(ids, use_extra).backward()
            sync.finish()
            worst = max((p.grad - expected[n]).abs().max().item() for n, p in net.named_parameters())
            out[(rank, step)] = worst
            for p in net.parameters():
                p.grad = None
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_overlapped_sync_equals_mean_of_rank_gradients(micro_batches):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), micro_batches, out), nprocs=2, join=True)
        worst = dict(out)
    assert sorted(worst) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert max(worst.values()) < 1e-6, worst
