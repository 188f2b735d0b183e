"""Reward models: scorers, batch scoring of shards, evaluation, and the reward-model training task.

    from mmalign.rewards import load_scorer
    scorer = load_scorer("pickscore")                       # or "hps=/ckpt/HPS_v2.1_compressed.pt", a folder, ...
    with torch.inference_mode():
        scores = scorer.score(images, prompts)              # (N,) float32; (N, D) for scorer.dims

Names are imported lazily (importing `mmalign.rewards` does not import torch); see docs/rewards.md.
"""

from __future__ import annotations

from mmalign._lazy import lazy_exports

_EXPORTS = {
    "Scorer": "base", "ScorerError": "base", "ImagePreprocess": "preprocess",
    "CLIPScorer": "clip", "clip_score": "clip", "pickscore": "clip", "hps": "hpsv2", "save_hps_folder": "hpsv2",
    "open_clip_to_hf_state_dict": "hpsv2", "hf_to_open_clip_state_dict": "hpsv2",
    "AestheticScorer": "laion_aesthetic", "aesthetic": "laion_aesthetic", "ToyScorer": "toy", "FunctionScorer": "toy",
    "ClapScorer": "clap",
    "SCORERS": "registry", "load_scorer": "registry",
    "VideoRewardModel": "video", "VideoRewardConfig": "video", "VideoScorer": "video",
    "LatentRewardModel": "latent", "build_latent_reward": "latent",
    "StepAwareScorer": "step_aware", "OneStepDenoiser": "step_aware", "step_aware_accuracy": "step_aware",
    "score_shards": "scoring", "read_scores": "scoring",
    "pairwise_accuracy": "metrics", "accuracy_with_ties": "metrics", "inversion_score": "metrics",
    "evaluate_reward": "evaluate",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
