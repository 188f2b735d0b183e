"""The VLM preference objective on a `vlm_pair` batch: `vlm_preference_loss(adapter, batch, method)`.

Per pair (prompt x with images I, chosen y_w, rejected y_l), the adapter gives response log-likelihoods under the
policy and the reference; the loss is `mmalign.losses.dpo_loss` on them (every `loss_type` of the core), plus:

- `sft_weight`: `+ sft_weight · NLL(y_w)`, the chosen answer's negative log-likelihood under the policy, as a
  summed (`sft_reduction="sum"`, the scale of the DPO surrogate) or per-token mean (`"mean"`, the scale of an SFT
  loss) log-probability, averaged over the batch. TOY-NOTES: this term is what kept pure DPO from collapsing the
  caption format;
- `rejected_images` (mDPO-style conditional preference): a second pair per sample, the chosen answer under the clean
  image preferred to the same answer under the sample's `rejected.<i>` image(s), weighted by
  `rejected_images_weight`;
- `online_weight` (BDHS online mode): rejected answers regenerated from the current policy with the image mostly
  hidden (`mmalign.selfgen.bdhs.bdhs_rejected`), mixed as `(1 - w) · offline + w · online`.

`surrogate="mean"` uses per-token mean log-probs instead of sums (length-normalised variants). `name="sft"` is the
SFT-only control: the chosen answers' NLL alone (no reference, no rejected answers).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator

from mmalign.config import StrictModel
from mmalign.losses import DPO_LOSS_TYPES, dpo_loss


class VLMMethodConfig(StrictModel):
    name: Literal["dpo", "sft"] = Field("dpo", description="dpo = DPO family on response log-probs (+ optional "
                                                           "SFT term); sft = the chosen answers' NLL only (the "
                                                           "SFT-only control).")
    beta: float = Field(0.1, gt=0, description="KL strength; 0.1 is the published setting for STIC and BDHS "
                                               "(summed response log-probs).")
    loss_type: str = Field("sigmoid", description=f"DPO variant, one of {', '.join(DPO_LOSS_TYPES)}.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Only for loss types sigmoid and robust.")
    surrogate: Literal["sum", "mean"] = Field("sum", description="Response log-likelihood: sum over tokens (DPO) "
                                                                 "or per-token mean (length-normalised).")
    sft_weight: float = Field(0.0, ge=0.0, description="Weight of the chosen answers' NLL added to the DPO loss; "
                                                       "0 = pure DPO.")
    sft_reduction: Literal["sum", "mean"] = Field("mean", description="NLL of the SFT term per sample: summed "
                                                                      "over response tokens or their mean.")
    rejected_images: bool = Field(False, description="mDPO-style: also prefer the chosen answer under the clean "
                                                     "image to it under the sample's rejected images.")
    rejected_images_weight: float = Field(1.0, ge=0.0)
    online_weight: float = Field(0.0, ge=0.0, le=1.0, description="BDHS online mode: share of the loss from "
                                                                  "pairs whose rejected answers the current "
                                                                  "policy regenerates each step (0 = offline).")
    online_rho: float = Field(0.99, ge=0.0, le=1.0, description="Online BDHS: share of image tokens hidden.")
    online_max_new_tokens: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "VLMMethodConfig":
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
        if self.name == "sft" and (self.rejected_images or self.online_weight):
            raise ValueError("method.name 'sft' uses the chosen answers only; rejected_images and online_weight "
                             "need 'dpo'")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"


def _reference(adapter, batch: dict, inputs, rejected_images: bool, n: int):
    from mmalign.adapters.vlm import cached_reference

    if adapter.reference == "precomputed":
        return cached_reference(batch, rejected_images)
    return adapter.reference_logps(inputs).split(n)


def _online_rejected(adapter, batch: dict, method: VLMMethodConfig, generator: torch.Generator) -> list[str]:
    from mmalign.selfgen.bdhs import BDHSConfig, bdhs_rejected
    from mmalign.selfgen.embed import load_embedder

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    rows = [{"key": k, "images": ims, "prompt": p, "chosen": c}
            for k, ims, p, c in zip(batch["keys"], batch["images"], batch["prompts"], batch["chosen"])]
    cfg = BDHSConfig(rho=method.online_rho, max_new_tokens=method.online_max_new_tokens, seed=seed,
                     batch_size=len(rows))
    results = bdhs_rejected(adapter, rows, cfg, load_embedder("vlm", adapter))
    # An empty answer cannot be scored as a response; fall back to the offline rejected answer for that row.
    return [r["rejected"] or off for r, off in zip(results, batch["rejected"])]


def vlm_preference_loss(adapter, batch: dict[str, Any], method: VLMMethodConfig, policy=None,
                        generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One `collate_vlm_pairs` batch -> (loss, metrics). `policy` is the module to run forward through (a
    DDP-wrapped policy in the trainer; default `adapter.model`); `generator` seeds online generation.

    Metrics (TRL names): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected, plus sft/nll, tokens/chosen, tokens/rejected; `image/...` for the rejected-image pair and
    `online/...` for online pairs.
    """
    from mmalign.adapters.vlm import pair_rows

    policy = adapter.model if policy is None else policy
    device = next(adapter.model.parameters()).device
    n = len(batch["keys"])
    if method.name == "sft":
        inputs = adapter.encode(batch["prompts"], batch["images"], batch["chosen"], batch["keys"]).to(device)
        lp = adapter.logps(policy, inputs)
        nll = -lp.surrogate(method.sft_reduction).mean()
        return nll, {"sft/nll": nll.detach(), "logps/chosen": lp.sum.mean().detach(),
                     "tokens/chosen": lp.count.float().mean()}

    online = method.online_weight > 0
    if online:
        online_rej = _online_rejected(adapter, batch, method, generator or torch.Generator().manual_seed(0))
    prompts, images, responses, keys = pair_rows(batch, method.rejected_images)
    if online:
        prompts, images = prompts + batch["prompts"], images + batch["images"]
        responses, keys = responses + online_rej, keys + [f"{k}:online_rejected" for k in batch["keys"]]
    inputs = adapter.encode(prompts, images, responses, keys).to(device)
    groups = adapter.logps(policy, inputs).split(n)
    if adapter.reference == "precomputed":
        if online:
            raise ValueError("online_weight > 0 needs a live reference (model.reference lora or copy): online "
                             "answers cannot be precomputed")
        ref = _reference(adapter, batch, None, method.rejected_images, n)
        ref = [type(r)(r.sum.to(device), r.mean.to(device), r.count.to(device)) for r in ref]
    else:
        ref = adapter.reference_logps(inputs).split(n)
    kind = method.surrogate

    def pair(w: int, l: int):
        return dpo_loss(groups[w].surrogate(kind), groups[l].surrogate(kind), ref[w].surrogate(kind),
                        ref[l].surrogate(kind), method.beta, method.loss_type, method.label_smoothing)

    loss, metrics = pair(0, 1)
    metrics = dict(metrics)
    if method.rejected_images:
        loss_img, m_img = pair(0, 2)
        loss = loss + method.rejected_images_weight * loss_img
        metrics.update({f"image/{k}": v for k, v in m_img.items() if k.startswith("rewards/")})
    if online:
        j = 3 if method.rejected_images else 2
        loss_on, m_on = pair(0, j)
        loss = (1 - method.online_weight) * loss + method.online_weight * loss_on
        metrics.update({f"online/{k}": v for k, v in m_on.items() if k.startswith("rewards/")})
    nll = -groups[0].surrogate(method.sft_reduction).mean()
    if method.sft_weight > 0:
        loss = loss + method.sft_weight * nll
    metrics["sft/nll"] = nll.detach()
    metrics["tokens/chosen"] = groups[0].count.float().mean()
    metrics["tokens/rejected"] = groups[1].count.float().mean()
    return loss, metrics
