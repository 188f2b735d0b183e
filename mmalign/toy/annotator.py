"""Simulated annotator: noisy preference labels and rankings from ground-truth rewards.

Pairwise model (Bradley-Terry with a tie margin), for rewards r_a, r_b and ``delta = r_a - r_b``:

- ``|delta| <= tie_margin``  -> label 0.5 (tie), always;
- otherwise                  -> label 1 (a preferred) with probability ``sigmoid(delta / temperature)``, else 0.

Labels follow the shard schema's ``label_0``: 1 means item a (image 0) is preferred. ``temperature = 0`` is the
noiseless annotator (label 1 exactly when delta > tie_margin). The default ``tie_margin = 0`` makes exactly
equal rewards ties, which matters for the nearly binary toy colour reward.

Ranking model (Plackett-Luce with the same temperature): K items are ordered best-first by successively drawing
item i among those left with probability proportional to ``exp(r_i / temperature)``; for K = 2 this is exactly
the pairwise model without ties. Sampled with the Gumbel trick (sort by ``r_i / temperature + Gumbel noise``).

Everything is deterministic given the `rng` (a numpy Generator or an integer seed).
"""

from __future__ import annotations

import numpy as np

from typing import Mapping, Sequence

from mmalign.toy.scenes import as_rng

LABEL_NAMES = {1.0: "A", 0.0: "B", 0.5: "same"}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |x|.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _check_params(temperature: float, tie_margin: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = noiseless), got {temperature}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")


