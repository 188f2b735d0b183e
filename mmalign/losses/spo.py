"""Step-aware preference loss on single denoising transitions (SPO)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_positive, check_shapes, compute_dtype, detached, tie_aware_accuracy


def spo_step_loss(
    logp_w: torch.Tensor,
    ref_logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_l: torch.Tensor,
    beta: float = 10.0,
    clip_eps: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-aware preference optimization (Liang et al. 2024, SPO, "Aesthetic Post-Training Diffusion Models from
    Generic Preferences with Step-by-step Preference Optimization").

    A DPO loss on one denoising transition ``x_t -> x_{t-1}``: the step-aware preference model picks a winner and
    a loser among candidate next states sampled from the same ``x_t``, and each side's log-ratio is clipped like
    PPO's to keep the step update small.

    Note the argument order: each side's policy and reference log-densities come together,
    ``(logp_w, ref_logp_w, logp_l, ref_logp_l)``, unlike ``dpo_loss``.

    Args:
        logp_w: (B,) Gaussian log-density of the winning ``x_{t-1}`` under the policy's sampler step.
        ref_logp_w: (B,) the same under the frozen reference.
        logp_l: (B,) log-density of the losing ``x_{t-1}`` under the policy.
        ref_logp_l: (B,) the same under the reference.
        beta: > 0; the default 10 is the paper's and assumes the step's Gaussian log-density averaged over the
            latent's elements (as the DDPO-style sampler step of the paper's code reports it); log-densities
            summed over elements would need beta divided by the number of elements.
        clip_eps: ``ε`` in (0, 1), the ratio clip.

    Per side ``ρ = clamp(exp(logp - ref_logp), 1 - ε, 1 + ε)``; per pair ``-logσ(β·log ρ_w - β·log ρ_l)``; loss
    the batch mean. The clamp is applied in log space, ``clamp(logp - ref_logp, log(1-ε), log(1+ε))``, which is the same
    function but cannot overflow. A clipped side has zero gradient. At policy == reference the loss is ``ln 2``.

    Ties: none; tied candidates should not be paired. A pair with equal clipped log-ratios counts 1/2 in
    ``rewards/accuracies``. Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``rewards/chosen`` (mean β·log ρ_w), ``rewards/rejected`` (mean β·log ρ_l),
        ``rewards/margins``, ``rewards/accuracies``, and ``spo/clip_fraction`` (fraction of the 2B ratios clipped).
    """
    fn = "spo_step_loss"
    names = ("logp_w", "ref_logp_w", "logp_l", "ref_logp_l")
    tensors = (logp_w, ref_logp_w, logp_l, ref_logp_l)
    check_shapes(fn, names, tensors, "B")
    beta = check_positive(fn, "beta", beta)
    eps = float(clip_eps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"{fn}: clip_eps must be in (0, 1), got {eps}")
    dtype = compute_dtype(*tensors)
    pw, rw, pl, rl = (t.to(dtype) for t in tensors)

    lo, hi = math.log1p(-eps), math.log1p(eps)
    raw_w, raw_l = pw - rw, pl - rl
    log_rho_w = raw_w.clamp(lo, hi)
    log_rho_l = raw_l.clamp(lo, hi)
    margin = beta * log_rho_w - beta * log_rho_l
    loss = -F.logsigmoid(margin).mean()

    with torch.no_grad():
        clipped = torch.cat([(raw_w < lo) | (raw_w > hi), (raw_l < lo) | (raw_l > hi)])
        metrics = {
            "rewards/chosen": (beta * log_rho_w).mean(),
            "rewards/rejected": (beta * log_rho_l).mean(),
            "rewards/margins": margin.mean(),
            "rewards/accuracies": tie_aware_accuracy(margin).mean(),
            "spo/clip_fraction": clipped.to(dtype).mean(),
        }
    return loss, detached(metrics)
