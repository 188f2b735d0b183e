"""Reward-model evaluation metrics. Pure NumPy; inputs are per-pair human labels and model score differences.

Conventions: `h` holds human labels, 1 = item a preferred, -1 = item b preferred, 0 = tie; `m = score_a - score_b`.

- `pairwise_accuracy`: over the pairs humans did not tie, the fraction with `sign(m) == h`; a model tie (m == 0)
  counts 1/2 (the convention of the loss core's accuracies).
- `accuracy_with_ties` (Deutsch, Foster & Freitag 2023, "Ties Matter"; the "w/ ties" accuracy of VideoAlign): the
  model declares a tie when `|m| <= eps`; with C concordant, D discordant, T_h human-only ties, T_m model-only ties
  and T_hm joint ties, `acc_eq(eps) = (C + T_hm) / (C + D + T_h + T_m + T_hm)`. *Tie calibration* picks the `eps`
  among 0 and the observed `|m|` values that maximises acc_eq (the smallest such eps on a tie). Every threshold is
  evaluated exactly (pairs with equal |m| move together), in O(N log N). Unlike VideoAlign's incremental loop we
  keep eps = 0 (only exact ties) as a candidate: a scorer that ranks every pair right must not be forced to tie.
- `inversion_score` (HPSv2's ranking accuracy): for one ranked list, `1 - inversions / (K (K - 1) / 2)` where an
  inversion is a pair of items the model and the reference order strictly oppositely.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(h, m) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(h, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    if h.shape != m.shape or h.ndim != 1:
        raise ValueError(f"labels and score differences must be 1-D of one length, got {h.shape} and {m.shape}")
    bad = ~np.isin(h, (-1.0, 0.0, 1.0))
    if bad.any():
        raise ValueError(f"human labels must be 1 (a preferred), -1 (b preferred) or 0 (tie); got "
                         f"{sorted(set(h[bad].tolist()))[:5]}")
    if not np.isfinite(m).all():
        raise ValueError("score differences must be finite")
    return h, m


def pairwise_accuracy(h: Sequence[float], m: Sequence[float]) -> dict[str, float]:
    """`{"accuracy", "num_pairs", "num_ties"}`: accuracy over human non-ties (model ties count 1/2); accuracy is
    NaN when every pair is a human tie."""
    h, m = _check(h, m)
    decided = h != 0
    n = int(decided.sum())
    agree = np.where(m[decided] == 0, 0.5, (np.sign(m[decided]) == h[decided]).astype(np.float64))
    return {"accuracy": float(agree.mean()) if n else float("nan"), "num_pairs": n,
            "num_ties": int((~decided).sum())}


def tie_stats(h: Sequence[float], m: Sequence[float], eps: float) -> dict[str, int]:
    """The five counts of Deutsch et al. at threshold `eps` (model tie: |m| <= eps)."""
    h, m = _check(h, m)
    model_tie = np.abs(m) <= eps
    human_tie = h == 0
    return {"C": int((~human_tie & ~model_tie & (np.sign(m) == h)).sum()),
            "D": int((~human_tie & ~model_tie & (np.sign(m) != h)).sum()),
            "T_h": int((human_tie & ~model_tie).sum()), "T_m": int((~human_tie & model_tie).sum()),
            "T_hm": int((human_tie & model_tie).sum())}


def accuracy_with_ties(h: Sequence[float], m: Sequence[float]) -> dict[str, float]:
    """`{"accuracy", "epsilon", "num_pairs"}`: acc_eq at the calibrated tie threshold (see the module docstring)."""
    h, m = _check(h, m)
    n = len(h)
    if n == 0:
        return {"accuracy": float("nan"), "epsilon": float("nan"), "num_pairs": 0}
    a = np.abs(m)
    order = np.argsort(a, kind="stable")
    a_sorted, h_sorted, m_sorted = a[order], h[order], m[order]
    # Pairs with |m| <= eps are model ties: correct iff the human tied. The others are correct iff concordant.
    tie_correct = (h_sorted == 0).astype(np.int64)
    concordant = ((h_sorted != 0) & (np.sign(m_sorted) == h_sorted)).astype(np.int64)
    # Candidate thresholds: each distinct |m|; `last` = index of the last pair with that value.
    last = np.flatnonzero(np.r_[a_sorted[1:] != a_sorted[:-1], True])
    eps = a_sorted[last]
    acc = (np.cumsum(tie_correct)[last] + concordant.sum() - np.cumsum(concordant)[last]) / n
    if eps[0] > 0:  # eps = 0 is a candidate too: only exact ties (none here), so every pair is ranked
        eps, acc = np.r_[0.0, eps], np.r_[concordant.sum() / n, acc]
    best = int(np.argmax(acc))  # the first maximum: the smallest threshold
    return {"accuracy": float(acc[best]), "epsilon": float(eps[best]), "num_pairs": n}


def inversion_score(model_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """`1 - inversions / (K (K - 1) / 2)` for one list of K >= 2 items (higher score = better in both)."""
    s = np.asarray(model_scores, dtype=np.float64)
    r = np.asarray(reference_scores, dtype=np.float64)
    if s.shape != r.shape or s.ndim != 1 or len(s) < 2:
        raise ValueError(f"need two 1-D score lists of one length K >= 2, got {s.shape} and {r.shape}")
    ds = np.sign(s[:, None] - s[None, :])
    dr = np.sign(r[:, None] - r[None, :])
    k = len(s)
    inversions = int(np.triu(ds * dr < 0, 1).sum())
    return 1.0 - inversions / (k * (k - 1) / 2)


def clip_score_aggregates(cosines: Sequence[float]) -> dict[str, float]:
    """The two set-level CLIP scores of N image-text cosines (NaN for N = 0):

    - `mean`: the mean of the per-image scores `100 * max(cos, 0)` (what averaging `clip_score`'s scores gives);
    - `torchmetrics`: `max(100 * mean(cos), 0)`, what torchmetrics' `CLIPScore` reports over a batch or a whole
      `update` / `compute` run (it sums `100 * cos` unclamped and clamps only the mean): the number papers that use
      torchmetrics report. The two are equal when no cosine is negative."""
    c = np.asarray(cosines, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"cosines must be 1-D, got shape {c.shape}")
    if len(c) == 0:
        return {"mean": float("nan"), "torchmetrics": float("nan")}
    return {"mean": float(np.mean(100.0 * np.maximum(c, 0.0))), "torchmetrics": float(max(100.0 * c.mean(), 0.0))}


def labels_from_pair(label_0: float) -> int:
    """A `pair` sample's label_0 (1 / 0 / 0.5) -> 1 / -1 / 0."""
    return {1.0: 1, 0.0: -1, 0.5: 0}[float(label_0)]


def labels_from_video(label: str) -> int:
    """A `video_pair` label (A / B / same) -> 1 / -1 / 0."""
    return {"A": 1, "B": -1, "same": 0}[label]