def _pair_arrays(rewards_a: np.ndarray, rewards_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(rewards_a, dtype=np.float64)
    b = np.asarray(rewards_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rewards_a and rewards_b must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def preference_probability(
    rewards_a: np.ndarray, rewards_b: np.ndarray, temperature: float = 0.1, tie_margin: float = 0.0
) -> np.ndarray:
    """P(label = 1) per pair: ``sigmoid(delta / temperature)``, 0.5 inside the tie margin (where the label is 0.5
    for certain), and the step ``delta > 0`` at temperature 0."""
    _check_params(temperature, tie_margin)
    a, b = _pair_arrays(rewards_a, rewards_b)
    delta = a - b
    if temperature == 0:
        p = (delta > 0).astype(np.float64)
    else:
        p = _sigmoid(delta / temperature)
    return np.where(np.abs(delta) <= tie_margin, 0.5, p)


def label_pairs(
    rewards_a: np.ndarray,
    rewards_b: np.ndarray,
    rng: np.random.Generator | int,
    temperature: float = 0.1,
    tie_margin: float = 0.0,
) -> np.ndarray:
    """Labels in {0, 0.5, 1} (float64, same shape as the rewards); 1 = a preferred, 0.5 = tie (module docstring).

    One uniform draw u per pair (ties included, so the stream does not depend on the rewards): label 1 iff
    ``u < sigmoid(delta / temperature)``.
    """
    p = preference_probability(rewards_a, rewards_b, temperature, tie_margin)
    u = as_rng(rng).random(p.shape)
    tie = np.abs(np.asarray(rewards_a, dtype=np.float64) - np.asarray(rewards_b, dtype=np.float64)) <= tie_margin
    return np.where(tie, 0.5, (u < p).astype(np.float64))


def rank(rewards: np.ndarray, rng: np.random.Generator | int, temperature: float = 0.1) -> np.ndarray:
    """Noisy ranking of K items, best first: indices into the last axis of `rewards` ((K,) or (M, K)).

    Plackett-Luce with weights ``exp(r / temperature)`` (module docstring), drawn as
    ``argsort(-(r / temperature + g))`` with i.i.d. standard Gumbel g. At temperature 0 the order is by reward,
    with exactly equal rewards in random order. No tie margin applies: a ranking has no ties.
    """
    _check_params(temperature, 0.0)
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim not in (1, 2) or r.shape[-1] < 1:
        raise ValueError(f"rewards must be (K,) or (M, K), got shape {r.shape}")
    g = as_rng(rng).gumbel(size=r.shape)
    if temperature == 0:
        # Primary key: reward; secondary key: Gumbel noise (random order among equal rewards).
        order = np.lexsort((-g, -r), axis=-1)
    else:
        order = np.argsort(-(r / temperature + g), axis=-1, kind="stable")
    return order


def agreement(labels: np.ndarray, rewards_a: np.ndarray, rewards_b: np.ndarray, tie_margin: float = 0.0) -> float:
    """Fraction of scored pairs whose label agrees with the ground truth.

    Scored pairs: ``|r_a - r_b| > tie_margin`` and label != 0.5. Agreement: label 1 with ``r_a > r_b`` or label 0
    with ``r_a < r_b``. NaN when no pair is scored.
    """
    _check_params(0.0, tie_margin)
    a, b = _pair_arrays(rewards_a, rewards_b)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.shape != a.shape:
        raise ValueError(f"labels shape {labels.shape} does not match rewards shape {a.shape}")
    if not np.isin(labels, (0.0, 0.5, 1.0)).all():
        raise ValueError("labels must be in {0, 0.5, 1}")
    delta = a - b
    scored = (np.abs(delta) > tie_margin) & (labels != 0.5)
    if not scored.any():
        return float("nan")
    agree = (labels == 1.0) == (delta > 0)
    return float(agree[scored].mean())


def expected_agreement(
    rewards_a: np.ndarray, rewards_b: np.ndarray, temperature: float = 0.1, tie_margin: float = 0.0
) -> float:
    """Analytic expectation of `agreement` for `label_pairs` labels: mean of ``sigmoid(|delta| / temperature)``
    over pairs with ``|delta| > tie_margin`` (1 at temperature 0; NaN when there is no such pair)."""
    _check_params(temperature, tie_margin)
    a, b = _pair_arrays(rewards_a, rewards_b)
    delta = np.abs(a - b)
    scored = delta > tie_margin
    if not scored.any():
        return float("nan")
    if temperature == 0:
        return 1.0
    return float(_sigmoid(delta[scored] / temperature).mean())


def _per_dimension(value: float | Mapping[str, float], name: str, dims: Sequence[str]) -> dict[str, float]:
    if isinstance(value, Mapping):
        missing = [d for d in dims if d not in value]
        if missing:
            raise ValueError(f"{name} must give a value for each of {list(dims)}; missing {missing}")
        return {d: float(value[d]) for d in dims}
    return {d: float(value) for d in dims}


def label_dimensions(rewards_a: Mapping[str, np.ndarray], rewards_b: Mapping[str, np.ndarray], dims: Sequence[str],
                     rng: np.random.Generator | int, temperature: float | Mapping[str, float],
                     tie_margin: float | Mapping[str, float]) -> list[dict[str, str]]:
    """Per-dimension labels, VideoAlign-style: one dict ``{dim: "A" | "B" | "same"}`` per pair, each dimension
    labelled by `label_pairs` on its own rewards (`rewards_a[d]`, `rewards_b[d]`: (N,)), with its own temperature and
    tie margin (one value for all, or a dict per dimension). Dimensions draw from `rng` in `dims` order, N uniforms
    each."""
    temps = _per_dimension(temperature, "temperature", dims)
    margins = _per_dimension(tie_margin, "tie_margin", dims)
    rng = as_rng(rng)
    columns = {}
    n = None
    for d in dims:
        if d not in rewards_a or d not in rewards_b:
            raise ValueError(f"rewards_a and rewards_b must both hold {list(dims)}; {d!r} is missing")
        a = np.atleast_1d(np.asarray(rewards_a[d], dtype=np.float64))
        b = np.atleast_1d(np.asarray(rewards_b[d], dtype=np.float64))
        if n is None:
            n = a.shape[0]
        if a.shape != (n,) or b.shape != (n,):
            raise ValueError(f"rewards of {d} must be (N,) arrays of one N, got {a.shape} and {b.shape} (N={n})")
        columns[d] = label_pairs(a, b, rng, temps[d], margins[d])
    return [{d: LABEL_NAMES[float(columns[d][i])] for d in dims} for i in range(n or 0)]
