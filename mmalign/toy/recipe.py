"""The toy world's text-to-image recipe: Diffusion-DPO with LoRA on the shipped toy base model.

`mmalign quickstart`, `mmalign bench toy` and `mmalign eval reward-toy` train with it (only `method.*`, paths and
seeds change between them). It is a plain `task: t2i` recipe, the format users run on SDXL.
"""

from __future__ import annotations

import copy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_MODEL = REPO / "assets" / "toy" / "t2i"

# The recipe: Diffusion-DPO with LoRA on the toy base (the fields a user would put in configs/*.yaml).
RECIPE = {
    "task": "t2i",
    "run": {"seed": 0, "overwrite": True},
    "model": {"pretrained": str(BASE_MODEL),
              "lora": {"rank": 8, "alpha": 8,
                       "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}},
    "method": {"name": "dpo", "beta": 2000, "ties": "drop"},
    "data": {"schema": "pair", "resolution": 32, "center_crop": True, "random_flip": False, "shuffle_buffer": 2000},
    "optim": {"lr": 5e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 20, "weight_decay": 0.0},
    "train": {"max_steps": 300, "batch_size": 16, "checkpoint_every": 100, "checkpoints_total_limit": 1,
              "log_every": 5},
    "validation": {"prompts": ["a red circle on the left", "a green square on the center",
                               "a blue triangle on the right", "a yellow circle on the center"],
                   "seed": 0, "num_inference_steps": 20, "guidance_scale": 1.0, "images_per_prompt": 4},
}


def training_config(out: Path, base: str, seed: int, overrides: list[str], shards: Path):
    """The recipe with this run's paths, validated (overrides applied last)."""
    from mmalign.train.tasks import load_train_config

    recipe = copy.deepcopy(RECIPE)
    recipe["run"].update(output_dir=str(out / "train"), seed=seed)
    recipe["model"]["pretrained"] = base
    recipe["data"]["shards"] = str(shards)
    return load_train_config(None, overrides, defaults=recipe, source="<quickstart recipe>")
