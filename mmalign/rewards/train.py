"""Reward-model training, a task of the generic loop (`mmalign train configs/reward/*.yaml`, `task: reward`).

Image reward models (`model.kind: clip` for a transformers CLIPModel, PickScore-style; `hps` for an open_clip /
HPSv2 checkpoint) train on `pair` shards; the reward of an image is `logit_scale.exp() * cos(image, prompt)`.
Video reward models (`model.kind: video`, `mmalign.rewards.video`) train on `video_pair` shards with
Bradley-Terry-with-ties per dimension (VQ, MQ, TA).

Image losses (`method.loss`), from `mmalign.losses`, with r_w, r_l the rewards of the two images of a pair
(stored order for ties):
- `soft_ce` (PickScore): cross-entropy against p = 1 (preferred) or 1/2 (tie), ties kept;
- `bt`: Bradley-Terry, ties excluded from the loss;
- `btt`: Bradley-Terry with ties (Rao-Kupper, `method.btt_k`).

Only the last `model.unfreeze_vision_blocks` / `model.unfreeze_text_blocks` blocks train (-1: all); the logit
scale trains unless `model.train_logit_scale: false` and is clamped to `model.max_logit_scale` after every step.
The final model is exported to `RUN/reward_model/`, a folder its scorer loads back (`load_scorer(folder)`,
`mmalign score --scorers RUN/reward_model`); a video model is first calibrated (per-dimension mean / std) on up to
`data.calibration_samples` training videos.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from pydantic import Field

from mmalign.config import StrictModel
from mmalign.data.video import FrameSampling
from mmalign.rewards.video import VideoRewardConfig
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, Task

OUTPUT = "reward_model"


class RewardModelConfig(StrictModel):
    kind: Literal["clip", "hps", "video"] = Field("clip", description="clip: transformers CLIPModel (PickScore "
                                                                      "style); hps: open_clip checkpoint (HPSv2); "
                                                                      "video: VQ/MQ/TA video reward model.")
    pretrained: str = Field(..., description="clip / video: a CLIPModel folder or hub id ('tiny' builds the tiny "
                                             "test CLIP from mmalign.rewards.tiny, seeded with run.seed); hps: "
                                             "an HPSv2 .pt / .safetensors file or exported folder.")
    tokenizer: Optional[str] = Field(None, description="hps: CLIP tokenizer folder / hub id (default ViT-H-14's).")
    open_clip_config: Optional[str] = Field(None, description="hps: open_clip model config JSON (default "
                                                              "ViT-H-14).")
    name: str = Field("reward", description="Scorer name of the exported model (its `mmalign score` folder).")
    unfreeze_vision_blocks: int = Field(-1, ge=-1, description="Last N vision blocks that train; -1 = all.")
    unfreeze_text_blocks: int = Field(-1, ge=-1, description="Last N text blocks that train; -1 = all.")
    train_logit_scale: bool = Field(True, description="Train CLIP's logit scale (clamped after every step).")
    max_logit_scale: float = Field(100.0, gt=0, description="Clamp for logit_scale.exp() (CLIP's 100).")
    video: VideoRewardConfig = Field(default_factory=VideoRewardConfig, description="kind video: architecture.")


class RewardMethodConfig(StrictModel):
    loss: Literal["soft_ce", "bt", "btt"] = Field("soft_ce", description="Image pairs: soft_ce (ties as 1/2), bt "
                                                                         "(ties excluded) or btt. Video: btt.")
    btt_k: float = Field(5.0, gt=1, description="Tie parameter k of btt (larger: ties likelier).")


class RewardDataConfig(StrictModel):
    shards: str = Field(..., description="pair shards (image models) or video_pair shards (video models).")
    resolution: int = Field(224, gt=0, description="Images are centre-cropped to this square before the scorer's "
                                                   "own preprocessing.")
    ties: Literal["keep", "drop"] = Field("keep", description="Tied pairs: keep (soft_ce / btt learn from them; "
                                                              "bt ignores them) or drop.")
    frames: FrameSampling = Field(default_factory=lambda: FrameSampling(fps=2.0, max_frames=8),
                                  description="Video frame sampling (read_frames arguments).")
    calibration_samples: int = Field(256, gt=1, description="Video: training videos used for the z-normalisation.")
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(0, ge=0)
    strict: bool = Field(False, description="Raise on a corrupt sample instead of skipping and counting it.")


class RewardTrainConfig(BaseTrainConfig):
    task: Literal["reward"] = "reward"
    model: RewardModelConfig
    method: RewardMethodConfig = Field(default_factory=RewardMethodConfig)
    data: RewardDataConfig


def _pair_labels(label: torch.Tensor) -> torch.Tensor:
    """collate_pairs' label (1 = row i preferred, 0.5 = tie) -> bt/btt labels 1 / 0."""
    return torch.where(label == 0.5, torch.zeros_like(label), torch.ones_like(label))


