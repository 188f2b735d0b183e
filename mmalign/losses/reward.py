"""Reward-model training losses on pairs of scalar rewards: Bradley-Terry, Bradley-Terry with ties, soft labels.

Throughout, ``r_a`` and ``r_b`` are (B,) scalar rewards the model gives the two items of a pair and
``d = r_a - r_b``; the model's probability that a is preferred is ``σ(d)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_positive, check_shapes, compute_dtype, detached, masked_mean, tie_aware_accuracy


def _labels(fn: str, label: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = label.detach().to(dtype)
    if not bool(((y == 1) | (y == -1) | (y == 0)).all()):
        bad = sorted({float(v) for v in y[(y != 1) & (y != -1) & (y != 0)].tolist()})[:5]
        raise ValueError(f"{fn}: label must be 1 (a preferred), -1 (b preferred) or 0 (tie); got values {bad}")
    return y


def _weights(fn: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = weight.detach().to(dtype)
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError(f"{fn}: weight must be finite and >= 0, got min {w.min().item()}, max {w.max().item()}")
    return w


def bt_loss(
    r_a: torch.Tensor,
    r_b: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss (Bradley & Terry 1952; as the reward-model loss of Ouyang et al. 2022).

    Args:
        r_a: (B,) reward of item a.
        r_b: (B,) reward of item b.
        label: (B,) 1 if a is preferred, -1 if b is, 0 for a tie (int or float).
        weight: optional (B,) non-negative per-pair weights (e.g. 1 / pairs per prompt); default all 1.

    Per pair ``-logσ(label · d)``; the loss is the weighted mean over the non-tie pairs,
    ``Σ w·l / Σ w`` over pairs with label != 0. Rewards are unnormalised, so no scale assumption.

    Ties: excluded from the loss (use ``btt_loss`` or ``soft_ce_loss`` to learn from them). A batch with no
    non-tie pair, or whose non-tie weights are all 0, gives a loss of 0 that is still connected to the autograd
    graph (zero gradients).

    Half-precision rewards are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``accuracy`` (fraction of non-tie pairs with ``label·d > 0``, ``d == 0`` counting
        1/2; 0 when there are none), ``margin`` (mean ``label·d`` over non-tie pairs), ``num_pairs`` (non-tie
        pairs) and ``num_ties``.
    """
    fn = "bt_loss"
    names, tensors = ["r_a", "r_b", "label"], [r_a, r_b, label]
    if weight is not None:
        names.append("weight")
        tensors.append(weight)
    check_shapes(fn, names, tensors, "B")
    dtype = compute_dtype(r_a, r_b)
    ra, rb = r_a.to(dtype), r_b.to(dtype)
    y = _labels(fn, label, dtype)
    w = torch.ones_like(ra) if weight is None else _weights(fn, weight, dtype)

    d = ra - rb
    per_pair = -F.logsigmoid(y * d)
    non_tie = y != 0
    w_non_tie = torch.where(non_tie, w, torch.zeros_like(w))
    w_sum = w_non_tie.sum()
    loss = torch.where(non_tie, w * per_pair, torch.zeros_like(per_pair)).sum() / torch.where(
        w_sum > 0, w_sum, torch.ones_like(w_sum)
    )
    with torch.no_grad():
        metrics = {
            "accuracy": masked_mean(tie_aware_accuracy(y * d), non_tie),
            "margin": masked_mean(y * d, non_tie),
            "num_pairs": non_tie.sum().to(dtype),
            "num_ties": (~non_tie).sum().to(dtype),
        }
    return loss, detached(metrics)


