"""Reward-weighted regression on per-sample denoising errors."""

from __future__ import annotations

import torch

from ._common import check_positive, check_shapes, compute_dtype, detached


def rwr_loss(
    err: torch.Tensor,
    rewards: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-weighted regression (Peters & Schaal 2007; for text-to-image Lee et al. 2023, "Aligning Text-to-Image
    Models using Human Feedback"; for flow models Flow-RWR, Liu et al. 2025).

    Args:
        err: (B,) per-sample training loss, e.g. mean squared error (mean over C, H, W) of the denoising or
            velocity prediction, or a negative log-likelihood.
        rewards: (B,) scalar reward per sample; never differentiated.
        temperature: ``τ`` > 0; its scale is the rewards' (small τ = nearly best-of-batch, large τ = plain SFT).

    ``w = softmax(rewards / τ) · B``, detached (weights average 1, so the loss has the scale of ``mean(err)``);
    ``loss = mean(w · err)``.

    Ties: equal rewards get equal weights. Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``rwr/weight_max`` (largest weight, at most B), ``rwr/ess`` (effective sample size
        ``1 / Σ p²`` of the softmax, from 1 to B), ``rewards/mean``, ``mse/policy`` (unweighted mean err).
    """
    fn = "rwr_loss"
    check_shapes(fn, ("err", "rewards"), (err, rewards), "B")
    tau = check_positive(fn, "temperature", temperature)
    dtype = compute_dtype(err, rewards)
    e = err.to(dtype)
    r = rewards.detach().to(dtype)

    p = torch.softmax(r / tau, dim=0)
    w = p * e.shape[0]
    loss = (w * e).mean()
    metrics = {
        "rwr/weight_max": w.max(),
        "rwr/ess": 1 / (p * p).sum(),
        "rewards/mean": r.mean(),
        "mse/policy": e.mean(),
    }
    return loss, detached(metrics)
