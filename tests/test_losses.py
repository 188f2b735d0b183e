"""Tests for mmalign.losses.

Every loss is checked against an independent reference written here in plain Python ``math`` (NumPy only draws the
random inputs); nothing below calls the torch implementation to produce an expected value, except the invariant
tests, which compare the implementation with itself under a transformation (swap, dtype change, ...).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mmalign.losses as L
from mmalign.losses import (
    bt_loss,
    btt_loss,
    diffusion_dpo_loss,
    dpo_loss,
    flow_dpo_loss,
    mapo_loss,
    ranked_dpo_loss,
    ranked_sequence_dpo_loss,
    rwr_loss,
    soft_ce_loss,
    spo_step_loss,
)

F64 = torch.float64
LN2 = math.log(2.0)


def approx(x: float, rel: float = 1e-6) -> object:
    return pytest.approx(x, rel=rel, abs=1e-12)


def t64(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Independent scalar references (plain Python floats)
# ---------------------------------------------------------------------------------------------------------------


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def acc(x: float) -> float:
    return 1.0 if x > 0 else (0.5 if x == 0 else 0.0)


def ref_dpo_pair(dc: float, dr: float, beta: float, loss_type: str, e: float) -> float:
    d = dc - dr
    if loss_type == "sigmoid":
        return -(1 - e) * logsig(beta * d) - e * logsig(-beta * d)
    if loss_type == "robust":
        return (-(1 - e) * logsig(beta * d) + e * logsig(-beta * d)) / (1 - 2 * e)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "bco_pair":
        return -logsig(beta * dc) - logsig(-beta * dr)
    if loss_type == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -logsig(beta * dc) - 0.5 * logsig(-beta * dc) - 0.5 * logsig(-beta * dr)
    if loss_type == "apo_zero":
        return (1 - sig(beta * dc)) + sig(beta * dr)
    if loss_type == "apo_down":
        return sig(beta * dc) + (1 - sig(beta * d))
    raise KeyError(loss_type)


def ref_dpo(pw, pl, rw, rl, beta, loss_type="sigmoid", e=0.0):
    dcs = [a - b for a, b in zip(pw, rw)]
    drs = [a - b for a, b in zip(pl, rl)]
    loss = mean(ref_dpo_pair(dc, dr, beta, loss_type, e) for dc, dr in zip(dcs, drs))
    metrics = {
        "rewards/chosen": mean(beta * dc for dc in dcs),
        "rewards/rejected": mean(beta * dr for dr in drs),
        "rewards/margins": mean(beta * (dc - dr) for dc, dr in zip(dcs, drs)),
        "rewards/accuracies": mean(acc(dc - dr) for dc, dr in zip(dcs, drs)),
    }
    return loss, metrics


def ref_diffusion_dpo(ew, el, rw, rl, beta, loss_type="sigmoid"):
    """Written from the Diffusion-DPO formula z = -β/2·((ew - el) - (rw - rl)), not via the DPO reference."""
    zs = [-(beta / 2) * ((a - b) - (c - d)) for a, b, c, d in zip(ew, el, rw, rl)]
    if loss_type == "sigmoid":
        return mean(-logsig(z) for z in zs)
    # other types: reuse the per-pair DPO reference on surrogates -err
    return mean(ref_dpo_pair(-(a - c), -(b - d), beta / 2, loss_type, 0.0) for a, b, c, d in zip(ew, el, rw, rl))


def ref_flow_dpo(ew, el, rw, rl, beta, t=None, schedule="constant"):
    out = []
    for i in range(len(ew)):
        b = beta * (1 - t[i]) ** 2 if schedule == "(1-t)^2" else beta
        z = -(b / 2) * ((ew[i] - el[i]) - (rw[i] - rl[i]))
        out.append(-logsig(z))
    return mean(out)


def ref_mapo(ew, el, beta, s, T):
    def f(m: float) -> float:
        x = s * m
        return 1.0 if x == 0 else x / math.expm1(x)

    return mean(ew) - beta * mean(logsig(T * (f(a) - f(b))) for a, b in zip(ew, el))


def ref_spo(lw, rw, ll, rl, beta, eps):
    out = []
    for a, b, c, d in zip(lw, rw, ll, rl):
        rho_w = min(max(math.exp(a - b), 1 - eps), 1 + eps)
        rho_l = min(max(math.exp(c - d), 1 - eps), 1 + eps)
        out.append(-logsig(beta * math.log(rho_w) - beta * math.log(rho_l)))
    return mean(out)


def ref_rwr(err, rewards, tau):
    m = max(r / tau for r in rewards)
    ex = [math.exp(r / tau - m) for r in rewards]
    z = sum(ex)
    w = [x / z * len(err) for x in ex]
    return mean(wi * e for wi, e in zip(w, err))


def ref_ranked(err, ref_err, scores, beta, weighting):
    """Explicit loops over every ordered pair of every prompt."""
    per_prompt = []
    for b in range(len(err)):
        k = len(err[b])
        s = [-(err[b][i] - ref_err[b][i]) for i in range(k)]
        order = sorted(range(k), key=lambda i: (-s[i], i))
        tau = {item: rank + 1 for rank, item in enumerate(order)}
        num = den = 0.0
        for i in range(k):
            for j in range(k):
                if not scores[b][i] > scores[b][j]:
                    continue
                if weighting == "uniform":
                    w = 1.0
                else:
                    g_i = sum(1 for x in scores[b] if x < scores[b][i])
                    g_j = sum(1 for x in scores[b] if x < scores[b][j])
                    gain = abs((2**g_i - 1) - (2**g_j - 1))
                    w = gain * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                num += w * -logsig(beta / 2 * (s[i] - s[j]))
                den += w
        if den > 0:
            per_prompt.append(num / den)
    return mean(per_prompt) if per_prompt else 0.0


def ref_ranked_sequence(logps, ref_logps, scores, beta, weighting):
    """The sequence ranked loss by loops: ref_ranked's pairs and weights with DPO's implicit reward
    s = logp - ref_logp and the pair loss -logσ(β (s_i - s_j)) (no 1/2). Written out again, not derived."""
    per_prompt = []
    for b in range(len(logps)):
        k = len(logps[b])
        s = [logps[b][i] - ref_logps[b][i] for i in range(k)]
        order = sorted(range(k), key=lambda i: (-s[i], i))
        tau = {item: rank + 1 for rank, item in enumerate(order)}
        num = den = 0.0
        for i in range(k):
            for j in range(k):
                if scores[b][i] <= scores[b][j]:
                    continue
                w = 1.0
                if weighting == "lambda":
                    g_i = sum(x < scores[b][i] for x in scores[b])
                    g_j = sum(x < scores[b][j] for x in scores[b])
                    w = abs(2**g_i - 2**g_j) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                num += w * math.log1p(math.exp(-beta * (s[i] - s[j])))
                den += w
        if den > 0:
            per_prompt.append(num / den)
    return mean(per_prompt) if per_prompt else 0.0


def ref_bt(ra, rb, label, weight=None):
    weight = weight or [1.0] * len(ra)
    num = den = 0.0
    for a, b, y, w in zip(ra, rb, label, weight):
        if y != 0:
            num += w * -logsig(y * (a - b))
            den += w
    return num / den if den > 0 else 0.0


def ref_btt(ra, rb, label, k):
    c = math.log(k)
    out = []
    for a, b, y in zip(ra, rb, label):
        d = a - b
        if y == 0:
            out.append(-logsig(d - c) - logsig(-d - c) - math.log(k * k - 1))
        else:
            out.append(-logsig(y * d - c))
    return mean(out)


def ref_soft_ce(ra, rb, p, weight=None):
    weight = weight or [1.0] * len(ra)
    total = sum(weight)

    def xlogx(x: float) -> float:
        return 0.0 if x == 0 else x * math.log(x)

    out = 0.0
    for a, b, pi, w in zip(ra, rb, p, weight):
        d = a - b
        ce = -(pi * logsig(d) + (1 - pi) * logsig(-d))
        h = -(xlogx(pi) + xlogx(1 - pi))
        out += w / total * (ce - h)
    return out


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------
# dpo_loss
# ---------------------------------------------------------------------------------------------------------------

ALL_TYPES = list(L.DPO_LOSS_TYPES)
SMOOTHED = ["sigmoid", "robust"]
DPO_CASES = [(lt, 0.0) for lt in ALL_TYPES] + [(lt, e) for lt in SMOOTHED for e in (0.1, 0.3)]

# fixed numbers: the third pair is an exact tie (dc = dr = 0)
DPO_FIXED = dict(
    pw=[-10.0, -20.5, -1.0, -7.25],
    pl=[-12.0, -19.0, -2.0, -7.0],
    rw=[-11.0, -20.0, -1.0, -8.0],
    rl=[-11.5, -19.5, -2.0, -6.0],
)


def dpo_random(seed: int, n: int = 16):
    rng = rng_for(seed)
    return {k: rng.normal(-50.0, 5.0, n).tolist() for k in ("pw", "pl", "rw", "rl")}


def test_dpo_loss_types_are_the_spec_list():
    assert set(L.DPO_LOSS_TYPES) == {
        "sigmoid", "robust", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
    }


@pytest.mark.parametrize("loss_type,e", DPO_CASES)
@pytest.mark.parametrize("inputs", ["fixed", "random"])
def test_dpo_parity(loss_type, e, inputs):
    x = DPO_FIXED if inputs == "fixed" else dpo_random(hash((loss_type, e)) % 1000)
    beta = 0.5 if inputs == "fixed" else 0.1
    loss, metrics = dpo_loss(t64(x["pw"]), t64(x["pl"]), t64(x["rw"]), t64(x["rl"]), beta, loss_type, e)
    exp_loss, exp_metrics = ref_dpo(x["pw"], x["pl"], x["rw"], x["rl"], beta, loss_type, e)
    assert loss.item() == approx(exp_loss)
    assert loss.dtype == F64
    for k, v in exp_metrics.items():
        assert metrics[k].item() == approx(v), k
    assert metrics["logps/chosen"].item() == approx(mean(x["pw"]))
    assert metrics["logps/rejected"].item() == approx(mean(x["pl"]))


def test_dpo_fixed_hand_values():
    # pair 1 of DPO_FIXED: dc = 1, dr = -0.5, d = 1.5; beta 0.5 -> -logσ(0.75) = 0.386871 (rounded by hand)
    loss, m = dpo_loss(t64([-10.0]), t64([-12.0]), t64([-11.0]), t64([-11.5]), 0.5)
    assert loss.item() == pytest.approx(0.386871, abs=5e-7)
    assert m["rewards/chosen"].item() == approx(0.5)
    assert m["rewards/rejected"].item() == approx(-0.25)
    assert m["rewards/margins"].item() == approx(0.75)
    # the tie pair counts one half
    _, m = dpo_loss(t64([-1.0, -10.0]), t64([-2.0, -12.0]), t64([-1.0, -11.0]), t64([-2.0, -11.5]), 0.5)
    assert m["rewards/accuracies"].item() == approx(0.75)


def test_dpo_is_mean_of_pair_losses_not_loss_of_mean():
    pw, pl, rw, rl = [0.0, 0.0], [0.0, 0.0], [-4.0, 4.0], [0.0, 0.0]  # d = 4 and -4, mean d = 0
    loss, _ = dpo_loss(t64(pw), t64(pl), t64(rw), t64(rl), 1.0)
    assert loss.item() == approx(mean([-logsig(4.0), -logsig(-4.0)]))
    assert loss.item() != approx(LN2)


def test_dpo_unknown_loss_type_lists_valid():
    x = t64([0.0])
    with pytest.raises(ValueError, match="kto") as info:
        dpo_loss(x, x, x, x, 0.1, loss_type="kto")
    for name in ALL_TYPES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("e", [-0.1, 0.5, 0.7, float("nan")])
@pytest.mark.parametrize("loss_type", SMOOTHED)
def test_dpo_label_smoothing_out_of_range(loss_type, e):
    x = t64([0.0])
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(x, x, x, x, 0.1, loss_type=loss_type, label_smoothing=e)


@pytest.mark.parametrize("loss_type", [t for t in ALL_TYPES if t not in SMOOTHED])
def test_dpo_label_smoothing_rejected_where_unused(loss_type):
    x = t64([0.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, loss_type=loss_type, label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------------------------
# diffusion_dpo_loss / flow_dpo_loss
# ---------------------------------------------------------------------------------------------------------------

WORKED = dict(ew=[0.1000], el=[0.1500], rw=[0.1002], rl=[0.1499])


def err_random(seed: int, n: int = 16):
    rng = rng_for(seed)
    base = rng.uniform(0.05, 0.5, n)
    return {k: (base + rng.normal(0.0, 2e-4, n)).tolist() for k in ("ew", "el", "rw", "rl")}


def test_diffusion_dpo_worked_value():
    loss, m = diffusion_dpo_loss(t64(WORKED["ew"]), t64(WORKED["el"]), t64(WORKED["rw"]), t64(WORKED["rl"]))
    assert loss.item() == pytest.approx(0.386871, abs=5e-7)
    assert loss.item() == approx(math.log1p(math.exp(-0.75)))
    assert m["rewards/margins"].item() == approx(0.75)
    assert m["mse/policy_chosen"].item() == approx(0.1)
    assert m["mse/policy_rejected"].item() == approx(0.15)
    assert m["mse/ref_chosen"].item() == approx(0.1002)
    assert m["mse/ref_rejected"].item() == approx(0.1499)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_diffusion_dpo_parity(loss_type, seed):
    x = err_random(seed)
    loss, m = diffusion_dpo_loss(t64(x["ew"]), t64(x["el"]), t64(x["rw"]), t64(x["rl"]), 5000.0, loss_type)
    assert loss.item() == approx(ref_diffusion_dpo(x["ew"], x["el"], x["rw"], x["rl"], 5000.0, loss_type))
    _, exp_m = ref_dpo([-v for v in x["ew"]], [-v for v in x["el"]], [-v for v in x["rw"]], [-v for v in x["rl"]],
                       2500.0)
    for k, v in exp_m.items():
        assert m[k].item() == approx(v), k


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_diffusion_dpo_is_dpo_on_negated_errors(loss_type):
    x = err_random(7)
    ew, el, rw, rl = (t64(x[k]) for k in ("ew", "el", "rw", "rl"))
    a, ma = diffusion_dpo_loss(ew, el, rw, rl, 3000.0, loss_type)
    b, mb = dpo_loss(-ew, -el, -rw, -rl, 1500.0, loss_type)
    assert a.item() == b.item()
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ma[k].item() == mb[k].item()


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_diffusion_dpo_label_smoothing(loss_type):
    """cDPO / robust DPO on errors: z = -β/2·((ew - el) - (rw - rl)) per pair, written out by hand."""
    x = err_random(3)
    e = 0.2
    loss, _ = diffusion_dpo_loss(t64(x["ew"]), t64(x["el"]), t64(x["rw"]), t64(x["rl"]), 4000.0, loss_type, e)
    zs = [-(4000.0 / 2) * ((a - b) - (c - d)) for a, b, c, d in zip(x["ew"], x["el"], x["rw"], x["rl"])]
    if loss_type == "sigmoid":
        expected = mean(-(1 - e) * logsig(z) - e * logsig(-z) for z in zs)
    else:
        expected = mean((-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e) for z in zs)
    assert loss.item() == approx(expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        diffusion_dpo_loss(t64(x["ew"]), t64(x["el"]), t64(x["rw"]), t64(x["rl"]), 4000.0, "hinge", e)


@pytest.mark.parametrize("schedule", ["constant", "(1-t)^2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_flow_dpo_parity(schedule, seed):
    x = err_random(seed + 10)
    t = rng_for(seed).uniform(0.0, 1.0, 16).tolist()
    t[0], t[1] = 0.0, 1.0
    loss, m = flow_dpo_loss(t64(x["ew"]), t64(x["el"]), t64(x["rw"]), t64(x["rl"]), 2000.0, t=t64(t),
                            beta_schedule=schedule)
    assert loss.item() == approx(ref_flow_dpo(x["ew"], x["el"], x["rw"], x["rl"], 2000.0, t, schedule))
    betas = [2000.0 * (1 - ti) ** 2 if schedule == "(1-t)^2" else 2000.0 for ti in t]
    margins = [-(b / 2) * ((a - c) - (d - e)) for b, a, c, d, e in zip(betas, x["ew"], x["el"], x["rw"], x["rl"])]
    assert m["rewards/margins"].item() == approx(mean(margins))
    assert m["beta/effective"].item() == approx(mean(betas))


def test_flow_dpo_constant_equals_diffusion_dpo():
    x = err_random(3)
    args = [t64(x[k]) for k in ("ew", "el", "rw", "rl")]
    a, _ = flow_dpo_loss(*args, 5000.0)
    b, _ = diffusion_dpo_loss(*args, 5000.0)
    assert a.item() == approx(b.item(), rel=1e-12)


def test_flow_dpo_schedule_at_t_one_gives_ln2_and_no_gradient():
    ew = t64([0.1, 0.2], requires_grad=True)
    loss, _ = flow_dpo_loss(ew, t64([0.3, 0.1]), t64([0.2, 0.2]), t64([0.2, 0.2]), 5000.0, t=t64([1.0, 1.0]),
                            beta_schedule="(1-t)^2")
    loss.backward()
    assert loss.item() == approx(LN2)
    assert ew.grad.abs().max().item() == 0.0


def test_flow_dpo_schedule_needs_t():
    x = t64([0.1])
    with pytest.raises(ValueError, match="needs the flow time t"):
        flow_dpo_loss(x, x, x, x, 100.0, beta_schedule="(1-t)^2")


@pytest.mark.parametrize("bad_t", [[-0.1], [1.5], [500.0], [float("nan")]])
@pytest.mark.parametrize("schedule", ["constant", "(1-t)^2"])
def test_flow_dpo_t_out_of_range(bad_t, schedule):
    x = t64([0.1])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        flow_dpo_loss(x, x, x, x, 100.0, t=t64(bad_t), beta_schedule=schedule)


def test_flow_dpo_unknown_schedule_lists_valid():
    x = t64([0.1])
    with pytest.raises(ValueError, match=r"'constant', '\(1-t\)\^2'"):
        flow_dpo_loss(x, x, x, x, 100.0, t=t64([0.5]), beta_schedule="cosine")


# ---------------------------------------------------------------------------------------------------------------
# mapo_loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapo_parity_random(seed):
    rng = rng_for(seed)
    ew = rng.uniform(0.02, 0.4, 12)
    el = (ew + rng.normal(0.0, 3e-3, 12)).tolist()
    ew = ew.tolist()
    for beta, s, T in [(0.1, 0.5, 1000), (0.5, 2.0, 50)]:
        loss, m = mapo_loss(t64(ew), t64(el), beta, s, T)
        assert loss.item() == approx(ref_mapo(ew, el, beta, s, T))
        assert m["mapo/sft_loss"].item() == approx(mean(ew))
        assert (m["mapo/sft_loss"] + m["mapo/ratio_loss"]).item() == approx(loss.item())


def test_mapo_fixed_and_tiny_errors():
    # values chosen to exercise both branches of f: x = s·m below and above the series threshold
    ew = [0.0, 1e-7, 1.5e-3, 0.25, 3.0]
    el = [0.0, 3e-7, 2.5e-3, 0.2, 3.1]
    loss, _ = mapo_loss(t64(ew), t64(el), 0.2, 0.5, 1000)
    assert loss.item() == approx(ref_mapo(ew, el, 0.2, 0.5, 1000))
    # both errors just inside the series branch (s·m < 1e-3): the log odds must match x/expm1(x) to 1e-9
    _, m = mapo_loss(t64([1.9e-3]), t64([1.7e-3]), 0.1, 0.5, 1000)
    x_w, x_l = 0.5 * 1.9e-3, 0.5 * 1.7e-3
    assert m["mapo/log_odds"].item() == approx(1000 * (x_w / math.expm1(x_w) - x_l / math.expm1(x_l)), rel=1e-9)


def test_mapo_zero_errors_value_and_gradient():
    # f(0) = 1 on both sides: log odds 0, L = 0 - β·logσ(0) = β ln 2
    ew = t64([0.0, 0.0, 0.0], requires_grad=True)
    el = t64([0.0, 0.0, 0.0], requires_grad=True)
    loss, m = mapo_loss(ew, el, beta=0.1, snr_value=0.5, num_train_timesteps=1000)
    loss.backward()
    assert loss.item() == approx(0.1 * LN2)
    assert m["rewards/accuracies"].item() == 0.5
    # f'(0) = -s/2, so dL/d err_w = 1/B + β/B · σ(0) · T · s/2 = (1 + 0.1·0.5·1000·0.25) / 3
    assert torch.isfinite(ew.grad).all() and torch.isfinite(el.grad).all()
    assert ew.grad.tolist() == pytest.approx([(1 + 0.1 * 0.5 * 1000 * 0.25) / 3] * 3, rel=1e-9)
    assert el.grad.tolist() == pytest.approx([-(0.1 * 0.5 * 1000 * 0.25) / 3] * 3, rel=1e-9)


def test_mapo_large_errors_stay_finite():
    ew = t64([2000.0, 0.5], requires_grad=True)
    el = t64([3000.0, 0.6], requires_grad=True)
    loss, _ = mapo_loss(ew, el, num_train_timesteps=1000)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(ew.grad).all() and torch.isfinite(el.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# ranked_dpo_loss
# ---------------------------------------------------------------------------------------------------------------


def test_ranked_hand_worked_example():
    # β = 2 so β/2 = 1; ref_err = 0 so s = -err = (0, -1, -0.5); scores 3 > 2 > 1.
    # pairs (0,1): -logσ(1); (0,2): -logσ(0.5); (1,2): -logσ(-0.5)
    # g = (2, 1, 0), G = (3, 1, 0); sorted by s: item 0, item 2, item 1 -> τ = (1, 3, 2)
    # 1/D(τ) = 1/log2(1+τ) = (1, 1/2, 1/log2 3)
    # w01 = |3-1|·|1 - 1/2| = 1; w02 = 3·(1 - 1/log2 3) = 1.1072107; w12 = 1·(1/log2 3 - 1/2) = 0.1309298
    err, ref, scores = [[0.0, 1.0, 0.5]], [[0.0, 0.0, 0.0]], [[3.0, 2.0, 1.0]]
    l01, l02, l12 = math.log1p(math.exp(-1.0)), math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))
    uniform, _ = ranked_dpo_loss(t64(err), t64(ref), t64(scores), beta=2.0, weighting="uniform")
    assert uniform.item() == approx((l01 + l02 + l12) / 3)
    assert uniform.item() == pytest.approx(0.5871386, abs=1e-7)
    w01, w02, w12 = 1.0, 1.1072107392856274, 0.13092975357145753
    lam, m = ranked_dpo_loss(t64(err), t64(ref), t64(scores), beta=2.0, weighting="lambda")
    assert lam.item() == approx((w01 * l01 + w02 * l02 + w12 * l12) / (w01 + w02 + w12))
    assert lam.item() == pytest.approx(0.4314745, abs=1e-7)
    assert m["ranked/num_pairs"].item() == 3
    assert m["rewards/accuracies"].item() == approx(2 / 3)  # (0,1), (0,2) right; (1,2) wrong
    assert m["rewards/margins"].item() == approx((1.0 + 0.5 - 0.5) / 3)


def ranked_random(seed: int, b: int = 6, k: int = 5):
    """Dyadic errors so that some implicit rewards tie exactly (exercising the τ tie-break); integer scores with
    ties, and one prompt whose scores are all equal."""
    rng = rng_for(seed)
    err = (rng.integers(0, 6, (b, k)) / 8.0).tolist()
    ref = (rng.integers(0, 6, (b, k)) / 8.0).tolist()
    scores = rng.integers(0, 3, (b, k)).astype(float).tolist()
    scores[0] = [1.0] * k
    return err, ref, scores


@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ranked_parity_random(weighting, seed):
    err, ref, scores = ranked_random(seed)
    beta = 3.0
    loss, m = ranked_dpo_loss(t64(err), t64(ref), t64(scores), beta=beta, weighting=weighting)
    assert loss.item() == approx(ref_ranked(err, ref, scores, beta, weighting))
    n_pairs = sum(1 for row in scores for a in row for b_ in row if a > b_)
    assert m["ranked/num_pairs"].item() == n_pairs


@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
def test_ranked_parity_continuous(weighting):
    rng = rng_for(5)
    err = rng.uniform(0.05, 0.3, (4, 6))
    ref = (err + rng.normal(0.0, 2e-4, (4, 6))).tolist()
    scores = rng.normal(size=(4, 6)).tolist()
    loss, _ = ranked_dpo_loss(t64(err.tolist()), t64(ref), t64(scores), weighting=weighting)
    assert loss.item() == approx(ref_ranked(err.tolist(), ref, scores, 5000.0, weighting))


@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
def test_ranked_k2_equals_diffusion_dpo(weighting):
    x = err_random(11, n=8)
    # column 0 is the winner in even rows, column 1 in odd rows
    win_first = [i % 2 == 0 for i in range(8)]
    err = [[w, l] if f else [l, w] for w, l, f in zip(x["ew"], x["el"], win_first)]
    ref = [[w, l] if f else [l, w] for w, l, f in zip(x["rw"], x["rl"], win_first)]
    scores = [[0.9, 0.1] if f else [0.2, 0.7] for f in win_first]
    loss, m = ranked_dpo_loss(t64(err), t64(ref), t64(scores), weighting=weighting)
    exp, em = diffusion_dpo_loss(t64(x["ew"]), t64(x["el"]), t64(x["rw"]), t64(x["rl"]))
    assert loss.item() == approx(exp.item(), rel=1e-12)
    assert m["rewards/margins"].item() == approx(em["rewards/margins"].item(), rel=1e-12)
    assert m["rewards/accuracies"].item() == em["rewards/accuracies"].item()


@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
def test_ranked_equal_scores_form_no_pair(weighting):
    err = t64([[0.1, 0.3, 0.2], [0.1, 0.3, 0.2]])
    ref = t64([[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]])
    # prompt 0: all tied -> no pairs; prompt 1: items 0 and 1 tied, both above item 2 -> pairs (0,2), (1,2)
    scores = t64([[1.0, 1.0, 1.0], [5.0, 5.0, 1.0]])
    loss, m = ranked_dpo_loss(err, ref, scores, beta=10.0, weighting=weighting)
    assert m["ranked/num_pairs"].item() == 2
    assert m["ranked/prompts_with_pairs"].item() == 1
    only, _ = ranked_dpo_loss(err[1:], ref[1:], scores[1:], beta=10.0, weighting=weighting)
    assert loss.item() == approx(only.item(), rel=1e-12)
    assert loss.item() == approx(ref_ranked(err.tolist(), ref.tolist(), scores.tolist(), 10.0, weighting))


@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
def test_ranked_no_pairs_gives_connected_zero(weighting):
    err = t64([[0.1, 0.3], [0.2, 0.4]], requires_grad=True)
    loss, m = ranked_dpo_loss(err, t64([[0.2, 0.2], [0.2, 0.2]]), t64([[1.0, 1.0], [2.0, 2.0]]), weighting=weighting)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert err.grad.abs().max().item() == 0.0
    assert m["ranked/num_pairs"].item() == 0 and m["rewards/accuracies"].item() == 0.0


def test_ranked_lambda_large_k_is_finite():
    k = 300  # 2**300 overflows float32; the per-prompt rescaling must keep weights finite
    rng = rng_for(9)
    err = torch.tensor(rng.uniform(0.1, 0.2, (2, k)), dtype=torch.float32, requires_grad=True)
    ref = torch.tensor(rng.uniform(0.1, 0.2, (2, k)), dtype=torch.float32)
    scores = torch.tensor(rng.permutation(2 * k).reshape(2, k), dtype=torch.float32)
    loss, _ = ranked_dpo_loss(err, ref, scores, beta=50.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(err.grad).all()


def test_ranked_needs_two_items_and_valid_weighting():
    x = t64([[0.1], [0.2]])
    with pytest.raises(ValueError, match="K >= 2"):
        ranked_dpo_loss(x, x, x)
    y = t64([[0.1, 0.2]])
    with pytest.raises(ValueError, match="'lambda', 'uniform'"):
        ranked_dpo_loss(y, y, y, weighting="ndcg")


# ---------------------------------------------------------------------------------------------------------------
# spo_step_loss / rwr_loss
# ---------------------------------------------------------------------------------------------------------------


def test_spo_parity_fixed():
    # log-ratios 0.05 (inside), 0.5 (clipped to 1.1), -0.5 (clipped to 0.9), 0 (exactly at ref)
    lw, rw = [-3.0, -2.5, -4.0, -1.0], [-3.05, -3.0, -3.5, -1.0]
    ll, rl = [-2.0, -2.0, -2.0, -1.0], [-2.0, -1.9, -2.5, -1.0]
    loss, m = spo_step_loss(t64(lw), t64(rw), t64(ll), t64(rl), beta=10.0, clip_eps=0.1)
    assert loss.item() == approx(ref_spo(lw, rw, ll, rl, 10.0, 0.1))
    assert m["spo/clip_fraction"].item() == approx(3 / 8)  # w: 0.5, -0.5 clipped; l: 0.5 clipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spo_parity_random(seed):
    rng = rng_for(seed)
    lw, ll = rng.normal(-5.0, 1.0, 20), rng.normal(-5.0, 1.0, 20)
    rw, rl = lw + rng.normal(0.0, 0.15, 20), ll + rng.normal(0.0, 0.15, 20)
    args = [v.tolist() for v in (lw, rw, ll, rl)]
    loss, _ = spo_step_loss(*(t64(a) for a in args), beta=7.0, clip_eps=0.2)
    assert loss.item() == approx(ref_spo(*args, 7.0, 0.2))


def test_spo_clipped_sides_have_no_gradient():
    lw = t64([-1.0, -1.0], requires_grad=True)
    loss, _ = spo_step_loss(lw, t64([-2.0, -1.05]), t64([-1.0, -1.0]), t64([-1.0, -1.0]))
    loss.backward()
    assert lw.grad[0].item() == 0.0  # log-ratio 1.0 > log(1.1): clipped
    assert lw.grad[1].item() < 0.0  # inside: raising the winner's log-density lowers the loss


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_spo_clip_eps_range(eps):
    x = t64([0.0])
    with pytest.raises(ValueError, match=r"clip_eps must be in \(0, 1\)"):
        spo_step_loss(x, x, x, x, clip_eps=eps)


@pytest.mark.parametrize("tau", [1.0, 0.3, 5.0])
def test_rwr_parity(tau):
    rng = rng_for(int(tau * 10))
    err, rewards = rng.uniform(0.05, 0.5, 10).tolist(), rng.normal(0.0, 2.0, 10).tolist()
    loss, m = rwr_loss(t64(err), t64(rewards), tau)
    assert loss.item() == approx(ref_rwr(err, rewards, tau))
    assert m["mse/policy"].item() == approx(mean(err))
    assert 1.0 <= m["rwr/ess"].item() <= 10.0


def test_rwr_weights_are_detached_and_equal_rewards_give_mean():
    err = t64([0.1, 0.2, 0.6], requires_grad=True)
    rewards = t64([1.0, 1.0, 1.0], requires_grad=True)
    loss, m = rwr_loss(err, rewards)
    loss.backward()
    assert loss.item() == approx(0.3)
    assert m["rwr/weight_max"].item() == approx(1.0)
    assert rewards.grad is None
    assert err.grad.tolist() == pytest.approx([1 / 3] * 3)


# ---------------------------------------------------------------------------------------------------------------
# reward-model losses
# ---------------------------------------------------------------------------------------------------------------

RA = [0.5, -1.0, 2.0, 0.0, 0.3, 1.2]
RB = [0.0, 0.5, 2.0, 0.0, 1.3, -0.4]
LABEL = [1, -1, 1, 0, 0, -1]


def test_bt_parity_and_metrics():
    loss, m = bt_loss(t64(RA), t64(RB), torch.tensor(LABEL))
    assert loss.item() == approx(ref_bt(RA, RB, LABEL))
    # non-tie label·d: 0.5, 1.5, 0 (tie in reward -> 1/2), -1.6
    assert m["accuracy"].item() == approx((1 + 1 + 0.5 + 0) / 4)
    assert m["num_pairs"].item() == 4 and m["num_ties"].item() == 2


def test_bt_weighted_parity_and_normalisation():
    w = [2.0, 1.0, 0.5, 7.0, 3.0, 1.0]
    loss, _ = bt_loss(t64(RA), t64(RB), torch.tensor(LABEL), weight=t64(w))
    assert loss.item() == approx(ref_bt(RA, RB, LABEL, w))
    scaled, _ = bt_loss(t64(RA), t64(RB), torch.tensor(LABEL), weight=t64([10 * v for v in w]))
    assert scaled.item() == approx(loss.item(), rel=1e-12)


def test_bt_all_ties_is_connected_zero():
    ra = t64([0.3, -1.0], requires_grad=True)
    loss, m = bt_loss(ra, t64([0.0, 0.0]), torch.tensor([0, 0]))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert ra.grad.tolist() == [0.0, 0.0]
    assert m["num_pairs"].item() == 0


@pytest.mark.parametrize("bad", [[2, 0], [0.5, 1.0]])
def test_bt_and_btt_reject_bad_labels(bad):
    x = t64([0.0, 0.0])
    for fn in (bt_loss, btt_loss):
        with pytest.raises(ValueError, match=r"label must be 1 .* -1 .* or 0"):
            fn(x, x, torch.tensor(bad))


def test_btt_hand_values():
    # d = 0, k = 5: tie -> -2·logσ(-ln 5) - ln 24 = 2·ln 6 - ln 24 = ln 1.5; win -> -logσ(-ln 5) = ln 6
    tie, m = btt_loss(t64([0.0]), t64([0.0]), torch.tensor([0]), k=5.0)
    assert tie.item() == approx(math.log(1.5))
    assert m["tie_prob"].item() == approx(2 / 3)
    win, _ = btt_loss(t64([0.0]), t64([0.0]), torch.tensor([1]), k=5.0)
    assert win.item() == approx(math.log(6.0))
    # d = ln 5: a wins -> -logσ(0) = ln 2
    win2, _ = btt_loss(t64([math.log(5.0)]), t64([0.0]), torch.tensor([1]), k=5.0)
    assert win2.item() == approx(LN2)


@pytest.mark.parametrize("k", [1.5, 5.0, 20.0])
def test_btt_parity_and_probabilities_sum_to_one(k):
    loss, _ = btt_loss(t64(RA), t64(RB), torch.tensor(LABEL), k=k)
    assert loss.item() == approx(ref_btt(RA, RB, LABEL, k))
    for d in (-2.0, -0.3, 0.0, 1.7):
        nll = [btt_loss(t64([d]), t64([0.0]), torch.tensor([y]), k=k)[0].item() for y in (1, -1, 0)]
        assert sum(math.exp(-v) for v in nll) == approx(1.0, rel=1e-12)


@pytest.mark.parametrize("k", [1.0, 0.5, -2.0])
def test_btt_k_must_exceed_one(k):
    x = t64([0.0])
    with pytest.raises(ValueError, match="k must be"):
        btt_loss(x, x, torch.tensor([0]), k=k)


def test_soft_ce_hand_values():
    # p = 1, d = 0: ln 2 - 0; p = 1/2, d = 0: ln 2 - ln 2 = 0; p = 0, d = 2: -logσ(-2) = ln(1 + e²)
    cases = [([0.0], [0.0], [1.0], LN2), ([0.0], [0.0], [0.5], 0.0), ([2.0], [0.0], [0.0], math.log1p(math.exp(2.0)))]
    for ra, rb, p, expected in cases:
        loss, _ = soft_ce_loss(t64(ra), t64(rb), t64(p))
        assert loss.item() == approx(expected)


def test_soft_ce_perfect_prediction_costs_zero():
    p = [0.5, 0.1, 0.9, 0.25, 0.0 + 1e-9, 0.7]
    d = [math.log(q / (1 - q)) for q in p]
    loss, m = soft_ce_loss(t64(d), t64([0.0] * len(d)), t64(p))
    assert abs(loss.item()) < 1e-12
    assert m["num_ties"].item() == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_ce_parity_and_weight_normalisation(seed):
    rng = rng_for(seed)
    ra, rb = rng.normal(size=8).tolist(), rng.normal(size=8).tolist()
    p = [0.0, 1.0, 0.5] + rng.uniform(0, 1, 5).tolist()
    w = rng.uniform(0.1, 1.0, 8).tolist()
    plain, _ = soft_ce_loss(t64(ra), t64(rb), t64(p))
    assert plain.item() == approx(ref_soft_ce(ra, rb, p))
    weighted, _ = soft_ce_loss(t64(ra), t64(rb), t64(p), weight=t64(w))
    assert weighted.item() == approx(ref_soft_ce(ra, rb, p, w))
    scaled, _ = soft_ce_loss(t64(ra), t64(rb), t64(p), weight=t64([3 * v for v in w]))
    assert scaled.item() == approx(weighted.item(), rel=1e-12)
    ones, _ = soft_ce_loss(t64(ra), t64(rb), t64(p), weight=t64([1.0] * 8))
    assert ones.item() == approx(plain.item(), rel=1e-12)


def test_soft_ce_rejects_bad_probabilities_and_zero_weights():
    x = t64([0.0, 0.0])
    with pytest.raises(ValueError, match=r"p_a must lie in \[0, 1\]"):
        soft_ce_loss(x, x, t64([0.5, 1.2]))
    with pytest.raises(ValueError, match="weight sums to 0"):
        soft_ce_loss(x, x, t64([0.5, 1.0]), weight=t64([0.0, 0.0]))
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        soft_ce_loss(x, x, t64([0.5, 1.0]), weight=t64([1.0, -1.0]))


def test_reward_swap_symmetry():
    ra, rb, y = t64(RA), t64(RB), torch.tensor(LABEL)
    assert bt_loss(ra, rb, y)[0].item() == approx(bt_loss(rb, ra, -y)[0].item(), rel=1e-12)
    assert btt_loss(ra, rb, y)[0].item() == approx(btt_loss(rb, ra, -y)[0].item(), rel=1e-12)
    p = t64([0.9, 0.2, 0.5, 0.5, 1.0, 0.0])
    assert soft_ce_loss(ra, rb, p)[0].item() == approx(soft_ce_loss(rb, ra, 1 - p)[0].item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Invariants across functions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda x: dpo_loss(x, x - 3, x, x - 3, 0.1),
        lambda x: dpo_loss(x, x - 3, x, x - 3, 0.1, label_smoothing=0.2),
        lambda x: diffusion_dpo_loss(x, x + 0.1, x, x + 0.1),
        lambda x: flow_dpo_loss(x, x + 0.1, x, x + 0.1, 1000.0),
        lambda x: flow_dpo_loss(x, x + 0.1, x, x + 0.1, 1000.0, t=x.clamp(0, 1), beta_schedule="(1-t)^2"),
        lambda x: spo_step_loss(x, x, x - 1, x - 1),
        lambda x: ranked_dpo_loss(torch.stack([x, x + 1], 1), torch.stack([x, x + 1], 1),
                                  torch.stack([x * 0 + 1, x * 0], 1)),
    ],
    ids=["dpo", "dpo_smoothed", "diffusion", "flow", "flow_schedule", "spo", "ranked"],
)
def test_policy_equals_reference_gives_ln2(call):
    x = t64([0.05, 0.2, 0.7])
    loss, m = call(x)
    assert loss.item() == approx(LN2)
    assert m["rewards/accuracies"].item() == 0.5


SWAPS = {
    "dpo": lambda a, b, c, d: dpo_loss(a, b, c, d, 0.7),
    "diffusion": lambda a, b, c, d: diffusion_dpo_loss(a * 1e-3, b * 1e-3, c * 1e-3, d * 1e-3, 2000.0),
    "flow": lambda a, b, c, d: flow_dpo_loss(a * 1e-3, b * 1e-3, c * 1e-3, d * 1e-3, 2000.0),
    # spo takes (logp_w, ref_logp_w, logp_l, ref_logp_l)
    "spo": lambda a, b, c, d: spo_step_loss(a * 0.01, c * 0.01, b * 0.01, d * 0.01, beta=3.0),
}


@pytest.mark.parametrize("name", list(SWAPS))
def test_swapping_winner_and_loser_mirrors_the_loss(name):
    rng = rng_for(4)
    a, b, c, d = (t64(rng.normal(size=9).tolist()) for _ in range(4))
    call = SWAPS[name]
    fwd, mf = call(a, b, c, d)
    rev, mr = call(b, a, d, c)
    # mean(-logσ(z)) - mean(-logσ(-z)) = -mean(z) for z the per-pair margin
    assert (fwd - rev).item() == approx(-mf["rewards/margins"].item(), rel=1e-9)
    assert mr["rewards/margins"].item() == approx(-mf["rewards/margins"].item(), rel=1e-12)
    assert mr["rewards/accuracies"].item() == approx(1 - mf["rewards/accuracies"].item(), rel=1e-12)
    assert mr["rewards/chosen"].item() == approx(mf["rewards/rejected"].item(), rel=1e-12)


def test_swapping_with_label_smoothing_swaps_the_two_terms():
    pw, pl, rw, rl = (t64(v) for v in (DPO_FIXED["pw"], DPO_FIXED["pl"], DPO_FIXED["rw"], DPO_FIXED["rl"]))
    rev, _ = dpo_loss(pl, pw, rl, rw, 0.5, "sigmoid", 0.2)
    dcs = [a - b for a, b in zip(DPO_FIXED["pl"], DPO_FIXED["rl"])]
    drs = [a - b for a, b in zip(DPO_FIXED["pw"], DPO_FIXED["rw"])]
    assert rev.item() == approx(mean(-0.8 * logsig(0.5 * (x - y)) - 0.2 * logsig(-0.5 * (x - y))
                                     for x, y in zip(dcs, drs)))


def _grad_err_w(name: str) -> torch.Tensor:
    rng = rng_for(2)
    base = rng.uniform(0.05, 0.3, 6)
    ew = t64((base + rng.normal(0, 1e-3, 6)).tolist(), requires_grad=True)
    el, rw, rl = (t64((base + rng.normal(0, 1e-3, 6)).tolist()) for _ in range(3))
    if name == "diffusion":
        loss, _ = diffusion_dpo_loss(ew, el, rw, rl)
    elif name == "flow":
        loss, _ = flow_dpo_loss(ew, el, rw, rl, 3000.0)
    elif name == "flow_schedule":
        loss, _ = flow_dpo_loss(ew, el, rw, rl, 3000.0, t=t64([0.0, 0.1, 0.5, 0.7, 0.9, 0.99]),
                                beta_schedule="(1-t)^2")
    elif name == "mapo":
        loss, _ = mapo_loss(ew, el)
    else:  # ranked: err_w is the top-scored column of a K=3 list
        weighting = name.split("_")[1]
        err = torch.stack([ew, el, el + 0.01], 1)
        ref = torch.stack([rw, rl, rl + 0.005], 1)
        scores = t64([[3.0, 2.0, 1.0]] * 6)
        loss, _ = ranked_dpo_loss(err, ref, scores, weighting=weighting)
    loss.backward()
    return ew.grad


@pytest.mark.parametrize("name", ["diffusion", "flow", "flow_schedule", "mapo", "ranked_lambda", "ranked_uniform"])
def test_lowering_winner_error_lowers_loss(name):
    grad = _grad_err_w(name)
    assert (grad > 0).all(), grad


def test_ranked_bottom_item_gradient_is_negative():
    err = t64([[0.1, 0.2, 0.3]], requires_grad=True)
    loss, _ = ranked_dpo_loss(err, t64([[0.1, 0.2, 0.3]]), t64([[3.0, 2.0, 1.0]]))
    loss.backward()
    assert err.grad[0, 0] > 0 and err.grad[0, 2] < 0


def test_dpo_gradient_signs():
    # Below their targets these variants raise the winner's and lower the loser's likelihood. (apo_down, nca_pair
    # and sppo_hard are built to push the winner's likelihood down in some regimes, so they are left out.)
    pw = t64([-5.0, -6.0], requires_grad=True)
    pl = t64([-5.5, -6.5], requires_grad=True)
    for lt in ["sigmoid", "robust", "hinge", "ipo", "bco_pair", "apo_zero"]:
        pw.grad = pl.grad = None
        loss, _ = dpo_loss(pw, pl, t64([-5.2, -6.1]), t64([-5.4, -6.3]), 0.5, lt)
        loss.backward()
        assert (pw.grad <= 0).all() and (pl.grad >= 0).all(), lt
        assert (pw.grad < 0).any(), lt


# One call per public function: `make(dtype, requires_grad)` returns (positional args, kwargs). The differentiable
# inputs come first and take `dtype`; labels stay integer and scores/probabilities/weights never require grad.
def _vals(n: int, lo: float, hi: float, seed: int) -> list[float]:
    return rng_for(seed).uniform(lo, hi, n).tolist()


def _x(dtype, rg, values):
    return torch.tensor(values, dtype=dtype, requires_grad=rg)


def _pairs(lo, hi, n_args, **kwargs):
    return lambda dt, rg: ([_x(dt, rg, _vals(4, lo, hi, i)) for i in range(n_args)], kwargs)


def _ranked_inputs(dt, rg):
    err, ref = (_x(dt, rg, [_vals(3, 0.1, 0.11, i), _vals(3, 0.1, 0.11, i + 5)]) for i in range(2))
    return [err, ref, torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0]])], {"beta": 500.0}


def _flow_inputs(dt, rg):
    args, _ = _pairs(0.1, 0.11, 4)(dt, rg)
    return args, {"beta": 500.0, "t": _x(dt, False, [0.1, 0.4, 0.6, 0.9]), "beta_schedule": "(1-t)^2"}


def _rwr_inputs(dt, rg):
    return [_x(dt, rg, _vals(4, 0.1, 0.5, 0)), _x(dt, False, _vals(4, -1, 1, 1))], {}


def _reward_inputs(third, weighted):
    def make(dt, rg):
        third_arg = torch.tensor([1, -1, 0, 1]) if third == "label" else _x(dt, False, [1.0, 0.0, 0.5, 0.8])
        kwargs = {"weight": _x(dt, False, [1.0, 2.0, 1.0, 0.5])} if weighted else {}
        return [_x(dt, rg, _vals(4, -1, 1, 0)), _x(dt, rg, _vals(4, -1, 1, 1)), third_arg], kwargs

    return make


CALLS = {
    "dpo": (dpo_loss, _pairs(-3, -1, 4, beta=0.5)),
    "dpo_ipo": (dpo_loss, _pairs(-3, -1, 4, beta=0.5, loss_type="ipo")),
    "diffusion": (diffusion_dpo_loss, _pairs(0.1, 0.11, 4, beta=500.0)),
    "flow": (flow_dpo_loss, _flow_inputs),
    "mapo": (mapo_loss, _pairs(0.1, 0.12, 2)),
    "ranked": (ranked_dpo_loss, _ranked_inputs),
    "spo": (spo_step_loss, _pairs(-1.1, -1.0, 4)),
    "rwr": (rwr_loss, _rwr_inputs),
    "bt": (bt_loss, _reward_inputs("label", weighted=True)),
    "btt": (btt_loss, _reward_inputs("label", weighted=False)),
    "soft_ce": (soft_ce_loss, _reward_inputs("p", weighted=True)),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(name, half):
    fn, make = CALLS[name]
    args, kwargs = make(half, False)
    loss, metrics = fn(*args, **kwargs)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in metrics.values())
    up = lambda v: v.to(torch.float32) if isinstance(v, torch.Tensor) and v.dtype == half else v  # noqa: E731
    loss32, metrics32 = fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
    assert loss32.dtype == torch.float32
    assert torch.allclose(loss, loss32, rtol=1e-6, atol=1e-7)
    for k in metrics:
        assert torch.allclose(metrics[k], metrics32[k], rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("name", list(CALLS))
def test_float64_stays_float64_and_metrics_are_detached_scalars(name):
    fn, make = CALLS[name]
    args, kwargs = make(F64, True)
    loss, metrics = fn(*args, **kwargs)
    assert loss.dtype == F64 and loss.dim() == 0 and loss.requires_grad
    assert metrics
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
        assert v.dtype == F64 and torch.isfinite(v), k
    loss.backward()
    assert all(torch.isfinite(a.grad).all() for a in args if a.requires_grad)


ARG_NAMES = {
    "dpo": ["policy_w", "policy_l", "ref_w", "ref_l"],
    "diffusion": ["err_w", "err_l", "ref_err_w", "ref_err_l"],
    "mapo": ["err_w", "err_l"],
    "ranked": ["err", "ref_err", "scores"],
    "spo": ["logp_w", "ref_logp_w", "logp_l", "ref_logp_l"],
    "rwr": ["err", "rewards"],
    "bt": ["r_a", "r_b", "label"],
    "btt": ["r_a", "r_b", "label"],
    "soft_ce": ["r_a", "r_b", "p_a"],
}


@pytest.mark.parametrize("name,position", [(n, i) for n, names in ARG_NAMES.items() for i in range(len(names))])
def test_mismatched_shapes_raise_with_names_and_shapes(name, position):
    fn, make = CALLS[name]
    args, kwargs = make(F64, False)
    good = tuple(args[0].shape)
    bad = args[position].reshape(-1)[:-1] if args[position].dim() == 1 else args[position][:, :-1]
    args[position] = bad
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert ARG_NAMES[name][position] in msg and str(good) in msg and str(tuple(bad.shape)) in msg


@pytest.mark.parametrize("name", ["dpo", "diffusion", "mapo", "spo", "rwr", "bt"])
def test_no_broadcasting_of_column_vectors(name):
    fn, make = CALLS[name]
    args, kwargs = make(F64, False)
    args[1] = args[1][:, None]
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        fn(*args, **kwargs)


def test_flow_t_shape_and_weight_shape_checked():
    x = t64([0.1, 0.2])
    with pytest.raises(ValueError, match=r"t \(3,\)"):
        flow_dpo_loss(x, x, x, x, 10.0, t=t64([0.1, 0.2, 0.3]), beta_schedule="(1-t)^2")
    with pytest.raises(ValueError, match=r"weight \(1,\)"):
        bt_loss(x, x, torch.tensor([1, 1]), weight=t64([1.0]))
    with pytest.raises(ValueError, match=r"weight \(3,\)"):
        soft_ce_loss(x, x, x, weight=t64([1.0, 1.0, 1.0]))


def test_empty_batch_raises():
    x = t64([])
    with pytest.raises(ValueError, match="empty batch"):
        dpo_loss(x, x, x, x, 0.1)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, b: dpo_loss(x, x, x, x, b),
        lambda x, b: diffusion_dpo_loss(x, x, x, x, b),
        lambda x, b: flow_dpo_loss(x, x, x, x, b),
        lambda x, b: mapo_loss(x, x, beta=b),
        lambda x, b: ranked_dpo_loss(x[None], x[None], x[None], beta=b),
        lambda x, b: spo_step_loss(x, x, x, x, beta=b),
        lambda x, b: rwr_loss(x, x, temperature=b),
    ],
    ids=["dpo", "diffusion", "flow", "mapo", "ranked", "spo", "rwr"],
)
@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf")])
def test_nonpositive_beta_raises(call, beta):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        call(t64([0.1, 0.2]), beta)


def test_losses_import_only_torch_and_stdlib():
    allowed = {"torch", "math", "__future__", "collections", "typing"}
    for path in Path(L.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level > 0 else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_public_names():
    expected = {
        "dpo_loss", "diffusion_dpo_loss", "flow_dpo_loss", "mapo_loss", "ranked_dpo_loss", "spo_step_loss",
        "rwr_loss", "bt_loss", "btt_loss", "soft_ce_loss",
    }
    assert expected <= set(L.__all__)
    for name in expected:
        assert L.__dict__[name].__doc__ and "Returns" in L.__dict__[name].__doc__


# ranked_sequence_dpo_loss (RankDPO on sequence log-likelihoods)
@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranked_sequence_parity_random(weighting, seed):
    rng = rng_for(100 + seed)
    logps = (-rng.integers(20, 40, (6, 5)) / 4.0).tolist()  # quarter-nat steps: some implicit rewards tie
    ref = (-rng.integers(20, 40, (6, 5)) / 4.0).tolist()
    scores = rng.integers(0, 3, (6, 5)).astype(float).tolist()
    scores[0] = [2.0] * 5
    loss, m = ranked_sequence_dpo_loss(t64(logps), t64(ref), t64(scores), beta=0.3, weighting=weighting)
    assert loss.item() == approx(ref_ranked_sequence(logps, ref, scores, 0.3, weighting))
    assert m["ranked/num_pairs"].item() == sum(1 for row in scores for a in row for b_ in row if a > b_)
    assert m["logps/policy"].item() == approx(float(np.mean(logps)))


@pytest.mark.parametrize("weighting", ["uniform", "lambda"])
def test_ranked_sequence_k2_equals_dpo_sigmoid(weighting):
    rng = rng_for(7)
    pw, pl, rw, rl = (rng.normal(-30, 3, 8).tolist() for _ in range(4))
    win_first = [i % 3 != 0 for i in range(8)]
    logps = [[w, lo] if f else [lo, w] for w, lo, f in zip(pw, pl, win_first)]
    ref = [[w, lo] if f else [lo, w] for w, lo, f in zip(rw, rl, win_first)]
    scores = [[1.0, 0.0] if f else [0.0, 1.0] for f in win_first]
    loss, m = ranked_sequence_dpo_loss(t64(logps), t64(ref), t64(scores), beta=0.1, weighting=weighting)
    exp, em = dpo_loss(t64(pw), t64(pl), t64(rw), t64(rl), beta=0.1, loss_type="sigmoid")
    assert loss.item() == approx(exp.item(), rel=1e-12)
    assert m["rewards/margins"].item() == approx(em["rewards/margins"].item(), rel=1e-12)


def test_ranked_sequence_equals_the_diffusion_form_on_minus_twice_the_logps():
    # -logσ(β/2 · (-(e_i - r_i) + (e_j - r_j))) with e = -2 logp is -logσ(β (s_i - s_j)): the same pairs and
    # weights (τ depends only on the order of s, unchanged by the factor 2)
    rng = rng_for(9)
    logps, ref = rng.normal(-20, 2, (4, 6)), rng.normal(-20, 2, (4, 6))
    scores = t64(rng.normal(size=(4, 6)).tolist())
    seq, _ = ranked_sequence_dpo_loss(t64(logps.tolist()), t64(ref.tolist()), scores, beta=0.2)
    diff, _ = ranked_dpo_loss(t64((-2 * logps).tolist()), t64((-2 * ref).tolist()), scores, beta=0.2)
    assert seq.item() == approx(diff.item(), rel=1e-12)


def test_ranked_sequence_refuses_bad_shapes_and_beta():
    with pytest.raises(ValueError, match="K >= 2"):
        ranked_sequence_dpo_loss(t64([[1.0]]), t64([[1.0]]), t64([[1.0]]))
    with pytest.raises(ValueError, match="beta"):
        ranked_sequence_dpo_loss(t64([[1.0, 2.0]]), t64([[1.0, 2.0]]), t64([[1.0, 0.0]]), beta=0.0)
