"""`mmalign guide` configs: YAML + `key=value` overrides, validated before any model loads.

```yaml
run: {seed: 0}
pipeline: {pretrained: assets/toy/t2i}
sampler: {steps: 20, cfg_scale: 1.0}
rewards:                       # or, on the command line: rewards=toy_color_soft:1.0,toy_brightness:0.3
  - {scorer: toy_color_soft, weight: 1.0}
guidance: {scale: 2.0, window: [0.0, 1.0], every: 1, normalize: true}
best_of: 1
```
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator

from mmalign.config import StrictModel
from mmalign.rewards.combine import RewardSpec, parse_reward_list

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GuideRunConfig(StrictModel):
    seed: int = Field(0, ge=0, lt=2**31, description="Sample i of the prompt file (0-based, counting prompts) is "
                                                     "seeded run.seed + i unless its JSONL row gives a seed: the same "
                                                     "file and seed give the same images with and without guidance.")


class PipelineConfig(StrictModel):
    pretrained: str = Field(..., description="A diffusers pipeline folder or hub id: Stable Diffusion 1.x/2.x, "
                                             "SDXL, SD3 (rectified flow) or the toy world's (assets/toy/t2i).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    variant: Optional[str] = Field(None, description="Weights variant, e.g. 'fp16'.")
    lora: Optional[str] = Field(None, description="LoRA weights to load with the pipeline's load_lora_weights "
                                                  "(e.g. a training run's output folder).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype (float32 is "
                                                                                    "exact on CPU).")
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'...")


class SamplerConfig(StrictModel):
    scheduler: Literal["pipeline", "ddim", "ddpm", "euler_ancestral", "flow_euler"] = Field(
        "pipeline", description="The pipeline's own scheduler, or one of its family built from its config "
                                "(ddim / ddpm / euler_ancestral for diffusion, flow_euler for rectified flow).")
    steps: int = Field(20, gt=0, le=1000, description="Denoising steps.")
    cfg_scale: float = Field(1.0, ge=0.0, description="Classifier-free guidance scale (> 1 runs the negative "
                                                      "prompt too; SD recipes use 7.5, SD3 7.0, the toy 1.0).")
    negative_prompt: str = Field("", description="Negative prompt for classifier-free guidance.")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic).")
    height: Optional[int] = Field(None, gt=0, description="Image height in pixels (default: the model's).")
    width: Optional[int] = Field(None, gt=0, description="Image width in pixels (default: the model's).")
    batch_size: int = Field(16, gt=0, description="Images per denoiser batch.")


class GuidanceConfig(StrictModel):
    scale: float = Field(0.0, description="Gradient guidance scale: 0 = plain unguided sampling (bit for bit); "
                                          "negative lowers the reward. Each guided step moves the sample by "
                                          "scale x (its decrease in noise level) x g, g the (normalised) gradient of "
                                          "the weighted reward at x_t (flow: v <- v - scale·g); over a full window "
                                          "with every 1 the moves add up to scale.")
    window: tuple[float, float] = Field((0.0, 1.0), description="[t_lo, t_hi]: guide only where the noise level "
                                                                "t (1 = pure noise, 0 = clean) lies in it.")
    every: int = Field(1, gt=0, description="Guide every N-th step inside the window, from its first step (the "
                                            "total move is then about scale / N).")
    normalize: bool = Field(True, description="Divide each sample's gradient by its root mean square, so the scale "
                                              "means the same for every reward and noise level.")
    grad_through: Literal["model", "x0"] = Field(
        "model", description="Pixel/x0 rewards: backpropagate through the denoiser (exact gradient of r(x0(x_t))), "
                             "or hold the predicted noise (diffusion: d x0 / d x_t = 1/sqrt(abar)) or velocity "
                             "(flow: 1) fixed, with no denoiser backward (cheaper). Latent rewards never need the "
                             "denoiser's backward.")
    checkpoint_decode: bool = Field(False, description="Recompute the VAE decode in the backward pass instead of "
                                                       "storing its activations (large images).")

    @field_validator("window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"guidance.window must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 (t = 1 is pure "
                             f"noise), got [{lo}, {hi}]")
        return v


class GuideConfig(StrictModel):
    run: GuideRunConfig = Field(default_factory=GuideRunConfig)
    pipeline: PipelineConfig
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    rewards: list[RewardSpec] = Field(..., min_length=1, validation_alias=AliasChoices("rewards", "reward"),
                                      description="The rewards and their weights.")
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    best_of: int = Field(1, ge=1, description="Best-of-N: N candidates per prompt (candidate 0 has the prompt's own "
                                              "seed), the one with the highest weighted score is kept.")
    best_of_normalize: Literal["none", "z"] = Field(
        "none", description="Best-of-N: z-normalise each reward dimension over the prompt's own N candidates before "
                            "weighting (as VideoReward does before summing VQ/MQ/TA); with N = 2 that is a vote "
                            "per reward, so use N >= 3.")

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_string(cls, v):
        return parse_reward_list(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "GuideConfig":
        check_rewards(self)
        return self


def check_rewards(cfg: GuideConfig) -> None:
    """Every reward spec is known and, when gradient guidance is on, differentiable; read from names and scorer
    cards only (no weights load)."""
    from mmalign.rewards.base import ScorerError
    from mmalign.rewards.registry import is_differentiable, scorer_kind

    if cfg.guidance.scale != 0 and all(r.weight == 0 for r in cfg.rewards):
        raise ValueError(f"guidance.scale {cfg.guidance.scale} needs at least one reward of non-zero weight (every "
                         "reward weighs 0)")
    for i, r in enumerate(cfg.rewards):
        try:
            kind = scorer_kind(r.scorer)
            differentiable = is_differentiable(r.scorer)
        except ScorerError as err:
            raise ValueError(f"rewards[{i}]: {err}") from None
        if kind in ("video", "audio"):
            raise ValueError(f"rewards[{i}] {r.scorer!r}: a {kind} scorer; guidance samples images")
        if cfg.guidance.scale != 0 and r.weight != 0 and not differentiable:
            raise ValueError(f"rewards[{i}] {r.scorer!r} is not differentiable, so gradient guidance "
                             f"(guidance.scale {cfg.guidance.scale}) cannot use it: use a differentiable scorer "
                             "(toy_color_soft, toy_brightness, clip_score, pickscore, hps, aesthetic, latent=FOLDER), "
                             "give it weight 0, or select with best_of (any scorer) at guidance.scale 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"pipeline.device {name!r}: use auto, cpu, cuda or cuda:N") from None
