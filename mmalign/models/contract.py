"""The adapter contract: what every modality adapter hands to the method table (`mmalign.methods`).

An adapter turns a batch into per-sample *log-likelihood surrogates* for the policy and, when the method needs
one, the reference, in the `(K, B)` layout the losses take: K items per group (K = 2 for pairs, row 0 the
winners, row 1 the losers; K items of a ranked list in stored order), B groups. Items of a group share whatever
the modality draws per sample (diffusion and flow: the timestep and the noise), so their surrogates differ only
because the items differ.

| modality | surrogate | `kind` |
|---|---|---|
| text-to-image diffusion (`mmalign.t2i`) | `-err`, err = mean over C,H,W of the squared prediction error | `error` |
| flow matching (`mmalign.flow`: SD3, Wan, toy video) | `-err`, err = mean over all non-batch dims of the squared velocity error | `error` |
| vision-language models (`mmalign.vlm`) | summed response-token log-probs (`counts` = tokens) | `logp` |
| music tokens (`mmalign.music`) | log-probs summed over codebooks and frames, delay pattern as `generate` (`counts`) | `logp` |
| one denoising transition (SPO, `mmalign.t2i.spo`) | Gaussian log-density of `x_{t-1}` under the sampler's step, mean over C,H,W | `transition` |

The losses never see a model and adapters hold no loss math. A new modality implements `PreferenceAdapter` and
adds a row to `tests/test_adapter_contract.py`: at policy == reference the DPO loss is exactly ln 2; a winner and
its loser share t and noise where the modality has them; the `lora` and `copy` references agree at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

SurrogateKind = Literal["error", "logp", "transition"]


@dataclass
class Surrogates:
    """Per-sample log-likelihood surrogates of a batch of groups.

    policy: (K, B) under the policy, differentiable.
    reference: (K, B) under the reference, without gradient; None when the method needs no reference.
    kind: "error" (the surrogate is `-err`, a negated per-sample mean squared error: diffusion, flow), "logp"
        (summed token log-probabilities: sequence models) or "transition" (the Gaussian log-density of a
        denoising step's next state given x_t, mean over its elements: SPO; K = 2 next states of one x_t).
    t: (B,) the timestep each group shares (diffusion: the scheduler's integer step; flow: the flow time in
        [0, 1], t = 1 pure noise), or None.
    counts: (K, B) tokens scored per item ("logp"), for per-token means; None otherwise.
    num_train_timesteps: the noise scheduler's number of training steps (diffusion), for losses scaled by it.
    """

    policy: Tensor
    reference: Optional[Tensor]
    kind: SurrogateKind
    t: Optional[Tensor] = None
    counts: Optional[Tensor] = None
    num_train_timesteps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.policy.ndim != 2:
            raise ValueError(f"surrogates must be (K, B), got policy {tuple(self.policy.shape)}")
        for name in ("reference", "counts"):
            value = getattr(self, name)
            if value is not None and value.shape != self.policy.shape:
                raise ValueError(f"surrogates: {name} {tuple(value.shape)} != policy {tuple(self.policy.shape)}")
        if self.kind not in ("error", "logp", "transition"):
            raise ValueError(f"surrogate kind {self.kind!r}: valid kinds are 'error', 'logp' and 'transition'")

    @property
    def errors(self) -> Tensor:
        """(K, B) policy errors, `-policy` (kind "error" only)."""
        self._need("error")
        return -self.policy

    @property
    def reference_errors(self) -> Tensor:
        self._need("error")
        if self.reference is None:
            raise ValueError("these surrogates have no reference")
        return -self.reference

    def rows(self, *index: int) -> "Surrogates":
        """The items `index` of every group, e.g. `rows(0, 2)`: the winners against a third item."""
        idx = list(index)
        return replace(self, policy=self.policy[idx],
                       reference=None if self.reference is None else self.reference[idx],
                       counts=None if self.counts is None else self.counts[idx])

    def per_token(self) -> "Surrogates":
        """Length-normalised surrogates: sums divided by the token counts (kind "logp")."""
        self._need("logp")
        if self.counts is None:
            raise ValueError("per-token surrogates need token counts")
        n = self.counts.clamp_min(1).to(self.policy.dtype)
        ref = None if self.reference is None else self.reference / n.to(self.reference.dtype)
        return replace(self, policy=self.policy / n, reference=ref)

    def _need(self, kind: str) -> None:
        if self.kind != kind:
            raise ValueError(f"these surrogates are of kind {self.kind!r}, not {kind!r}")


@runtime_checkable
class PreferenceAdapter(Protocol):
    """A modality adapter: one batch of groups -> `Surrogates`.

    `reference` is the adapter's reference mode (`mmalign.models.reference`: lora, copy, precomputed or none).
    `surrogates(policy, batch, generator, with_reference)` runs the batch through `policy` (the module to run
    forward, possibly wrapped by DDP/FSDP) and, with `with_reference`, through the reference without gradient;
    `generator` is the only randomness (timesteps, noise, latent draws). `unwrapped` is the bare policy module,
    used to toggle its adapters for the `lora` reference.
    """

    reference: str

    def surrogates(self, policy: torch.nn.Module, batch: dict, generator: Optional[torch.Generator],
                   with_reference: bool, unwrapped: Optional[torch.nn.Module] = None) -> Surrogates:
        ...
