"""Distributed helpers every task can use (torch.distributed collectives that keep autograd working)."""

from __future__ import annotations

from typing import Any

import torch


def world_size() -> int:
    """Processes in the default torch.distributed group (1 when it is not initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherCat(torch.autograd.Function):
    """all_gather forward; backward: the gradients of every process summed (all_reduce, which every backend has,
    unlike reduce_scatter on gloo), this process's rows returned."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W processes -> (W*B, ...), rows in rank order, on every process; B must be equal
    everywhere (the loop's micro-batches are: incomplete batches are dropped).

    Differentiable: the backward pass gives each process the sum over processes of the gradients with respect to
    its own rows. When every process computes the same loss L on the gathered rows, that sum is W * dL/dx_own, and
    DDP's averaging over W processes leaves each parameter exactly dL/dθ of the concatenated batch.
    """
    return _GatherCat.apply(x)


def gather_objects(items: list) -> list:
    """A list on each process -> the concatenation, in rank order, on every process (picklable items)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]
