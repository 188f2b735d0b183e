"""Weighted rewards: the objective `mmalign guide` steers toward (image scorers on decoded clean estimates, noisy-latent
reward models on x_t itself), and the reward of self-generated samples (`selfgen music`, online Flow-DPO).

Every reward is one or more *columns* (a scalar scorer is one column named after it; a multi-dimension scorer one
column per dimension, `name/dim`), each with a weight = the reward's weight x its dimension's weight. The objective
is `R = sum_columns weight·score`, over the columns of non-zero weight only (a zero-weight reward is scored for the
report but never evaluated inside the sampling loop, so it cannot change a sample).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from pydantic import Field
from torch import Tensor

from mmalign.config import StrictModel
from mmalign.rewards.base import ScorerError


class RewardSpec(StrictModel):
    scorer: str = Field(..., description="A scorer spec (`mmalign score`'s: NAME, NAME=SOURCE, an exported "
                                         "folder, package.module:function) or latent=FOLDER, a noisy-latent "
                                         "reward model.")
    weight: float = Field(1.0, description="Weight of this reward in the objective (0: scored, not used).")
    dims: Optional[dict[str, float]] = Field(None, description="Multi-dimension rewards: weight per dimension "
                                                               "(unnamed dimensions weigh 0); default all 1.")


_WEIGHT = re.compile(r"^(?P<spec>.+):(?P<weight>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


def parse_reward_list(text: str) -> list[dict]:
    """`toy_color_soft:1.0,aesthetic=/ckpt:0.3` -> reward specs; a spec without `:weight` weighs 1."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"rewards {text!r}: empty entry; write SPEC[:WEIGHT],SPEC[:WEIGHT]")
        m = _WEIGHT.match(item)
        out.append({"scorer": m["spec"], "weight": float(m["weight"])} if m else {"scorer": item, "weight": 1.0})
    return out


@dataclass
class RewardTerm:
    """One reward: a `Scorer` (`latent` False: on images in [0, 1], or on audio for an audio scorer) or a noisy-latent
    reward model (`latent`)."""

    spec: str
    name: str
    weight: float
    model: torch.nn.Module
    latent: bool
    dims: tuple[str, ...] | None
    dim_weights: tuple[float, ...]  # one per column (a single 1.0 for scalar rewards)

    @property
    def columns(self) -> list[str]:
        return [self.name] if self.dims is None else [f"{self.name}/{d}" for d in self.dims]

    def raw(self, prompts: list[str], images: Tensor | None = None, latents: Tensor | None = None,
            t: Tensor | None = None, audio=None, sample_rate: int | None = None, codes: Tensor | None = None) -> Tensor:
        """(N, D) scores: of `images` (N, 3, H, W) in [0, 1], of `latents` at noise levels `t` (N,), of `audio` at
        `sample_rate` Hz (an audio scorer: `mmalign.rewards.audio`), or of music `codes` (N, K, T) (a scorer of
        modality "music_codes": `mmalign.rewards.music`)."""
        if self.latent:
            out = self.model(latents, t, prompts)
        elif getattr(self.model, "modality", None) == "music_codes":
            out = self.model.score(codes, prompts)
        elif audio is not None:
            out = self.model.score(audio, prompts, sample_rate=sample_rate)
        else:
            out = self.model.score(images, prompts)
        return out.reshape(out.shape[0], -1).float()

    def value(self, prompts: list[str], **inputs) -> Tensor:
        """(N,) `sum_d dim_weight_d · score_d` (not multiplied by the reward's own weight)."""
        raw = self.raw(prompts, **inputs)
        return raw @ torch.tensor(self.dim_weights, dtype=raw.dtype, device=raw.device)


class RewardSet:
    """The rewards of one guidance call; see the module docstring."""

    def __init__(self, terms: Sequence[RewardTerm]):
        if not terms:
            raise ValueError("guidance needs at least one reward")
        self.terms = list(terms)

    @classmethod
    def load(cls, specs: Sequence, device: torch.device | str = "cpu") -> "RewardSet":
        """From `RewardSpec`s (or (spec, weight) tuples): image scorers through `load_scorer`, `latent=FOLDER` /
        latent folders through `LatentRewardModel.from_pretrained`; all frozen, in eval mode, on `device`."""
        from mmalign.rewards.registry import load_scorer, scorer_kind

        terms, seen = [], {}
        for i, spec in enumerate(specs):
            text, weight, dims = ((spec.scorer, spec.weight, spec.dims) if hasattr(spec, "scorer") else
                                  (spec[0], spec[1], None))
            latent = scorer_kind(text) == "latent"
            if latent:
                from mmalign.rewards.latent import LatentRewardModel

                folder = text.partition("=")[2] if text.startswith("latent=") else text
                model = LatentRewardModel.from_pretrained(folder)
            else:
                model = load_scorer(text)
            model.requires_grad_(False).eval().to(device)
            name = model.name
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            model_dims = tuple(model.dims) if getattr(model, "dims", None) else None
            if model_dims is not None and len(model_dims) == 1 and latent:
                model_dims = None  # a one-head latent model reads as a scalar reward
            if dims is not None:
                if model_dims is None:
                    raise ScorerError(f"rewards[{i}] {text!r}: dims {sorted(dims)} given, but this reward is a "
                                      "scalar")
                unknown = sorted(set(dims) - set(model_dims))
                if unknown:
                    raise ScorerError(f"rewards[{i}] {text!r}: unknown dims {unknown}; it has {list(model_dims)}")
                dim_weights = tuple(float(dims.get(d, 0.0)) for d in model_dims)
            else:
                dim_weights = (1.0,) * (len(model_dims) if model_dims else 1)
            terms.append(RewardTerm(text, name, float(weight), model, latent, model_dims, dim_weights))
        return cls(terms)

    @property
    def active(self) -> list[RewardTerm]:
        """The terms of non-zero weight: the only ones evaluated inside the sampling loop."""
        return [t for t in self.terms if t.weight != 0]

    def needs_pixels(self) -> bool:
        return any(not t.latent for t in self.active)

    def check_guidable(self) -> None:
        """Every active term can give a gradient (the config checks this from names before loading)."""
        for t in self.active:
            if not t.latent and not getattr(t.model, "differentiable", False):
                raise ScorerError(f"reward {t.spec!r} is not differentiable; gradient guidance cannot use it "
                                  "(give it weight 0 or select with best_of)")

    def objective(self, prompts: list[str], images: Tensor | None, latents: Tensor, t: Tensor) -> Tensor:
        """(N,) `sum weight·value` over the active terms: image terms on `images`, latent terms on (`latents`,
        `t`)."""
        total = None
        for term in self.active:
            inputs = {"latents": latents, "t": t} if term.latent else {"images": images}
            v = term.weight * term.value(prompts, **inputs)
            total = v if total is None else total + v
        return total

    @torch.no_grad()
    def score(self, prompts: list[str], images: Tensor, latents: Tensor) -> dict[str, Tensor]:
        """Every column's score (N,) for final samples: images in [0, 1]; latent models on the clean latents
        (t = 0)."""
        out = {}
        t0 = torch.zeros(latents.shape[0], device=latents.device)
        for term in self.terms:
            raw = term.raw(prompts, **({"latents": latents, "t": t0} if term.latent else {"images": images}))
            out.update({c: raw[:, j].cpu() for j, c in enumerate(term.columns)})
        return out

    def column_weights(self) -> dict[str, float]:
        return {c: term.weight * w for term in self.terms for c, w in zip(term.columns, term.dim_weights)}

    def combine(self, scores: dict[str, Tensor], normalize: str = "none", group: int | None = None) -> Tensor:
        """(N,) `sum_c weight_c · s_c` over the reward columns. With `normalize` "z", each column is z-normalised
        first within each consecutive group of `group` samples (a prompt's best-of-N candidates; default: all N
        samples are one group), so a choice never depends on the other prompts or on how they were batched; a
        column with zero spread in a group contributes 0 there."""
        if normalize not in ("none", "z"):
            raise ValueError(f"normalize {normalize!r}: use 'none' or 'z'")
        total = None
        for column, weight in self.column_weights().items():
            s = scores[column].double()
            if normalize == "z":
                g = s.view(-1, group or s.numel())
                std = g.std(dim=1, unbiased=False, keepdim=True)
                s = torch.where(std > 0, (g - g.mean(dim=1, keepdim=True)) / std.clamp_min(1e-300),
                                torch.zeros_like(g)).view(-1)
            total = weight * s if total is None else total + weight * s
        return total
