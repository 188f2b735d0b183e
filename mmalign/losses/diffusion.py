"""Preference losses on per-sample denoising errors: Diffusion-DPO, Flow-DPO and MaPO.

Convention (shared with the adapters): ``err`` is the per-sample mean squared error of the network's prediction,
averaged over every non-batch dimension (C, H, W, and frames for video), at a ``t`` and ``noise`` that a winner and
its loser share. ``-err`` is the log-likelihood surrogate, so these losses are ``dpo_loss`` on ``-err``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_choice, check_positive, check_shapes, compute_dtype, detached, tie_aware_accuracy
from .dpo import _check_dpo_options, _pair_losses, _reward_metrics

FLOW_BETA_SCHEDULES = ("constant", "(1-t)^2")

_ERR_NAMES = ("err_w", "err_l", "ref_err_w", "ref_err_l")


def _mse_metrics(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor) -> dict:
    return {
        "mse/policy_chosen": err_w.mean(),
        "mse/policy_rejected": err_l.mean(),
        "mse/ref_chosen": ref_w.mean(),
        "mse/ref_rejected": ref_l.mean(),
    }


def diffusion_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023): DPO with the denoising error as the negative log-likelihood surrogate.

    Args:
        err_w: (B,) mean squared error per sample of the policy's prediction (noise / v / x0 target) on the winner.
        err_l: (B,) the same on the loser (same ``t`` and ``noise`` as its winner).
        ref_err_w: (B,) the frozen reference's error on the winner.
        ref_err_l: (B,) the frozen reference's error on the loser.
        beta: > 0. The default 5000 (the paper's value for SD 1.5 / SDXL) assumes per-sample errors that are
            means over C, H, W; errors summed over pixels would need beta divided by the number of elements.
        loss_type: any ``dpo_loss`` type; the paper's loss is ``"sigmoid"``.
        label_smoothing: as in ``dpo_loss`` (sigmoid and robust only; any other type raises if it is > 0).

    Exactly ``dpo_loss(-err_w, -err_l, -ref_err_w, -ref_err_l, beta / 2, loss_type, label_smoothing)``; for
    sigmoid without smoothing::

        z = -beta/2 · ((err_w - err_l) - (ref_err_w - ref_err_l)),   loss = mean(-logσ(z))

    (the factor 1/2 is the paper's; it comes from the Gaussian log-density ``-||ε - ε_θ||² / 2``). At
    policy == reference the sigmoid loss is ``ln 2``. Worked value: err_w .1000, ref_err_w .1002, err_l .1500,
    ref_err_l .1499, beta 5000 -> z = 0.75, loss 0.386871.

    Ties: none; drop tied pairs before calling. A pair with z == 0 counts 1/2 in ``rewards/accuracies``.
    Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: the ``dpo_loss`` reward metrics on the ``beta/2`` scale (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``) and the mean errors
        ``mse/policy_chosen``, ``mse/policy_rejected``, ``mse/ref_chosen``, ``mse/ref_rejected``.
    """
    fn = "diffusion_dpo_loss"
    tensors = (err_w, err_l, ref_err_w, ref_err_l)
    check_shapes(fn, _ERR_NAMES, tensors, "B")
    beta = check_positive(fn, "beta", beta)
    e = _check_dpo_options(fn, loss_type, label_smoothing)
    dtype = compute_dtype(*tensors)
    ew, el, rw, rl = (t.to(dtype) for t in tensors)

    dc = (-ew) - (-rw)
    dr = (-el) - (-rl)
    loss = _pair_losses(dc, dr, beta / 2, loss_type, e).mean()
    metrics = _reward_metrics(dc, dr, beta / 2)
    metrics.update(_mse_metrics(ew, el, rw, rl))
    return loss, detached(metrics)


