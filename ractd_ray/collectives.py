"""Collectives of the Ray Train workers (torch.distributed: gloo on CPU, nccl on GPU, set up by TorchTrainer): the
gradient average the training loop's RunContext.sync_grads calls (`GradAllReduce`; `PerParameterAllReduce` is the
naive alternative bench/bench_ray.py compares it with) and its all_reduce_sum (`all_reduce_sum`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

DEFAULT_BUCKET_MB = 64.0  # bench/bench_ray.py: the fastest of 16-1024 MiB for the small and the paper-size student


class GradAllReduce:
    """sync_grads for RunContext: average the gradients of every trainable parameter across workers.

    The gradients are copied into one persistent flat buffer per dtype, summed across workers with one
    all-reduce per bucket of whole parameters of at most `bucket_mb` MiB (one all-reduce for a model smaller than
    that), divided by the world size and copied back. The all-reduces are issued asynchronously as each bucket is
    filled, so copying the next bucket in (and the previous one out) overlaps the communication. A parameter
    without a gradient on this rank contributes zeros, so every rank issues the same collectives. Needs an
    initialized torch.distributed process group (TorchTrainer sets one up).
    """

    def __init__(self, world_size: int, bucket_mb: float = DEFAULT_BUCKET_MB):
        self.world_size = world_size
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self._key = None
        self._buckets: list[tuple[torch.Tensor, list[tuple[nn.Parameter, int, int]]]] = []
        self.calls = 0  # all-reduce calls issued (bench / tests)

    def _layout(self, params: list[nn.Parameter]) -> None:
        key = tuple((id(p), p.numel(), p.dtype, p.device) for p in params)
        if key == self._key:
            return
        self._buckets = []
        for dtype in dict.fromkeys(p.dtype for p in params):
            group = [p for p in params if p.dtype == dtype]
            flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
            per_bucket = max(1, self.bucket_bytes // flat.element_size())
            start, members = 0, []
            for p in group:
                offset = members[-1][1] + members[-1][2] if members else start
                if members and offset + p.numel() - start > per_bucket:
                    self._buckets.append((flat[start:offset], [(q, o - start, n) for q, o, n in members]))
                    start, members = offset, []
                members.append((p, offset, p.numel()))
            end = members[-1][1] + members[-1][2]
            self._buckets.append((flat[start:end], [(q, o - start, n) for q, o, n in members]))
        self._key = key

    def __call__(self, model: nn.Module) -> None:
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad]
        if not params or self.world_size == 1:
            return
        self._layout(params)
        works = []
        for segment, members in self._buckets:  # gather a bucket, start its all-reduce, go on with the next
            for p, o, n in members:
                if p.grad is None:
                    segment[o:o + n].zero_()
                else:
                    segment[o:o + n].copy_(p.grad.reshape(-1))
            works.append(dist.all_reduce(segment, async_op=True))
            self.calls += 1
        for (segment, members), work in zip(self._buckets, works):  # scatter each bucket as it completes
            work.wait()
            segment.div_(self.world_size)
            for p, o, n in members:
                if p.grad is None:
                    p.grad = segment[o:o + n].view_as(p).clone()
                else:
                    p.grad.copy_(segment[o:o + n].view_as(p.grad))


class PerParameterAllReduce:
    """The naive alternative to GradAllReduce: one all-reduce per parameter (bench/bench_ray.py compares)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.calls = 0

    def __call__(self, model: nn.Module) -> None:
        import torch.distributed as dist

        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world_size)
            self.calls += 1


def all_reduce_sum(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """all_reduce_sum for RunContext: the sum over workers of a (small) tensor, returned on its own device."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        x = t.detach().to(device, copy=True)
        dist.all_reduce(x)
        return x.to(t.device)

    return reduce
