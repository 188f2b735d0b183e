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

Per-pair weights (`method.prompt_weight`, soft_ce and bt): `batch` weighs each pair by 1 / (pairs of its prompt in
the batch), so every prompt counts once; `dataset` by 1 / `num_example_per_prompt` from the sample's provenance ids
(Pick-a-Pic's column, the PickScore weighting). The losses normalise the weights to sum 1 over the batch.

Metrics: one scheme for every reward model, under `rewards/`: the loss's own numbers (`rewards/accuracy`,
`rewards/margin`, `rewards/num_pairs`, `rewards/num_ties`, ...) and the mean rewards `rewards/chosen`,
`rewards/rejected`; a video model logs them per dimension, `rewards/<dim>/accuracy`, `rewards/<dim>/loss` (VQ, MQ,
TA), and their mean `rewards/accuracy`. (A policy run's `rewards/accuracies` is the DPO implicit-reward accuracy.)

Under DDP (world size > 1), `method.gather` (default on) gathers every process's rewards, labels, weights and, for
`batch` weights, prompts before the loss (`gather_cat`, differentiable, like open_clip's `gather_features`): every
process computes the same loss over the global batch, and with DDP's gradient averaging the parameters get exactly
that loss's gradient on the concatenated batch. Without it each process's loss (and its weight normalisation, the
tie exclusion of bt) covers its own micro-batch only.

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
from pydantic import Field, model_validator

from mmalign.config import StrictModel
from mmalign.data.video import FrameSampling
from mmalign.rewards.video import VideoRewardConfig
from mmalign.train.config import BaseTrainConfig
from mmalign.train.distributed import gather_cat, gather_objects, world_size
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
    prompt_weight: Literal["none", "batch", "dataset"] = Field(
        "none", description="Per-pair weights (soft_ce, bt): none (uniform); batch: 1 / pairs of the same prompt "
                            "in the (global) batch; dataset: 1 / provenance ids.num_example_per_prompt (PickScore).")
    gather: bool = Field(True, description="Under DDP, compute the loss over the global batch (rewards, labels, "
                                           "weights gathered differentiably across processes); no effect on one "
                                           "process.")

    @model_validator(mode="after")
    def _check(self) -> "RewardMethodConfig":
        if self.prompt_weight != "none" and self.loss == "btt":
            raise ValueError(f"prompt_weight {self.prompt_weight!r}: btt takes no per-pair weights; use soft_ce or "
                             "bt, or prompt_weight 'none'")
        return self


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


def prompt_counts_weight(prompts: list[str]) -> torch.Tensor:
    """(B,) 1 / (occurrences of each pair's prompt among `prompts`): every prompt weighs 1 in total."""
    from collections import Counter

    counts = Counter(prompts)
    return torch.tensor([1.0 / counts[p] for p in prompts], dtype=torch.float32)


def dataset_prompt_weight(provenance: list[dict]) -> torch.Tensor:
    """(B,) 1 / provenance ids.num_example_per_prompt (Pick-a-Pic's pairs per prompt in the whole data set)."""
    out = []
    for i, prov in enumerate(provenance):
        n = (prov or {}).get("ids", {}).get("num_example_per_prompt")
        if not isinstance(n, (int, float)) or n <= 0:
            raise ValueError(f"method.prompt_weight 'dataset': pair {i} of the batch has no positive provenance "
                             f"ids.num_example_per_prompt (got {n!r}); it is written by the Pick-a-Pic converter. "
                             "Use prompt_weight 'batch' or 'none' for other data")
        out.append(1.0 / float(n))
    return torch.tensor(out, dtype=torch.float32)


def image_pair_loss(module, batch: dict, loss: str = "soft_ce", k: float = 5.0, prompt_weight: str = "none",
                    gather: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `collate_pairs` batch ([winners; losers], pixel values in [-1, 1]) -> loss from `mmalign.losses`.

    With `gather` (needs torch.distributed), rewards, labels, weights and prompts are gathered across processes
    first, so the loss is over the global batch (see the module docstring)."""
    from mmalign.losses import bt_loss, btt_loss, soft_ce_loss

    prompts = list(batch["captions"])
    rewards = module((batch["pixel_values"] + 1) / 2, prompts + prompts)
    b = len(prompts)
    r_w, r_l = rewards[:b], rewards[b:]
    label = batch["label"].to(rewards.device)
    weight = None
    if prompt_weight == "dataset":
        weight = dataset_prompt_weight(batch["provenance"]).to(rewards.device)
    if gather:
        r_w, r_l, label = gather_cat(r_w), gather_cat(r_l), gather_cat(label)
        if weight is not None:
            weight = gather_cat(weight)
        if prompt_weight == "batch":
            prompts = gather_objects(prompts)
    if prompt_weight == "batch":
        weight = prompt_counts_weight(prompts).to(rewards.device)
    if loss == "soft_ce":
        value, m = soft_ce_loss(r_w, r_l, label, weight)
    elif loss == "bt":
        value, m = bt_loss(r_w, r_l, _pair_labels(label), weight)
    else:
        if weight is not None:
            raise ValueError(f"prompt_weight {prompt_weight!r}: btt takes no per-pair weights")
        value, m = btt_loss(r_w, r_l, _pair_labels(label), k=k)
    metrics = {f"rewards/{name}": v for name, v in m.items()}
    metrics["rewards/chosen"] = r_w.detach().mean()
    metrics["rewards/rejected"] = r_l.detach().mean()
    return value, metrics


def _tiny_clip(run_dir: str, seed: int) -> str:
    """The tiny test CLIP, built (deterministically from `seed`) into `RUN/tiny_clip_seed{seed}` by the main
    process while the others wait (transformers saves from the main process only in a distributed run)."""
    from accelerate import PartialState

    from mmalign.rewards.tiny import build_tiny_clip
    from mmalign.train.checkpoint import atomic_dir

    final = Path(run_dir) / f"tiny_clip_seed{seed}"
    with PartialState().main_process_first():
        if not (final / "config.json").is_file():
            atomic_dir(final, lambda tmp: build_tiny_clip(tmp, seed=seed))
    return str(final)


class RewardTask(Task):
    """See the module docstring and `RewardTrainConfig`."""

    config_class = RewardTrainConfig
    progress_metrics = ("rewards/accuracy",)

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
        gather = cfg.method.gather and world_size() > 1
        if cfg.model.kind == "video":
            from mmalign.rewards.video import video_pair_loss

            return video_pair_loss(module, batch, k=cfg.method.btt_k, gather=gather)
        return image_pair_loss(module, batch, cfg.method.loss, cfg.method.btt_k, cfg.method.prompt_weight, gather)

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