def image_pair_loss(module, batch: dict, loss: str = "soft_ce", k: float = 5.0
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `collate_pairs` batch ([winners; losers], pixel values in [-1, 1]) -> loss from `mmalign.losses`."""
    from mmalign.losses import bt_loss, btt_loss, soft_ce_loss

    prompts = list(batch["captions"])
    rewards = module((batch["pixel_values"] + 1) / 2, prompts + prompts)
    b = len(prompts)
    r_w, r_l = rewards[:b], rewards[b:]
    label = batch["label"].to(rewards.device)
    if loss == "soft_ce":
        value, m = soft_ce_loss(r_w, r_l, label)
    elif loss == "bt":
        value, m = bt_loss(r_w, r_l, _pair_labels(label))
    else:
        value, m = btt_loss(r_w, r_l, _pair_labels(label), k=k)
    metrics = {f"reward/{name}": v for name, v in m.items()}
    metrics["rewards/chosen"] = r_w.detach().mean()
    metrics["rewards/rejected"] = r_l.detach().mean()
    return value, metrics


def _tiny_clip(run_dir: str, seed: int) -> str:
    """The tiny test CLIP, built (deterministically from `seed`) into the run folder."""
    from mmalign.rewards.tiny import build_tiny_clip

    return str(build_tiny_clip(Path(run_dir) / "tiny_clip", seed=seed))


class RewardTask(Task):
    """See the module docstring and `RewardTrainConfig`."""

    config_class = RewardTrainConfig

    def _is_video(self) -> bool:
        return self.cfg.model.kind == "video"

    def check_inputs(self) -> None:
        from mmalign.data.manifest import open_source

        src = open_source(self.cfg.data.shards)
        wanted = "video_pair" if self._is_video() else "pair"
        if src.schema != wanted:
            raise ValueError(f"data.shards {self.cfg.data.shards}: holds {src.schema!r} samples; model.kind "
                             f"{self.cfg.model.kind!r} trains on {wanted!r} shards")

    def build(self, device) -> Built:
        from mmalign.rewards.clip import load_clip_scorer, set_trainable

        m = self.cfg.model
        source = _tiny_clip(self.cfg.run.output_dir, self.cfg.run.seed) if m.pretrained == "tiny" else m.pretrained
        if m.kind == "video":
            from mmalign.rewards.clip import read_scorer_card
            from mmalign.rewards.video import VideoRewardModel

            card = read_scorer_card(source) if Path(source).is_dir() else None
            module = (VideoRewardModel.from_pretrained(source) if card else
                      VideoRewardModel.from_clip(source, m.video.model_copy(update={"name": m.name})))
            clip = module.clip
        else:
            if m.kind == "hps":
                from mmalign.rewards.hpsv2 import hps

                module = hps(source, tokenizer=m.tokenizer, model_config=m.open_clip_config)
            else:
                module = load_clip_scorer(source, name=m.name, scale="logit_scale")
            module.name = m.name
            clip = module.model
        set_trainable(clip, m.unfreeze_vision_blocks, m.unfreeze_text_blocks, m.train_logit_scale)
        module.to(device).train()
        params = [p for p in module.parameters() if p.requires_grad]
        return Built(module=module, params=params)

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.data.collate import collate_pairs, collate_video_pairs
        from mmalign.data.dataset import PairDataset, VideoPairDataset
        from mmalign.train.data import endless_batches

        d = self.cfg.data
        common = dict(shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1), seed=self.cfg.run.seed,
                      rank=rank, world_size=world_size, strict=d.strict)
        if self._is_video():
            dataset, collate = VideoPairDataset(d.shards, frames=d.frames, **common), collate_video_pairs
        else:
            dataset = PairDataset(d.shards, transforms={"resolution": d.resolution, "crop": "center"}, ties=d.ties,
                                  **common)
            collate = collate_pairs
        yield from endless_batches(dataset, collate, self.cfg.train.batch_size, skip=skip, num_workers=d.num_workers,
                                   what=f"data.shards {d.shards}")

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch, generator):
        if cfg.model.kind == "video":
            from mmalign.rewards.video import video_pair_loss

            return video_pair_loss(module, batch, k=cfg.method.btt_k)
        return image_pair_loss(module, batch, cfg.method.loss, cfg.method.btt_k)

    def after_optimizer_step(self, unwrapped) -> None:
        import math

        clip = unwrapped.clip if self._is_video() else unwrapped.model
        with torch.no_grad():
            clip.logit_scale.clamp_(max=math.log(self.cfg.model.max_logit_scale))

    def save_final(self, unwrapped, run_dir: Path) -> dict[str, str]:
        from mmalign.train.checkpoint import atomic_dir

        unwrapped.eval()
        if self._is_video():
            self._calibrate(unwrapped)
            writer = unwrapped.save_pretrained
        elif self.cfg.model.kind == "hps":
            from mmalign.rewards.hpsv2 import VIT_H_14, save_hps_folder

            cfg = self._open_clip_config() or VIT_H_14

            def writer(folder: Path) -> Any:
                return save_hps_folder(unwrapped, cfg, folder)
        else:
            writer = unwrapped.save_pretrained
        return {OUTPUT: str(atomic_dir(run_dir / OUTPUT, writer))}

    def _open_clip_config(self) -> dict | None:
        m = self.cfg.model
        if m.open_clip_config:
            return json.loads(Path(m.open_clip_config).read_text())
        folder = Path(m.pretrained)
        from mmalign.rewards.hpsv2 import OPEN_CLIP_CONFIG

        return json.loads((folder / OPEN_CLIP_CONFIG).read_text()) if (folder / OPEN_CLIP_CONFIG).is_file() else None

    @torch.no_grad()
    def _calibrate(self, model) -> None:
        from mmalign.data.dataset import VideoPairDataset
        from mmalign.rewards.video import frames_to_batch

        d = self.cfg.data
        raw = []
        for sample in VideoPairDataset(d.shards, frames=d.frames, rank=0, world_size=1):
            frames, mask = frames_to_batch([sample["frames_a"], sample["frames_b"]])
            raw.append(model(frames, mask, [sample["prompt"]] * 2).cpu())
            if 2 * len(raw) >= d.calibration_samples:
                break
        model.calibrate(torch.cat(raw))
