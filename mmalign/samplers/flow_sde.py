"""The rectified-flow SDE step with its log-density (Flow-GRPO, Liu et al. 2025), for RL / step-wise preference
training of flow-matching models.

Convention of `mmalign.samplers.flow`: `x_t = (1 - t)·x0 + t·noise`, `v = noise - x0`, t = 1 is pure noise; a step
goes from t to `t_next < t`, `dt = t_next - t < 0`. The probability-flow ODE `dx = v·dt` has the same marginals as
the reverse-time SDE with diffusion `σ_t = a·sqrt(t / (1 - t))` (a = `noise_level`) and drift
`v + σ_t²/(2t)·(x + (1 - t)·v)` (the score of the marginal is `-(x + (1 - t)·v) / t`). Its Euler-Maruyama step:

    mean = x + [v + σ_t²/(2t)·(x + (1 - t)·v)]·dt
    std  = σ_t·sqrt(-dt)
    x_next ~ N(mean, std²·I)

As `noise_level -> 0` this is the Euler step `x + dt·v` of `FlowMatchEulerDiscreteScheduler`.

Source: flow_grpo's `sde_step_with_logprob`, `sde_type='sde'` (github.com/yifan123/flow_grpo,
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py): `std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigma_max,
sigma))) * noise_level` with `sigma_max = sigmas[1]`, `prev_sample_mean = sample*(1 + std_dev_t**2/(2*sigma)*dt) +
model_output*(1 + std_dev_t**2*(1 - sigma)/(2*sigma))*dt`, noise `std_dev_t*sqrt(-dt)`, and the Gaussian
log-density mean over all non-batch dims, computed in float32. At t = 1 (where σ_t is infinite) it puts
`1 - sigmas[1]` in the denominator; `sigmas[1]` is the next t of the step from t = 1, so here the denominator is
`1 - t_next` there, the same number without needing the scheduler. Its 'cps' variant (coefficients-preserving
sampling) is not implemented here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.samplers.gaussian import GaussianStep, Generators, compute_dtype, draw_or_score, per_sample

FN = "sde_step_with_logprob"


def sde_step_with_logprob(v: Tensor, sample: Tensor, t: float | Tensor, t_next: float | Tensor,
                          noise_level: float = 0.7, prev_sample: Tensor | None = None,
                          generator: Generators = None) -> GaussianStep:
    """One flow SDE step from `t` to `t_next` with its Gaussian transition and log-density (module docstring).

    Args:
        v: (B, ...) the model's velocity at `sample` (after classifier-free guidance, if any).
        sample: (B, ...) x_t.
        t, t_next: floats or (B,) per-sample times with `0 <= t_next < t <= 1`; with a diffusers flow scheduler
            `t = scheduler.sigmas[i]`, `t_next = scheduler.sigmas[i + 1]`.
        noise_level: a > 0, the diffusion's scale (flow_grpo's default 0.7).
        prev_sample: (B, ...) the next state to score; None draws one.
        generator: for the draw (float32 noise, as flow_grpo draws it).

    Returns:
        `GaussianStep` (prev_sample in the sample's dtype, mean, std (B,), log_prob (B,) = mean over elements, the
        same convention as `ddim_step_with_logprob`).
    """
    a = float(noise_level)
    if not a > 0:
        raise ValueError(f"{FN}: noise_level must be > 0, got {a}; 0 is the deterministic Euler step, which has "
                         "no density (mmalign.samplers.flow)")
    dtype = compute_dtype(v.dtype)
    x, vel = sample.to(dtype), v.to(dtype)
    t, t_next = _times(t, t_next, sample, dtype)
    dt = t_next - t
    sigma = a * (t / (1 - torch.where(t == 1, t_next, t))) ** 0.5
    tt, dtt, ss = (per_sample(z, x.ndim) for z in (t, dt, sigma))
    mean = x + (vel + ss**2 / (2 * tt) * (x + (1 - tt) * vel)) * dtt
    std = sigma * (-dt) ** 0.5
    return draw_or_score(FN, mean, std, prev_sample, generator, dtype, sample.dtype)


def _times(t: float | Tensor, t_next: float | Tensor, sample: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(t, t_next) as (B,) tensors on the sample's device, checked `0 <= t_next < t <= 1`."""
    b = sample.shape[0]
    out = []
    for name, value in (("t", t), ("t_next", t_next)):
        z = torch.as_tensor(value, dtype=dtype, device=sample.device).reshape(-1)
        if z.numel() == 1:
            z = z.expand(b)
        if z.shape[0] != b:
            raise ValueError(f"{FN}: {name} has {z.shape[0]} values for a batch of {b}; give one, or one per sample")
        out.append(z)
    t, t_next = out
    if not bool(((0 <= t_next) & (t_next < t) & (t <= 1)).all()):
        raise ValueError(f"{FN}: need 0 <= t_next < t <= 1 (t = 1 is pure noise), got t {t.tolist()}, "
                         f"t_next {t_next.tolist()}")
    return t, t_next
