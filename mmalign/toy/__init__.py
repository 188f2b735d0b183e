"""The toy world: synthetic scenes with known ground-truth rewards and a simulated annotator.

`scenes` defines the 32x32 scene contract and captions, `rewards` the ground-truth (and differentiable) rewards,
`annotator` the Bradley-Terry / Plackett-Luce simulated annotator.

Names are imported lazily (importing `mmalign.toy` does not import torch: `mmalign --help` stays fast).
"""

from __future__ import annotations

from mmalign._lazy import lazy_exports

_EXPORTS = {
    "agreement": "annotator", "expected_agreement": "annotator", "label_pairs": "annotator",
    "preference_probability": "annotator", "rank": "annotator",
    "classify_shape": "rewards", "color_adherence": "rewards", "color_adherence_torch": "rewards",
    "foreground_mask": "rewards", "position_adherence": "rewards", "reward_components": "rewards",
    "shape_adherence": "rewards", "shape_scores": "rewards", "to_uint8_images": "rewards",
    "total_reward": "rewards",
    "BACKGROUND": "scenes", "CAPTION_TEMPLATE": "scenes", "COLORS": "scenes", "IMAGE_SIZE": "scenes",
    "PALETTE": "scenes", "POSITION_BANDS": "scenes", "POSITIONS": "scenes", "SHAPES": "scenes", "Scene": "scenes",
    "all_prompts": "scenes", "noisy_caption": "scenes", "parse_caption": "scenes", "prompt_seed_pairs": "scenes",
    "sample_scene": "scenes", "sample_scenes": "scenes", "save_scene_grid": "scenes",
}

__all__ = [
    "BACKGROUND",
    "CAPTION_TEMPLATE",
    "COLORS",
    "IMAGE_SIZE",
    "PALETTE",
    "POSITION_BANDS",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "agreement",
    "all_prompts",
    "classify_shape",
    "color_adherence",
    "color_adherence_torch",
    "expected_agreement",
    "foreground_mask",
    "label_pairs",
    "noisy_caption",
    "parse_caption",
    "position_adherence",
    "preference_probability",
    "prompt_seed_pairs",
    "rank",
    "reward_components",
    "sample_scene",
    "sample_scenes",
    "save_scene_grid",
    "shape_adherence",
    "shape_scores",
    "to_uint8_images",
    "total_reward",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
