"""Inference-time reward guidance: steer a pretrained generator toward weighted rewards at sampling time.

`guided_sample(pipe, prompts, seeds, rewards, guidance=..., sampler=...)` (gradient guidance on clean estimates or
noisy latents), `best_of_n(...)` (gradient-free selection with any scorer), `load_pipeline(...)`,
`RewardSet.load([...])`; the `mmalign guide` command (`mmalign.guidance.cli`) runs them from a config.
Names are imported lazily (importing `mmalign.guidance` does not import torch).
"""

from __future__ import annotations

from mmalign._lazy import lazy_exports

_EXPORTS = {
    "BestOfN": "sample", "GuidedSamples": "sample", "best_of_n": "sample", "candidate_seed": "sample",
    "guided_sample": "sample",
    "GuideConfig": "config", "GuidanceConfig": "config", "SamplerConfig": "config",
    "RewardSet": "sample", "load_pipeline": "pipelines",  # RewardSet lives in mmalign.rewards.combine
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