def flow_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    t: torch.Tensor | None = None,
    beta_schedule: str = "constant",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human Feedback"): Diffusion-DPO on velocity errors.

    Args:
        err_w: (B,) mean squared error per sample of the predicted velocity ``v = noise - x0`` on the winner,
            a mean over all non-batch dimensions (C, H, W and frames).
        err_l: (B,) the same on the loser (same ``t`` and ``noise`` as its winner).
        ref_err_w: (B,) the frozen reference's velocity error on the winner.
        ref_err_l: (B,) the frozen reference's velocity error on the loser.
        beta: > 0, no default: its scale depends on the model's velocity-error magnitudes. Like Diffusion-DPO it
            assumes errors averaged over all non-batch dimensions (values in the thousands are typical).
        t: (B,) flow time in [0, 1] per pair, ``x_t = (1-t)·x0 + t·noise`` (t = 1 is pure noise); required by
            the ``"(1-t)^2"`` schedule. With ``"constant"`` it is optional, shape-checked, and has no effect.
        beta_schedule: ``"constant"`` or ``"(1-t)^2"``, which scales beta per sample, ``β_b = β·(1-t_b)²`` (the
            weighting that the paper's derivation gives; pairs near pure noise then barely contribute, and at
            t = 1 a pair contributes ``ln 2`` with zero gradient).

    Per pair, ``z = -β_b/2 · ((err_w - err_l) - (ref_err_w - ref_err_l))``, ``loss = mean(-logσ(z))``; with the
    constant schedule this is ``diffusion_dpo_loss(..., beta)`` with loss_type ``"sigmoid"``. At policy ==
    reference the loss is ``ln 2``.

    Ties: none; drop tied pairs before calling. A pair with z == 0 counts 1/2 in ``rewards/accuracies``.
    Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: reward metrics on the per-sample ``β_b/2`` scale (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``), ``mse/policy_chosen``,
        ``mse/policy_rejected``, ``mse/ref_chosen``, ``mse/ref_rejected``, and ``beta/effective`` (mean β_b).
    """
    fn = "flow_dpo_loss"
    tensors = (err_w, err_l, ref_err_w, ref_err_l)
    check_shapes(fn, _ERR_NAMES, tensors, "B")
    beta = check_positive(fn, "beta", beta)
    check_choice(fn, "beta_schedule", beta_schedule, FLOW_BETA_SCHEDULES)
    if t is None and beta_schedule != "constant":
        raise ValueError(f"{fn}: beta_schedule={beta_schedule!r} needs the flow time t, shape (B,), in [0, 1]")
    dtype = compute_dtype(*tensors)
    ew, el, rw, rl = (x.to(dtype) for x in tensors)

    beta_b: float | torch.Tensor = beta
    if t is not None:
        check_shapes(fn, (*_ERR_NAMES, "t"), (*tensors, t), "B")
        t = t.to(dtype)
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(
                f"{fn}: t must lie in [0, 1] (flow time, t = 1 pure noise), got values in "
                f"[{t.min().item()}, {t.max().item()}]; scheduler timesteps (0..1000) must be divided by "
                "num_train_timesteps first"
            )
        if beta_schedule == "(1-t)^2":
            beta_b = beta * (1 - t.detach()) ** 2

    dc = (-ew) - (-rw)
    dr = (-el) - (-rl)
    loss = _pair_losses(dc, dr, beta_b / 2, "sigmoid", 0.0).mean()
    metrics = _reward_metrics(dc, dr, beta_b / 2)
    metrics.update(_mse_metrics(ew, el, rw, rl))
    metrics["beta/effective"] = torch.as_tensor(beta_b, dtype=dtype, device=ew.device).mean()
    return loss, detached(metrics)


def _x_over_expm1(x: torch.Tensor) -> torch.Tensor:
    """``x / (exp(x) - 1)`` with value 1 and finite gradients at x = 0, and no overflow for large |x|.

    Each branch only ever sees inputs where it is well defined (the "double where"), because ``torch.where``
    still back-propagates through the branch it discards: a NaN there would poison the gradient.
    """
    small = x.abs() < 1e-3
    one = torch.ones_like(x)
    pos = torch.where(small | (x < 0), one, x)
    neg = torch.where(small | (x > 0), -one, x)
    # x / (e^x - 1) = x·e^-x / (1 - e^-x) for x > 0: never forms e^x, so no inf/inf for large x.
    f_pos = pos * torch.exp(-pos) / -torch.expm1(-pos)
    f_neg = neg / torch.expm1(neg)
    # Taylor series 1 - x/2 + x²/12 - x⁴/720 (B₃ = 0): the next term is below 2e-15 for |x| < 1e-3.
    f_small = 1 - x / 2 + x * x / 12
    return torch.where(small, f_small, torch.where(x > 0, f_pos, f_neg))


def mapo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MaPO, margin-aware preference optimization without a reference model (Hong et al. 2024).

    Args:
        err_w: (B,) mean squared error per sample (mean over C, H, W) of the policy on the winner.
        err_l: (B,) the same on the loser (same ``t`` and ``noise`` as its winner).
        beta: > 0, weight of the margin (log-odds) term; the default 0.1 is the reference implementation's and
            assumes per-sample errors that are means over C, H, W.
        snr_value: ``s`` > 0 in ``f`` below (reference default 0.5).
        num_train_timesteps: ``T`` > 0, the scheduler's number of training timesteps, scaling the log odds.

    With ``f(m) = s·m / expm1(s·m)`` and ``f(0) = 1`` (its limit; value and gradient are finite there)::

        L = mean(err_w) - β · mean(logσ(T · (f(err_w) - f(err_l))))

    The first term is the ordinary denoising loss on the winner; ``f`` is decreasing in ``m``, so the second term
    rewards a lower error on the winner than on the loser.

    Ties: none; drop tied pairs before calling (a pair with equal errors still contributes ``β·ln 2`` and its
    denoising term). ``rewards/accuracies`` counts a pair with equal ``f`` as 1/2.
    Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``mapo/sft_loss`` (mean err_w), ``mapo/ratio_loss`` (``-β·mean logσ(...)``),
        ``mapo/log_odds`` (mean ``T·(f(err_w) - f(err_l))``), ``rewards/accuracies`` (mean of log odds > 0,
        a tie 1/2), ``mse/policy_chosen``, ``mse/policy_rejected``.
    """
    fn = "mapo_loss"
    check_shapes(fn, ("err_w", "err_l"), (err_w, err_l), "B")
    beta = check_positive(fn, "beta", beta)
    s = check_positive(fn, "snr_value", snr_value)
    T = check_positive(fn, "num_train_timesteps", num_train_timesteps)
    dtype = compute_dtype(err_w, err_l)
    ew, el = err_w.to(dtype), err_l.to(dtype)

    log_odds = T * (_x_over_expm1(s * ew) - _x_over_expm1(s * el))
    sft = ew.mean()
    ratio = -beta * F.logsigmoid(log_odds).mean()
    loss = sft + ratio
    metrics = {
        "mapo/sft_loss": sft,
        "mapo/ratio_loss": ratio,
        "mapo/log_odds": log_odds.mean(),
        "rewards/accuracies": tie_aware_accuracy(log_odds.detach()).mean(),
        "mse/policy_chosen": ew.mean(),
        "mse/policy_rejected": el.mean(),
    }
    return loss, detached(metrics)