def btt_loss(
    r_a: torch.Tensor,
    r_b: torch.Tensor,
    label: torch.Tensor,
    k: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry with ties, the Rao-Kupper model (Rao & Kupper 1967; used for video reward models by
    Liu et al. 2025, VideoReward).

    Args:
        r_a: (B,) reward of item a (``log π_a``).
        r_b: (B,) reward of item b.
        label: (B,) 1 if a is preferred, -1 if b is, 0 for a tie.
        k: the tie parameter ``θ`` > 1; larger k makes ties likelier for a given reward gap (default 5).

    The model: ``P(a > b) = σ(d - ln k)``, ``P(b > a) = σ(-d - ln k)``,
    ``P(tie) = (k² - 1)·σ(d - ln k)·σ(-d - ln k)`` (the three sum to 1). Per pair, the negative log-likelihood:

    - non-tie: ``-logσ(label·d - ln k)``
    - tie: ``-logσ(d - ln k) - logσ(-d - ln k) - ln(k² - 1)``

    and the loss is the mean over all pairs, ties included. Rewards are unnormalised, so no scale assumption.
    Half-precision rewards are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``accuracy`` (non-tie pairs with ``label·d > 0``, ``d == 0`` counting 1/2),
        ``tie_prob`` (mean predicted ``P(tie)`` on the tie pairs; 0 when there are none), ``num_pairs``
        (non-tie pairs) and ``num_ties``.
    """
    fn = "btt_loss"
    check_shapes(fn, ("r_a", "r_b", "label"), (r_a, r_b, label), "B")
    k = check_positive(fn, "k", k)
    if k <= 1:
        raise ValueError(f"{fn}: k must be > 1 (k = 1 gives ties probability 0), got {k}")
    dtype = compute_dtype(r_a, r_b)
    ra, rb = r_a.to(dtype), r_b.to(dtype)
    y = _labels(fn, label, dtype)

    c = math.log(k)
    d = ra - rb
    non_tie_nll = -F.logsigmoid(y * d - c)
    log_a, log_b = F.logsigmoid(d - c), F.logsigmoid(-d - c)
    tie_nll = -log_a - log_b - math.log(k * k - 1)
    is_tie = y == 0
    loss = torch.where(is_tie, tie_nll, non_tie_nll).mean()
    with torch.no_grad():
        tie_prob = (k * k - 1) * torch.exp(log_a + log_b)
        metrics = {
            "accuracy": masked_mean(tie_aware_accuracy(y * d), ~is_tie),
            "tie_prob": masked_mean(tie_prob, is_tie),
            "num_pairs": (~is_tie).sum().to(dtype),
            "num_ties": is_tie.sum().to(dtype),
        }
    return loss, detached(metrics)


def soft_ce_loss(
    r_a: torch.Tensor,
    r_b: torch.Tensor,
    p_a: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Soft-label cross-entropy, i.e. the KL divergence from the label distribution to the model's
    (Kirstain et al. 2023, Pick-a-Pic / PickScore; ties as p = 1/2).

    Args:
        r_a: (B,) reward of item a.
        r_b: (B,) reward of item b.
        p_a: (B,) probability in [0, 1] that a is preferred (1, 0, 1/2 for a tie, or a vote fraction).
        weight: optional (B,) non-negative per-pair weights, e.g. ``1 / num_examples_per_prompt`` so every prompt
            counts once; normalised to sum 1 (they must not all be 0). Default: uniform, a plain mean.

    Per pair ``-[p·logσ(d) + (1-p)·logσ(-d)] - H(p)`` with ``H(p) = -p·ln p - (1-p)·ln(1-p)`` (``0·ln 0 = 0``):
    subtracting the label's entropy makes a perfect prediction ``σ(d) = p`` cost exactly 0, ties included, while
    leaving gradients unchanged. Loss ``Σ (w / Σw) · l``. Rewards are unnormalised, so no scale assumption.
    Half-precision rewards are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``accuracy`` (on pairs with p != 1/2: ``d`` has the sign of ``p - 1/2``, ``d == 0``
        counting 1/2; 0 when there are none), ``cross_entropy`` (the weighted loss without the ``-H(p)`` term),
        ``num_pairs`` (pairs with p != 1/2) and ``num_ties`` (p == 1/2).
    """
    fn = "soft_ce_loss"
    names, tensors = ["r_a", "r_b", "p_a"], [r_a, r_b, p_a]
    if weight is not None:
        names.append("weight")
        tensors.append(weight)
    check_shapes(fn, names, tensors, "B")
    dtype = compute_dtype(r_a, r_b)
    ra, rb = r_a.to(dtype), r_b.to(dtype)
    p = p_a.detach().to(dtype)
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{fn}: p_a must lie in [0, 1], got values in [{p.min().item()}, {p.max().item()}]")
    if weight is None:
        w = torch.full_like(ra, 1.0 / ra.shape[0])
    else:
        w = _weights(fn, weight, dtype)
        total = w.sum()
        if not bool(total > 0):
            raise ValueError(f"{fn}: weight sums to 0; it is normalised to sum 1, so at least one must be > 0")
        w = w / total

    d = ra - rb
    cross_entropy = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    loss = (w * (cross_entropy - entropy)).sum()
    with torch.no_grad():
        decided = p != 0.5
        metrics = {
            "accuracy": masked_mean(tie_aware_accuracy(torch.sign(p - 0.5) * d), decided),
            "cross_entropy": (w * cross_entropy).sum(),
            "num_pairs": decided.sum().to(dtype),
            "num_ties": (~decided).sum().to(dtype),
        }
    return loss, detached(metrics)
