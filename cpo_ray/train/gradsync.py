"""Data-parallel gradient averaging that overlaps backward: the ZeRO-0 path of the trainer.

DeepSpeed's ZeRO-0 engine all-reduces gradients only after backward has finished, flattening all of
them into a fresh buffer and copying the result back: on 2 CPU ranks that took several times longer
than a plain all_reduce of the same bytes (bench/RESULTS.md, train_scaling). Here, as in torch DDP (gradient_as_bucket_view), every gradient is a view into one of a
few preallocated buckets, and a bucket's all_reduce starts (async) as soon as backward has written
its last gradient, so communication runs while backward computes the earlier layers.

    sync = OverlappedGradSync(params, world_size)
    sync.prepare(boundary)   # before each backward; boundary = this micro-batch ends the step
    loss.backward()          # buckets launch as their gradients complete (boundary steps only)
    sync.finish()            # wait; every p.grad is now the mean over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class OverlappedGradSync:
    def __init__(self, params, world_size: int, bucket_bytes: int = 25 * 2**20, group=None):
        self.params = [p for p in params if p.requires_grad]
        self.world, self.group = world_size, group
        # Backward produces gradients roughly from the last layer to the first: bucket in that order.
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            if self.buckets[-1] and (size + nbytes > bucket_bytes or p.dtype != self.buckets[-1][0].dtype):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.flat = [torch.zeros(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device) for b in self.buckets]
        self.views: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.bucket_of: dict[torch.nn.Parameter, int] = {}
        for i, (bucket, flat) in enumerate(zip(self.buckets, self.flat, strict=True)):
            offset = 0
            for p in bucket:
                self.views[p] = flat[offset : offset + p.numel()].view_as(p)
                self.bucket_of[p] = i
                offset += p.numel()
        self.remaining: list[int] = []
        self.works: list = []
        self.launched = 0
        self.boundary = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def prepare(self, boundary: bool) -> None:
        """Before a backward: gradients become bucket views (zeroed once per step; the optimizer's
        zero_grad sets them to None) and, on a boundary micro-batch, buckets are armed to launch."""
        if any(p.grad is None or p.grad.data_ptr() != self.views[p].data_ptr() for p in self.params):
            for flat in self.flat:
                flat.zero_()
            for p in self.params:
                p.grad = self.views[p]
        self.boundary = boundary
        self.remaining = [len(b) for b in self.buckets]
        self.works = []
        self.launched = 0

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if p.grad.data_ptr() != self.views[p].data_ptr():  # autograd replaced it: keep the bucket whole
            self.views[p].copy_(p.grad)
            p.grad = self.views[p]
        if not self.boundary:
            return
        self.remaining[self.bucket_of[p]] -= 1
        # Collectives must be issued in the same order on every rank: buckets go strictly in index
        # order, so a bucket holding a parameter unused on this step (data-dependent models) only
        # delays the later ones until finish(), never reorders them.
        while self.launched < len(self.buckets) and self.remaining[self.launched] == 0:
            self._launch()

    def _launch(self) -> None:
        i = self.launched
        self.flat[i].div_(self.world)  # mean over ranks, as DeepSpeed's gradient averaging
        self.works.append(dist.all_reduce(self.flat[i], group=self.group, async_op=True))
        self.launched += 1

    def finish(self) -> None:
        """Wait for every bucket; buckets whose parameters got no gradient this step launch now."""
        if not self.boundary:
            return
        while self.launched < len(self.buckets):
            self._launch()
        for work in self.works:  # a parameter with no gradient this step contributes its zeroed view
            work.wait()
        self.boundary = False
