"""Pairwise DPO and its well-known variants on per-sample log-likelihood surrogates.

Every modality reduces a pair to four numbers per sample: the surrogate ``log p(x | c)`` of the winner and the loser
under the policy and under the frozen reference. This file owns the loss on those numbers; the diffusion and flow
losses in ``diffusion.py`` are this loss with ``surrogate = -err``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_choice, check_positive, check_shapes, compute_dtype, detached, tie_aware_accuracy

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
)
# The other variants have no label-noise term; passing a smoothing to them would be silently ignored.
_SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


def _check_dpo_options(fn: str, loss_type: str, label_smoothing: float) -> float:
    check_choice(fn, "loss_type", loss_type, DPO_LOSS_TYPES)
    e = float(label_smoothing)
    if not 0.0 <= e < 0.5:
        raise ValueError(
            f"{fn}: label_smoothing must be in [0, 0.5), got {e} (it is the probability that a label is flipped; "
            "0.5 would make every label noise, and the 'robust' loss divides by 1 - 2*label_smoothing)"
        )
    if e > 0 and loss_type not in _SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"{fn}: label_smoothing={e} has no meaning for loss_type {loss_type!r}; "
            f"it applies to {', '.join(repr(t) for t in _SMOOTHED_LOSS_TYPES)} only"
        )
    return e


def _pair_losses(
    dc: torch.Tensor, dr: torch.Tensor, beta: float | torch.Tensor, loss_type: str, e: float
) -> torch.Tensor:
    """Per-pair loss from the chosen and rejected log-ratios ``dc``, ``dr`` (B,); ``beta`` scalar or (B,)."""
    d = dc - dr
    z = beta * d
    if loss_type == "sigmoid":
        return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    if loss_type == "robust":
        return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * dc) - F.logsigmoid(-beta * dr)
    if loss_type == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * dc) - 0.5 * F.logsigmoid(-beta * dc) - 0.5 * F.logsigmoid(-beta * dr)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * dc)) + torch.sigmoid(beta * dr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * dc) + (1 - torch.sigmoid(z))
    raise AssertionError(loss_type)  # unreachable: validated by _check_dpo_options


def _reward_metrics(dc: torch.Tensor, dr: torch.Tensor, beta: float | torch.Tensor) -> dict[str, torch.Tensor]:
    """The TRL-named implicit-reward metrics; identical names across every modality."""
    with torch.no_grad():
        d = dc - dr
        return {
            "rewards/chosen": (beta * dc).mean(),
            "rewards/rejected": (beta * dr).mean(),
            "rewards/margins": (beta * d).mean(),
            "rewards/accuracies": tie_aware_accuracy(d).mean(),
        }


def dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization on per-sample log-likelihood surrogates (Rafailov et al. 2023, DPO).

    Args:
        policy_w: (B,) surrogate of ``log p(winner | c)`` under the policy (e.g. summed response-token log-probs).
        policy_l: (B,) the same for the loser.
        ref_w: (B,) surrogate of the winner under the frozen reference.
        ref_l: (B,) surrogate of the loser under the frozen reference.
        beta: > 0, the KL-regularisation strength. Its scale is that of the surrogates' differences: for
            sequence log-probs (sums over tokens) the usual values are 0.01 to 0.5 (TRL default 0.1).
        loss_type: one of ``DPO_LOSS_TYPES`` (below).
        label_smoothing: ``e`` in [0, 0.5), the assumed probability that a preference label is flipped;
            only ``"sigmoid"`` (cDPO, Mitchell 2023) and ``"robust"`` use it, any other type raises if it is > 0.

    With ``dc = policy_w - ref_w``, ``dr = policy_l - ref_l``, ``d = dc - dr``, per pair:

    - ``sigmoid``: ``-(1-e)·logσ(βd) - e·logσ(-βd)`` (Rafailov et al. 2023; conservative DPO for e > 0)
    - ``robust``: ``(-(1-e)·logσ(βd) + e·logσ(-βd)) / (1-2e)`` (Chowdhury et al. 2024, provably robust DPO)
    - ``hinge``: ``relu(1 - βd)`` (Zhao et al. 2023, SLiC-HF)
    - ``ipo``: ``(d - 1/(2β))²`` (Azar et al. 2023, IPO)
    - ``bco_pair``: ``-logσ(β·dc) - logσ(-β·dr)`` (Jung et al. 2024, BCO)
    - ``sppo_hard``: ``(dc - 1/(2β))² + (dr + 1/(2β))²`` (Wu et al. 2024, SPPO)
    - ``nca_pair``: ``-logσ(β·dc) - ½logσ(-β·dc) - ½logσ(-β·dr)`` (Chen et al. 2024, NCA)
    - ``apo_zero``: ``(1 - σ(β·dc)) + σ(β·dr)`` (D'Oosterlinck et al. 2024, APO)
    - ``apo_down``: ``σ(β·dc) + (1 - σ(βd))`` (D'Oosterlinck et al. 2024, APO)

    The loss is the batch mean of the per-pair loss. At policy == reference the sigmoid loss is ``ln 2``.

    Ties: the loss has no notion of a tied pair; drop ties before calling it (or use ``label_smoothing``). In the
    metrics a pair with ``d == 0`` counts 1/2 towards ``rewards/accuracies``.

    Half-precision inputs are computed in float32; float64 stays float64.

    Returns:
        ``(loss, metrics)``: ``loss`` a scalar; ``metrics`` detached scalars ``rewards/chosen`` (mean β·dc),
        ``rewards/rejected`` (mean β·dr), ``rewards/margins`` (mean βd), ``rewards/accuracies`` (mean of d > 0,
        a tie 1/2), ``logps/chosen`` (mean policy_w), ``logps/rejected`` (mean policy_l).
    """
    fn = "dpo_loss"
    names = ("policy_w", "policy_l", "ref_w", "ref_l")
    tensors = (policy_w, policy_l, ref_w, ref_l)
    check_shapes(fn, names, tensors, "B")
    beta = check_positive(fn, "beta", beta)
    e = _check_dpo_options(fn, loss_type, label_smoothing)
    dtype = compute_dtype(*tensors)
    pw, pl, rw, rl = (t.to(dtype) for t in tensors)

    dc = pw - rw
    dr = pl - rl
    loss = _pair_losses(dc, dr, beta, loss_type, e).mean()
    metrics = _reward_metrics(dc, dr, beta)
    metrics["logps/chosen"] = pw.mean()
    metrics["logps/rejected"] = pl.mean()
    return loss, detached(metrics)
