"""Rectified flow: `x_t = (1 - t)·x0 + t·noise`, velocity `v = noise - x0`, t = 1 is pure noise.

diffusers' `FlowMatchEulerDiscreteScheduler` uses this convention with `sigma = t` (its `sigmas`, after `shift`)
and feeds the model `timestep = 1000·sigma`. Euler steps from `sigma` to `sigma_next < sigma`:
`x <- x + (sigma_next - sigma)·v`.
"""

from __future__ import annotations

from torch import Tensor


def predicted_x0(v: Tensor, x_t: Tensor, t: float) -> Tensor:
    """The clean sample the velocity implies: `x_t - t·v`."""
    return x_t - t * v


def guided_velocity(v: Tensor, grad: Tensor, scale: float) -> Tensor:
    """`v - scale·grad`: with t decreasing, an Euler step then moves x by `+(t - t_next)·scale·grad`, up the
    reward for a positive scale; the implied clean sample moves by `t·scale·grad`."""
    return v - scale * grad.to(v.dtype)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """`(1 - t)·x0 + t·noise`; a tensor `t` is (N,) and broadcasts over the other dims."""
    import torch

    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.ndim:
        t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise
