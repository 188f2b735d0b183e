"""Ranked preference loss over K generations per prompt (RankDPO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    check_choice,
    check_positive,
    check_shapes,
    compute_dtype,
    detached,
    masked_mean,
    tie_aware_accuracy,
)

RANKED_WEIGHTINGS = ("lambda", "uniform")


def ranked_dpo_loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    scores: torch.Tensor,
    beta: float = 5000.0,
    weighting: str = "lambda",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RankDPO (Karthik et al. 2024, "Scalable Ranked Preference Optimization for Text-to-Image Generation").

    Diffusion-DPO over every ordered pair of a ranked list, weighted LambdaRank-style (Burges 2010) by how much
    swapping the pair would change the list's DCG.

    Args:
        err: (B, K) mean squared error per sample (mean over C, H, W) of the policy on each of K >= 2 items of a
            prompt; all items of a prompt share ``t`` and ``noise``.
        ref_err: (B, K) the frozen reference's errors on the same items.
        scores: (B, K) preference scores, higher = preferred (only their order within a prompt matters; never
            differentiated).
        beta: > 0; the default 5000 is Diffusion-DPO's and, like it, assumes errors that are means over C, H, W.
        weighting: ``"lambda"`` (the paper's) or ``"uniform"``.

    With the implicit reward ``s = -(err - ref_err)``, every pair with ``score_i > score_j`` contributes
    ``l_ij = -logσ(β/2 · (s_i - s_j))`` with weight ``w_ij``:

    - ``uniform``: ``w_ij = 1``;
    - ``lambda``: ``w_ij = |G_i - G_j| · |1/D(τ_i) - 1/D(τ_j)|`` with gain ``G = 2^g - 1`` (g = number of items of
      the prompt with a strictly lower score), ``τ`` = 1-based rank of the item when the prompt's items are
      sorted by the detached ``s``, descending, ties broken by the lower index first, and ``D(τ) = log2(1 + τ)``.

    Per prompt ``L_b = Σ w_ij·l_ij / Σ w_ij`` over its pairs, and the loss is the mean of ``L_b`` over the prompts
    that have pairs. With K = 2 this equals ``diffusion_dpo_loss`` on the (winner, loser) columns, for both
    weightings (a single pair's weight cancels).

    Ties: items with equal scores form no pair; a prompt whose scores are all equal has no pairs and is left out
    of the mean. If no prompt in the batch has a pair, the loss is 0, computed from the inputs so it is still
    connected to the autograd graph (``backward`` works and gives zero gradients). With lambda weighting every
    pair has a positive weight in exact arithmetic (``g_i > g_j`` for a preferred item and ranks are distinct),
    so a zero weight sum can only come from floating-point rounding with very large K; such a prompt is treated
    like one without pairs rather than giving 0/0. The weights are computed as ``G·2^-max(g)`` per prompt, which
    cancels in ``L_b`` and keeps ``2^g`` from overflowing for large K.

    Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``rewards/margins`` (mean ``β/2·(s_i - s_j)`` over all pairs),
        ``rewards/accuracies`` (fraction of pairs with ``s_i > s_j``, a tie 1/2), ``ranked/num_pairs`` (pairs in
        the batch), ``ranked/prompts_with_pairs``, ``mse/policy`` and ``mse/ref`` (mean errors). Pair metrics
        of a batch without pairs are 0.
    """
    beta = _check_ranked("ranked_dpo_loss", ("err", "ref_err", "scores"), (err, ref_err, scores), beta, weighting)
    # scores only decide the order; they do not set the compute dtype
    dtype = compute_dtype(err, ref_err)
    e, r = err.to(dtype), ref_err.to(dtype)
    sc = scores.detach()
    s = -(e - r)  # (B, K)
    loss, metrics = _ranked_pairwise(s, sc, beta / 2, weighting, dtype)
    metrics.update({"mse/policy": e.mean(), "mse/ref": r.mean()})
    return loss, detached(metrics)


def ranked_sequence_dpo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    beta: float = 0.1,
    weighting: str = "lambda",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RankDPO on sequences: `ranked_dpo_loss`'s LambdaRank-weighted pairs with DPO's sequence implicit reward.

    Args:
        logps: (B, K) the policy's log-likelihood of each of K >= 2 sequences of a prompt (summed over tokens, or a
            per-token mean for length-normalised variants).
        ref_logps: (B, K) the reference's on the same sequences.
        scores: (B, K) preference scores, higher = preferred (only their order within a prompt matters).
        beta: > 0, on the scale of `logps` (TRL's 0.1 for summed log-probs).
        weighting: ``"lambda"`` or ``"uniform"``, as `ranked_dpo_loss`.

    With ``s = logps - ref_logps``, every pair with ``score_i > score_j`` contributes
    ``-logσ(β · (s_i - s_j))`` (DPO's sigmoid loss on the pair), weighted and averaged per prompt exactly as
    `ranked_dpo_loss` (same weights, ties, prompts without pairs, dtypes). With K = 2 it equals `dpo_loss`
    (sigmoid) on the (winner, loser) columns.

    Returns:
        ``(loss, metrics)``: ``rewards/margins`` (mean ``β·(s_i - s_j)`` over all pairs), ``rewards/accuracies``,
        ``ranked/num_pairs``, ``ranked/prompts_with_pairs``, ``logps/policy`` and ``logps/ref`` (mean
        log-likelihoods).
    """
    beta = _check_ranked("ranked_sequence_dpo_loss", ("logps", "ref_logps", "scores"), (logps, ref_logps, scores),
                         beta, weighting)
    dtype = compute_dtype(logps, ref_logps)
    lp, r = logps.to(dtype), ref_logps.to(dtype)
    loss, metrics = _ranked_pairwise(lp - r, scores.detach(), beta, weighting, dtype)
    metrics.update({"logps/policy": lp.mean(), "logps/ref": r.mean()})
    return loss, detached(metrics)


def _check_ranked(fn: str, names: tuple[str, str, str], tensors: tuple[torch.Tensor, ...], beta: float,
                  weighting: str) -> float:
    """Both ranked losses' argument checks: three (B, K) tensors with K >= 2, β > 0, a known weighting. Returns β."""
    check_shapes(fn, names, tensors, "BK")
    if tensors[0].shape[1] < 2:
        raise ValueError(f"{fn}: need K >= 2 items per prompt, got {names[0]} {tuple(tensors[0].shape)}")
    beta = check_positive(fn, "beta", beta)
    check_choice(fn, "weighting", weighting, RANKED_WEIGHTINGS)
    return beta


def _ranked_pairwise(s: torch.Tensor, sc: torch.Tensor, scale: float, weighting: str,
                     dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pairwise core of both ranked losses: implicit rewards `s` (B, K), detached scores `sc` (B, K), pair
    loss ``-logσ(scale · (s_i - s_j))`` for ``sc_i > sc_j``, LambdaRank or uniform weights, per-prompt weighted
    means averaged over prompts with pairs (see `ranked_dpo_loss`). Returns the loss and the pair metrics."""
    K = s.shape[1]
    is_pair = sc[:, :, None] > sc[:, None, :]  # (B, K, K): item i preferred over item j
    diff = s[:, :, None] - s[:, None, :]
    pair_loss = -F.logsigmoid(scale * diff)
    if weighting == "uniform":
        w = is_pair.to(dtype)
    else:
        g = (sc[:, None, :] < sc[:, :, None]).sum(-1)  # (B, K): items scored strictly lower
        g_max = g.max(dim=1, keepdim=True).values
        gain = torch.exp2((g - g_max).to(dtype)) - torch.exp2(-g_max.to(dtype))  # (2^g - 1) · 2^-g_max
        sd = s.detach()
        idx = torch.arange(K, device=s.device)
        # ahead[b, i, j]: item j is ranked before item i
        ahead = (sd[:, None, :] > sd[:, :, None]) | (
            (sd[:, None, :] == sd[:, :, None]) & (idx[None, None, :] < idx[None, :, None])
        )
        tau = 1 + ahead.sum(-1)
        inv_d = 1 / torch.log2(1 + tau.to(dtype))
        w = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
        w = torch.where(is_pair, w, torch.zeros_like(w))

    zero = torch.zeros_like(pair_loss)
    weighted = torch.where(is_pair, w * pair_loss, zero).sum((1, 2))
    w_sum = w.sum((1, 2))
    has_pairs = w_sum > 0
    per_prompt = weighted / torch.where(has_pairs, w_sum, torch.ones_like(w_sum))
    loss = masked_mean(per_prompt, has_pairs)

    with torch.no_grad():
        metrics = {
            "rewards/margins": masked_mean(scale * diff, is_pair),
            "rewards/accuracies": masked_mean(tie_aware_accuracy(diff), is_pair),
            "ranked/num_pairs": is_pair.sum().to(dtype),
            "ranked/prompts_with_pairs": has_pairs.sum().to(dtype),
        }
    return loss, metrics
