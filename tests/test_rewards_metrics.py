"""Evaluation metrics against hand computations and a brute-force reading of their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmalign.rewards.metrics import accuracy_with_ties, inversion_score, pairwise_accuracy, tie_stats

# human labels (1 a, -1 b, 0 tie) and model differences score_a - score_b
H = [1, -1, 0, 1, 0, -1]
M = [0.5, -0.2, 0.05, 0.1, -0.3, 0.02]


def test_pairwise_accuracy_hand_example():
    # non-tie pairs: (1, .5) right, (-1, -.2) right, (1, .1) right, (-1, .02) wrong -> 3/4
    assert pairwise_accuracy(H, M) == {"accuracy": 0.75, "num_pairs": 4, "num_ties": 2}
    # a model tie counts one half
    assert pairwise_accuracy([1, 1], [0.0, 1.0])["accuracy"] == 0.75


def test_accuracy_with_ties_hand_example():
    # By hand, sorted |m| = .02 (h -1), .05 (h 0), .1 (h 1), .2 (h -1), .3 (h 0), .5 (h 1):
    # eps .02: T_m=1, T_h=2, C=3 -> 3/6;  eps .05: T_m=1, T_hm=1, C=3, T_h=1 -> 4/6 (the best)
    # eps .1: 3/6; eps .2: 2/6; eps .3: 3/6; eps .5: 2/6; eps 0 (no model tie): C=3, D=1, T_h=2 -> 3/6
    out = accuracy_with_ties(H, M)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["epsilon"] == pytest.approx(0.05)
    assert tie_stats(H, M, 0.05) == {"C": 3, "D": 0, "T_h": 1, "T_m": 1, "T_hm": 1}
    # a scorer that ranks every pair right keeps eps = 0 (no model ties) instead of being forced to tie
    assert accuracy_with_ties([1, -1, 1], [0.5, -0.5, 0.5]) == {"accuracy": 1.0, "epsilon": 0.0, "num_pairs": 3}


def test_accuracy_with_ties_equals_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        h = rng.choice([-1, 0, 1], size=n)
        m = np.round(rng.normal(size=n), 1)  # rounding makes many equal |m|: thresholds must move them together
        best = -1.0
        for eps in np.unique(np.r_[0.0, np.abs(m)]):
            s = tie_stats(h, m, eps)
            best = max(best, (s["C"] + s["T_hm"]) / n)
        assert accuracy_with_ties(h, m)["accuracy"] == pytest.approx(best)


def test_inversion_score():
    # (0,1) agree, (0,2) agree, (1,2): model 1 < 2, reference 2 > 1 -> one inversion of three pairs
    assert inversion_score([3, 1, 2], [3, 2, 1]) == pytest.approx(2 / 3)
    assert inversion_score([1, 2, 3, 4], [4, 3, 2, 1]) == 0.0
    # (0,1) is a model tie (no inversion); (0,2) and (1,2) are inversions -> 1 - 2/3
    assert inversion_score([1, 1, 2], [5, 4, 1]) == pytest.approx(1 / 3)
    brute = sum((a[0] - b[0]) * (a[1] - b[1]) < 0 for a, b in itertools.combinations(zip([4, 2, 9, 1], [1, 2, 3, 4]), 2))
    assert inversion_score([4, 2, 9, 1], [1, 2, 3, 4]) == pytest.approx(1 - brute / 6)


def test_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="human labels must be 1"):
        pairwise_accuracy([2], [0.1])
    with pytest.raises(ValueError, match="one length"):
        accuracy_with_ties([1, 0], [0.1])
