"""The one method table: `method.name` (+ `loss_type`) -> a loss of `mmalign.losses` over an adapter's surrogates.

Every task calls `preference_loss` with the `Surrogates` its adapter made (`mmalign.models.contract`), so a
method means the same on every modality and logs the same names:

| name | data | reference | surrogate kinds | loss |
|---|---|---|---|---|
| `dpo` | pairs | yes | error, logp | `diffusion_dpo_loss` (error: β/2 on `-err`, Diffusion-DPO) / `dpo_loss` (logp) |
| `mapo` | pairs | no | error | `mapo_loss` |
| `rankdpo` | ranked lists | yes | error, logp | `ranked_dpo_loss` (error) / `ranked_sequence_dpo_loss` (logp: DPO's sigmoid per pair) |
| `flow_dpo` | pairs | yes | error | `flow_dpo_loss` (Flow-DPO: Diffusion-DPO on velocity errors, `beta_schedule` constant or (1-t)^2) |
| `flow_rwr` | items with rewards | no | error | `rwr_loss` (Flow-RWR: errors weighted by `softmax(r / τ)` over the batch) |
| `rwr` | items with rewards | no | logp | `rwr_loss` (RWR: NLLs weighted by `softmax(r / τ)` over the batch) |
| `spo` | step pairs (two next states of one x_t) | yes | transition | `spo_step_loss` (SPO: DPO on one transition's log-ratios, each clipped to [1-ε, 1+ε]) |
| `sft` | winners | no | error, logp | mean error of the winners / their negative log-likelihood |

`loss_type` picks a DPO variant (`mmalign.losses.DPO_LOSS_TYPES`, TRL's names) for `dpo`; `label_smoothing` is
used by the loss types that define it (sigmoid, robust) and refused by the others.

Sequence surrogates (kind "logp") are what each loss type's definition uses (`sequence_surrogate`): the summed
token log-probs for every type except `ipo`, whose log-ratios are length-normalised (per-token means: Azar et al.
2023; TRL divides by the completion length). A task's `surrogate: auto` takes that; `mean` with another type is a
length-normalised variant; `sum` with `ipo` is refused. Diffusion errors are already means over C,H,W.

Metric names (TRL's, the same for every modality; `loss` is added by the loop):
- dpo: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, and `mse/policy_chosen`,
  `mse/policy_rejected`, `mse/ref_chosen`, `mse/ref_rejected` (error) or `logps/chosen`, `logps/rejected` (logp);
- mapo: `rewards/accuracies`, `mapo/sft_loss`, `mapo/ratio_loss`, `mapo/log_odds`, `mse/policy_chosen`,
  `mse/policy_rejected`;
- rankdpo: `rewards/margins`, `rewards/accuracies`, `ranked/num_pairs`, `ranked/prompts_with_pairs`, and
  `mse/policy`, `mse/ref` (error) or `logps/policy`, `logps/ref` (logp);
- flow_dpo: dpo's names and `beta/effective` (the mean per-pair β);
- flow_rwr: `rwr/weight_max`, `rwr/ess` (effective sample size of the weights), `rewards/mean`, `mse/policy`;
- rwr: flow_rwr's names with `nll/policy` (the unweighted mean negative log-likelihood) for `mse/policy`;
- spo: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (β times the clipped log-ratios)
  and `spo/clip_fraction`, `logps/chosen`, `logps/rejected` (the policy's transition log-densities);
- sft: `mse/policy_chosen`, `mse/policy_rejected` (error) or `logps/chosen` (logp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmalign.losses import (DPO_LOSS_TYPES, diffusion_dpo_loss, dpo_loss, flow_dpo_loss, mapo_loss, ranked_dpo_loss,
                            ranked_sequence_dpo_loss, rwr_loss, spo_step_loss)
from mmalign.models.contract import Surrogates


@dataclass(frozen=True)
class Method:
    """What a method needs: `data` ("pair": winner/loser pairs; "ranked": scored lists; "pair" is also what sft
    reads, using the winners), whether it compares against a reference, which surrogate kinds it is defined on,
    and its published default β per surrogate kind (None: no β)."""

    name: str
    data: str
    needs_reference: bool
    kinds: tuple[str, ...]
    default_beta: dict


METHODS: dict[str, Method] = {
    # Diffusion-DPO's 5000 assumes per-sample errors that are means over C,H,W; TRL's 0.1 summed log-probs.
    "dpo": Method("dpo", "pair", True, ("error", "logp"), {"error": 5000.0, "logp": 0.1}),
    "mapo": Method("mapo", "pair", False, ("error",), {"error": 0.1}),
    "rankdpo": Method("rankdpo", "ranked", True, ("error", "logp"), {"error": 5000.0, "logp": 0.1}),
    # Flow-DPO has no published β on mean velocity errors that transfers between models: recipes set it.
    "flow_dpo": Method("flow_dpo", "pair", True, ("error",), {}),
    # RWR has no β: its temperature τ is on the scale of the rewards.
    "flow_rwr": Method("flow_rwr", "scored", False, ("error",), {}),
    # The same regression on sequences: the NLL (summed, or a per-token mean from `Surrogates.per_token`).
    "rwr": Method("rwr", "scored", False, ("logp",), {}),
    # SPO's 10 assumes transition log-densities averaged over the latent's elements (the published sampler's).
    "spo": Method("spo", "step_pair", True, ("transition",), {"transition": 10.0}),
    "sft": Method("sft", "pair", False, ("error", "logp"), {"error": 1.0, "logp": 1.0}),
}


# loss types defined on per-token mean log-ratios of sequences; every other type uses summed log-probs
PER_TOKEN_LOSS_TYPES = ("ipo",)


def sequence_surrogate(loss_type: str, requested: str = "auto", where: str = "method") -> str:
    """"sum" or "mean": the sequence surrogate a loss type uses. `requested` "auto" is the type's own (mean for
    ipo, sum otherwise); "mean" is always allowed (length-normalised variants); "sum" with a per-token type is
    refused, naming the keys."""
    own = "mean" if loss_type in PER_TOKEN_LOSS_TYPES else "sum"
    if requested == "auto":
        return own
    if requested not in ("sum", "mean"):
        raise ValueError(f"{where}.surrogate {requested!r}: valid values are auto, sum and mean")
    if requested == "sum" and own == "mean":
        raise ValueError(f"{where}.surrogate 'sum' with {where}.loss_type {loss_type!r}: {loss_type} is defined on "
                         "length-normalised (per-token mean) log-ratios (TRL divides by the completion length); "
                         f"use {where}.surrogate auto or mean")
    return requested


def check_method(name: str, kind: str, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 where: str = "method") -> Method:
    """The table's entry for `name`, after checking that it is defined on surrogates of `kind` and that
    `loss_type` / `label_smoothing` are valid; ValueError naming the key otherwise."""
    if name not in METHODS:
        raise ValueError(f"{where}.name {name!r}: valid methods are {', '.join(METHODS)}")
    method = METHODS[name]
    if kind not in method.kinds:
        valid = [m for m, spec in METHODS.items() if kind in spec.kinds]
        raise ValueError(f"{where}.name {name!r} is not defined on this modality's surrogates ({kind}); valid "
                         f"here: {', '.join(valid)}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"{where}.loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if loss_type != "sigmoid" and name != "dpo":
        raise ValueError(f"{where}.loss_type {loss_type!r} selects a DPO variant; method {name!r} has none "
                         "(use loss_type sigmoid)")
    if label_smoothing > 0 and (name != "dpo" or loss_type not in ("sigmoid", "robust")):
        raise ValueError(f"{where}.label_smoothing {label_smoothing}: only method 'dpo' with loss_type sigmoid or "
                         f"robust uses it (got method {name!r}, loss_type {loss_type!r})")
    return method


def preference_loss(name: str, s: Surrogates, *, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, scores: Tensor | None = None, rank_weighting: str = "lambda",
                    mapo_snr_value: float = 0.5, beta_schedule: str = "constant", rewards: Tensor | None = None,
                    temperature: float = 1.0, clip_eps: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's (loss, metrics) for method `name` on the surrogates `s` ((K, B), row 0 the winners).

    beta: the method's β on the scale of `s` (see `METHODS[name].default_beta`).
    scores: (B, K) preference scores of ranked lists (rankdpo; higher = preferred).
    beta_schedule: flow_dpo's per-pair β (`mmalign.losses.FLOW_BETA_SCHEDULES`), from the surrogates' flow time t.
    rewards, temperature: flow_rwr's and rwr's (K, B) reward of every item (weighted over its dimensions) and τ.
    clip_eps: spo's ratio clip ε.
    """
    method = check_method(name, s.kind, loss_type, label_smoothing)
    if method.needs_reference and s.reference is None:
        raise ValueError(f"method {name!r} needs reference surrogates; the adapter gave none")
    if name == "dpo":
        if s.kind == "error":
            err, ref = s.errors, s.reference_errors
            return diffusion_dpo_loss(err[0], err[1], ref[0], ref[1], beta, loss_type, label_smoothing)
        return dpo_loss(s.policy[0], s.policy[1], s.reference[0], s.reference[1], beta, loss_type,
                        label_smoothing)
    if name == "flow_dpo":
        err, ref = s.errors, s.reference_errors
        return flow_dpo_loss(err[0], err[1], ref[0], ref[1], beta, t=s.t, beta_schedule=beta_schedule)
    if name == "spo":
        pol, ref = s.policy, s.reference
        loss, metrics = spo_step_loss(pol[0], ref[0], pol[1], ref[1], beta=beta, clip_eps=clip_eps)
        metrics.update({"logps/chosen": pol[0].detach().mean(), "logps/rejected": pol[1].detach().mean()})
        return loss, metrics
    if name == "flow_rwr":
        if rewards is None:
            raise ValueError("method 'flow_rwr' needs the (K, B) reward of every item")
        return rwr_loss(s.errors.reshape(-1), rewards.to(s.policy.device).reshape(-1), temperature)
    if name == "rwr":
        if rewards is None:
            raise ValueError("method 'rwr' needs the (K, B) reward of every item")
        loss, metrics = rwr_loss(-s.policy.reshape(-1), rewards.to(s.policy.device).reshape(-1), temperature)
        metrics["nll/policy"] = metrics.pop("mse/policy")
        return loss, metrics
    if name == "mapo":
        if s.num_train_timesteps is None:
            raise ValueError("method 'mapo' needs the noise scheduler's num_train_timesteps in the surrogates")
        err = s.errors
        return mapo_loss(err[0], err[1], beta=beta, snr_value=mapo_snr_value,
                         num_train_timesteps=s.num_train_timesteps)
    if name == "rankdpo":
        if scores is None:
            raise ValueError("method 'rankdpo' needs the ranked lists' scores (B, K)")
        if s.kind == "logp":
            return ranked_sequence_dpo_loss(s.policy.T, s.reference.T, scores.to(s.policy.device), beta=beta,
                                            weighting=rank_weighting)
        return ranked_dpo_loss(s.errors.T, s.reference_errors.T, scores.to(s.policy.device), beta=beta,
                               weighting=rank_weighting)
    # sft: the winners' negative surrogate (their mean error, or their negative log-likelihood)
    loss = -s.policy[0].mean()
    with torch.no_grad():
        if s.kind == "error":
            metrics = {"mse/policy_chosen": s.errors[0].mean()}
            if s.policy.shape[0] > 1:
                metrics["mse/policy_rejected"] = s.errors[1:].mean()
        else:
            metrics = {"logps/chosen": s.policy[0].mean()}
    return loss, metrics
