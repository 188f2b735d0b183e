"""A stochastic sampler step as a Gaussian transition `x_next ~ N(mean, std²·I)`: the type the `*_with_logprob`
steps return (`mmalign.samplers.ddim`, `mmalign.samplers.flow_sde`) and the log-density they report.

Log-density convention: the Gaussian log-density of each element of `x_next`, MEAN over all non-batch dimensions,
as the published SPO and DDPO code (and flow_grpo) report it. `spo_step_loss`'s default β = 10 assumes this mean;
the exact log-density of the whole sample is `numel · log_prob` (numel = elements per sample), so log-densities
summed over elements would need β / numel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class GaussianStep:
    """One step `x_t -> x_next`.

    prev_sample: (B, ...) the next state (drawn, or the one given to be scored), in the dtype of the input sample.
    mean: (B, ...) the transition mean, in the step's compute dtype (float32 or float64).
    std: (B,) the transition standard deviation (the same for every element of a sample).
    log_prob: (B,) the Gaussian log-density of `prev_sample`, mean over its non-batch elements; NaN where the
        step is deterministic (std 0), which has no density.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def per_sample(x: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions, to broadcast over a sample's elements."""
    return x.reshape(-1, *([1] * (ndim - 1)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32 (a half-precision mean loses the small
    difference `x_next - mean` that the log-density is made of)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,) mean over non-batch dims of `log N(x; mean, std²)` = `-(x - mean)²/(2·std²) - log std - log √(2π)`;
    `std` (B,); NaN where std is 0. `x` is detached: the density is a function of the policy's mean and std only."""
    s = per_sample(std, mean.ndim)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    elem = -((x.detach().to(mean.dtype) - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    out = elem.mean(dim=tuple(range(1, elem.ndim)))
    return torch.where(std > 0, out, torch.full_like(out, float("nan")))


def draw_or_score(fn: str, mean: Tensor, std: Tensor, prev_sample: Tensor | None, generator: Generators,
                  noise_dtype: torch.dtype, out_dtype: torch.dtype) -> GaussianStep:
    """Draw `prev_sample = mean + std·noise` (noise from `generator`, in `noise_dtype`, as diffusers' `randn_tensor`
    draws it) or, when `prev_sample` is given, score it; either way report its log-density. Scoring a step that
    has no density (std 0) is a ValueError naming `fn`."""
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=noise_dtype)
        prev_sample = (mean + per_sample(std, mean.ndim) * noise.to(mean.dtype)).to(out_dtype)
    else:
        if generator is not None:
            raise ValueError(f"{fn}: pass either prev_sample (to score it) or generator (to draw one), not both")
        if prev_sample.shape != mean.shape:
            raise ValueError(f"{fn}: prev_sample has shape {tuple(prev_sample.shape)}, the sample "
                             f"{tuple(mean.shape)}; they must match")
        if bool((std <= 0).any()):
            rows = torch.nonzero(std <= 0).flatten().tolist()
            raise ValueError(f"{fn}: the step of batch rows {rows} is deterministic (std 0) and has no density to "
                             "score; leave such steps out of training")
    return GaussianStep(prev_sample, mean, std, log_prob(prev_sample, mean, std))
