"""Reward-model training, a task of the generic loop (`mmalign train configs/reward/*.yaml`, `task: reward`).

Image reward models (`model.kind: clip` for a transformers CLIPModel, PickScore-style; `hps` for an open_clip /
HPSv2 checkpoint) train on `pair` shards; the reward of an image is `logit_scale.exp() * cos(image, prompt)`.
Video reward models (`model.kind: video`, `mmalign.rewards.video`) train on `video_pair` shards with
Bradley-Terry-with-ties per dimension (VQ, MQ, TA).
Noisy-latent reward models (`model.kind: latent`, `mmalign.rewards.latent`, for reward guidance inside a sampler)
train on `pair` shards: the images are encoded to the generator's latents (`model.latent.generator`'s VAE; pixel
space: the images in [-1, 1]), and with `model.latent.train_noise: noised` both latents of a pair are noised with
one shared t ~ U(t_min, t_max) and one shared noise draw (`add_noise`), so the reward is learned at every noise
level and the two differ only by their images; `clean` feeds x0 with t = 0 (the ablation). With several
`model.latent.dims`, every pair needs per-dimension labels, the JSON field `dim_labels` {dim: 1 | 0 | 0.5} (label_0's
convention: 1 = image 0 better on that dimension); the loss is the mean over dimensions. `data.ties` still filters
on the overall label_0.
Step-aware preference models (`model.kind: step_aware`, `mmalign.rewards.step_aware`, SPO's SPM) train on `pair`
shards: a CLIP scorer (`model.pretrained`) with zero-initialised timestep conditioning judges the frozen generator's
(`model.step_aware.generator`) one-step x0 estimates. Per pair one timestep k uniform on the grid of
[t_min, t_max) and one noise draw, shared by both images: VAE-encode, noise to k, one UNet call with the caption
(classifier-free guidance, `guidance_scale`), `predicted_x0`, decode; the model scores both at t = k / T. With
`validation.shards` (held-out pairs), the accuracy per t bucket is logged (`eval/accuracy/t_<lo>-<hi>`,
`eval/accuracy`) every `validation.every` steps and at the end, and written to `RUN/eval/step-<step>.json`.

Image losses (`method.loss`), from `mmalign.losses`, with r_w, r_l the rewards of the two images of a pair
(stored order for ties):
- `soft_ce` (PickScore): cross-entropy against p = 1 (preferred) or 1/2 (tie), ties kept;
- `bt`: Bradley-Terry, ties excluded from the loss;
- `btt`: Bradley-Terry with ties (Rao-Kupper, `method.btt_k`).

Per-pair weights (`method.prompt_weight`, soft_ce and bt): `batch` weighs each pair by 1 / (pairs of its prompt in
the batch), so every prompt counts once; `dataset` by 1 / `num_example_per_prompt` from the sample's provenance ids
(Pick-a-Pic's column, the PickScore and SPM weighting); `shards` by 1 / (pairs with exactly that caption in the
whole of `data.shards`, after `data.ties`), counted once before training (`shard_prompt_counts`): the same column
computed from the pairs themselves, for data that does not carry it. The losses normalise the weights to sum 1 over
the batch.

Metrics: one scheme for every reward model, under `rewards/`: the loss's own numbers (`rewards/accuracy`,
`rewards/margin`, `rewards/num_pairs`, `rewards/num_ties`, ...) and the mean rewards `rewards/chosen`,
`rewards/rejected`; a video model logs them per dimension, `rewards/<dim>/accuracy`, `rewards/<dim>/loss` (VQ, MQ,
TA), and their mean `rewards/accuracy`; a latent model with several dims likewise (`rewards/<dim>/accuracy`, ...,
`rewards/<dim>/loss`). (A policy run's `rewards/accuracies` is the DPO implicit-reward accuracy.)

Under DDP (world size > 1), `method.gather` (default on) gathers every process's rewards, labels, weights and, for
`batch` weights, prompts before the loss (`gather_cat`, differentiable, like open_clip's `gather_features`): every
process computes the same loss over the global batch, and with DDP's gradient averaging the parameters get exactly
that loss's gradient on the concatenated batch. Without it each process's loss (and its weight normalisation, the
tie exclusion of bt) covers its own micro-batch only.

Only the last `model.unfreeze_vision_blocks` / `model.unfreeze_text_blocks` blocks train (-1: all); the logit
scale trains unless `model.train_logit_scale: false` and is clamped to `model.max_logit_scale` after every step
(CLIP settings: refused for kind latent, whose text encoder is frozen and whose small network trains whole; for
kind step_aware they choose what of the CLIP trains, and its time MLP always trains).
The final model is exported to `RUN/reward_model/`, a folder its scorer loads back (`load_scorer(folder)`,
`mmalign score --scorers RUN/reward_model`); a video model is first calibrated (per-dimension mean / std) on up to
`data.calibration_samples` training videos.

Music reward models (`model.kind: music`, `mmalign.rewards.music`, MusicRL's user-preference reward) train on
`music_pair` shards: a small transformer over the K codebooks' code embeddings (summed per frame) and the prompt's
hashed word embeddings (`model.music`: vocab_size, num_codebooks, width, layers, ...), freshly built (seeded with
run.seed) or trained further from an exported music folder (`model.pretrained`). Every music pair is decided
(chosen over rejected, label 1), so bt, soft_ce and btt all reduce to the Bradley-Terry loss on it. Codes outside
the vocabulary or with another K are an error naming the shard keys. With `validation.shards` (held-out music_pair
shards) the held-out pairwise accuracy (`eval/accuracy`, per dimension `eval/<dim>/accuracy` with several) is
logged every `validation.every` steps and at the end, and written to `RUN/eval/step-<step>.json`. Exported as a
`MusicCodeScorer` folder (`load_scorer(folder)`: `score(codes (N, K, T), prompts)`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator

from mmalign.config import StrictModel
from mmalign.data.video import FrameSampling
from mmalign.rewards.music import MusicRewardConfig
from mmalign.rewards.video import VideoRewardConfig
from mmalign.train.config import BaseTrainConfig
from mmalign.train.distributed import gather_cat, gather_objects, world_size
from mmalign.train.tasks import Built, Task

OUTPUT = "reward_model"


_DIM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class LatentModelConfig(StrictModel):
    """`model.latent`: the noisy-latent reward model (`mmalign.rewards.latent`) and how its inputs are noised."""

    generator: Optional[str] = Field(None, description="Required for kind latent: the generator pipeline (folder / "
                                                       "hub id) whose noisy latents are scored. Its text encoder + "
                                                       "tokenizer are copied (frozen) into the model, its scheduler "
                                                       "sets the process (flow for a FlowMatch scheduler, else "
                                                       "ddpm), its VAE encodes the training images (no VAE: pixel "
                                                       "space, the images in [-1, 1] are the latents).")
    width: int = Field(32, gt=0, multiple_of=8, description="Conv widths width, 2*width, 4*width (GroupNorm, 8 "
                                                            "groups); 32 is about 0.2 M parameters.")
    dims: list[str] = Field(default_factory=lambda: ["reward"], min_length=1,
                            description="One head per reward dimension. More than one needs per-dimension labels in "
                                        "every pair: the JSON field dim_labels {dim: 1 | 0 | 0.5} (1 = image 0 better "
                                        "on it, 0 = image 1, 0.5 = tie).")
    train_noise: Literal["noised", "clean"] = Field(
        "noised", description="noised: each pair's two latents get one shared t ~ U(t_min, t_max) and one shared "
                              "noise draw (learns the reward at every noise level, what guidance needs); clean: t = 0, "
                              "x0 as is (the ablation: a reward of clean latents only).")
    t_min: float = Field(0.0, ge=0, le=1, description="noised: lower end of t (t = 1 pure noise, 0 clean).")
    t_max: float = Field(1.0, ge=0, le=1, description="noised: upper end of t.")
    latents: Literal["sample", "mean"] = Field("sample", description="VAE posterior sample (one draw per image and "
                                                                     "step) or its mean; no effect in pixel space.")

    @model_validator(mode="after")
    def _check(self) -> "LatentModelConfig":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min {self.t_min} > t_max {self.t_max}: t ~ U(t_min, t_max) needs t_min <= t_max, "
                             "both in [0, 1]")
        if self.train_noise == "clean" and (self.t_min, self.t_max) != (0.0, 1.0):
            raise ValueError(f"t_min / t_max ({self.t_min}, {self.t_max}) do not apply to train_noise 'clean' "
                             "(t = 0 always); remove them or use train_noise 'noised'")
        bad = [d for d in self.dims if not _DIM_NAME.match(d)]
        if bad:
            raise ValueError(f"dims {bad}: names must match {_DIM_NAME.pattern} (they become metric names "
                             "rewards/<dim>/...)")
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims {self.dims}: each dimension once")
        return self


class StepAwareModelConfig(StrictModel):
    """`model.step_aware`: the step-aware preference model (`mmalign.rewards.step_aware`), its generator and the
    noise levels it trains on."""

    generator: Optional[str] = Field(None, description="Required for kind step_aware: the text-to-image pipeline "
                                                       "(SD 1.x/2.x, SDXL or the toy pipeline; folder / hub id, "
                                                       "loaded with from_pretrained and frozen) whose one-step "
                                                       "x0 estimates the model learns to judge.")
    t_min: float = Field(0.0, ge=0, le=1, description="Lower end of t = timestep / num_train_timesteps (0 clean).")
    t_max: float = Field(1.0, ge=0, le=1, description="Upper end of t (exclusive; 1 includes the last timestep). "
                                                      "Each pair's timestep is uniform on the grid of [t_min, "
                                                      "t_max), the published SPM code's randint(0, T) at 0 / 1.")
    guidance_scale: float = Field(5.0, ge=1, description="Classifier-free guidance of the one UNet call (the "
                                                         "published SPM code's 5.0); 1: the conditional prediction "
                                                         "only, half the UNet rows.")
    negative_prompt: str = Field("", description="The unconditional prompt of classifier-free guidance.")
    time_dim: int = Field(256, gt=0, multiple_of=2, description="Width of the sinusoidal embedding of t.")
    hidden_dim: int = Field(256, gt=0, description="Hidden width of the time MLP (its output: 2 x the vision "
                                                   "tower's width, scale and shift).")

    @model_validator(mode="after")
    def _check(self) -> "StepAwareModelConfig":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min {self.t_min} > t_max {self.t_max}: timesteps are drawn from [t_min, t_max), "
                             "both in [0, 1]")
        return self


# CLIP / HPS / video settings that mean nothing to a latent model (refused when not at their defaults).
_NOT_LATENT = ("tokenizer", "open_clip_config", "unfreeze_vision_blocks", "unfreeze_text_blocks", "train_logit_scale",
               "max_logit_scale", "video")


class RewardModelConfig(StrictModel):
    kind: Literal["clip", "hps", "video", "latent", "step_aware", "music"] = Field(
        "clip", description="clip: transformers CLIPModel (PickScore style); hps: open_clip checkpoint (HPSv2); "
                            "video: VQ/MQ/TA video reward model; latent: noisy-latent reward model of a generator "
                            "(model.latent); step_aware: a CLIP scorer with timestep conditioning judging a "
                            "generator's one-step x0 estimates (model.step_aware, SPO's SPM); music: a Bradley-Terry "
                            "reward model on music codes (model.music, music_pair shards).")
    pretrained: Optional[str] = Field(None, description="clip / video / step_aware (required): a CLIPModel "
                                                        "folder or hub id (step_aware: or a step-aware folder to "
                                                        "train further) "
                                                        "('tiny' builds the tiny test CLIP from mmalign.rewards.tiny, "
                                                        "seeded with run.seed); hps: an HPSv2 .pt / .safetensors "
                                                        "file or exported folder. latent: not used (built from "
                                                        "model.latent.generator, seeded with run.seed).")
    tokenizer: Optional[str] = Field(None, description="hps: CLIP tokenizer folder / hub id (default ViT-H-14's).")
    open_clip_config: Optional[str] = Field(None, description="hps: open_clip model config JSON (default "
                                                              "ViT-H-14).")
    name: str = Field("reward", description="Scorer name of the exported model (its `mmalign score` folder).")
    unfreeze_vision_blocks: int = Field(-1, ge=-1, description="Last N vision blocks that train; -1 = all.")
    unfreeze_text_blocks: int = Field(-1, ge=-1, description="Last N text blocks that train; -1 = all.")
    train_logit_scale: bool = Field(True, description="Train CLIP's logit scale (clamped after every step).")
    max_logit_scale: float = Field(100.0, gt=0, description="Clamp for logit_scale.exp() (CLIP's 100).")
    video: VideoRewardConfig = Field(default_factory=VideoRewardConfig, description="kind video: architecture.")
    latent: LatentModelConfig = Field(default_factory=LatentModelConfig, description="kind latent: generator, "
                                                                                     "architecture, noising.")
    step_aware: StepAwareModelConfig = Field(default_factory=StepAwareModelConfig,
                                             description="kind step_aware: generator, t range, time MLP.")
    music: MusicRewardConfig = Field(default_factory=MusicRewardConfig,
                                     description="kind music: architecture (vocab_size, num_codebooks, width, "
                                                 "layers, heads, dims, ...); the exported name is model.name.")

    @model_validator(mode="after")
    def _check(self) -> "RewardModelConfig":
        if self.kind == "step_aware" and self.step_aware.generator is None:
            raise ValueError("step_aware.generator: required for kind 'step_aware' (the text-to-image pipeline "
                             "folder or hub id whose one-step x0 estimates the model scores)")
        if self.kind != "step_aware" and self.step_aware != StepAwareModelConfig():
            raise ValueError(f"step_aware: only for kind 'step_aware', got kind {self.kind!r}")
        if self.kind != "music" and self.music != MusicRewardConfig():
            raise ValueError(f"music: only for kind 'music', got kind {self.kind!r}")
        if self.kind == "music":
            if self.latent != LatentModelConfig():
                raise ValueError("latent: only for kind 'latent', got kind 'music'")
            fields = type(self).model_fields
            wrong = [k for k in _NOT_LATENT if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: CLIP / video settings that do not apply to kind 'music'; "
                                 "remove them")
            return self  # pretrained: optional (an exported music folder to train further)
        if self.kind != "latent":
            if self.pretrained is None:
                raise ValueError(f"pretrained: required for kind {self.kind!r}")
            if self.latent != LatentModelConfig():
                raise ValueError(f"latent: only for kind 'latent', got kind {self.kind!r}")
            return self
        if self.latent.generator is None:
            raise ValueError("latent.generator: required for kind 'latent' (the generator pipeline folder or hub id "
                             "whose noisy latents the model scores)")
        if self.pretrained is not None:
            raise ValueError(f"pretrained {self.pretrained!r}: not used by kind 'latent' (a fresh model is built from "
                             "latent.generator); remove it")
        fields = type(self).model_fields
        wrong = [k for k in _NOT_LATENT if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: CLIP / video settings that do not apply to kind 'latent'; remove "
                             "them")
        return self


class RewardMethodConfig(StrictModel):
    loss: Literal["soft_ce", "bt", "btt"] = Field("soft_ce", description="Image and latent pairs: soft_ce (ties as "
                                                                         "1/2), bt (ties excluded) or btt. Video: "
                                                                         "btt.")
    btt_k: float = Field(5.0, gt=1, description="Tie parameter k of btt (larger: ties likelier).")
    prompt_weight: Literal["none", "batch", "dataset", "shards"] = Field(
        "none", description="Per-pair weights (soft_ce, bt): none (uniform); batch: 1 / pairs of the same prompt "
                            "in the (global) batch; dataset: 1 / provenance ids.num_example_per_prompt (PickScore, "
                            "SPM); shards: 1 / pairs with the same caption in all of data.shards (counted before "
                            "training).")
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
    shards: str = Field(..., description="pair shards (image models), video_pair shards (video models) or "
                                         "music_pair shards (music models).")
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


class RewardValidationConfig(StrictModel):
    """`validation`: held-out evaluation during training (kind step_aware: the pair accuracy per t bucket; kind
    music: the pairwise accuracy, buckets and seed unused)."""

    shards: Optional[str] = Field(None, description="Held-out pair shards (kind music: music_pair shards); none: "
                                                    "no validation.")
    every: int = Field(0, ge=0, description="Steps between evaluations; 0 = only at the end.")
    buckets: int = Field(5, gt=0, description="Equal t buckets over [0, 1]; each pair is scored once per bucket.")
    max_pairs: int = Field(256, gt=0, description="At most this many held-out pairs (read in order).")
    batch_size: int = Field(16, gt=0, description="Pairs per evaluation batch.")
    seed: int = Field(0, description="Timestep, noise and VAE draws (the same at every evaluation).")


class RewardTrainConfig(BaseTrainConfig):
    task: Literal["reward"] = "reward"
    model: RewardModelConfig
    method: RewardMethodConfig = Field(default_factory=RewardMethodConfig)
    data: RewardDataConfig
    validation: RewardValidationConfig = Field(default_factory=RewardValidationConfig)

    @model_validator(mode="after")
    def _check_validation(self) -> "RewardTrainConfig":
        v = self.validation
        if v.shards is not None and self.model.kind not in ("step_aware", "music"):
            raise ValueError(f"validation.shards: held-out accuracy is for model.kind 'step_aware' (per t bucket) "
                             f"or 'music', got {self.model.kind!r}; remove validation.shards (evaluate with mmalign "
                             "eval)")
        if v.every and v.shards is None:
            raise ValueError(f"validation.every {v.every}: needs validation.shards (held-out pair shards)")
        return self


def _pair_labels(label: torch.Tensor) -> torch.Tensor:
    """P(row i preferred): 1, 0.5 (tie) or 0 (collate_pairs gives 1 or 0.5) -> bt/btt labels 1 / 0 / -1."""
    return label * 2 - 1


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


def shard_prompt_counts(shards: str, ties: str = "keep") -> dict[str, int]:
    """{caption: pairs with exactly that caption} over all of `shards`, after the `ties` filter ("keep" / "drop"):
    Pick-a-Pic's num_example_per_prompt, counted from the pairs themselves. One pass over the shards' JSON, images
    not decoded; every process reads the whole set, whatever its data split."""
    from collections import Counter

    from mmalign.data.dataset import PairDataset

    return dict(Counter(s["caption"] for s in PairDataset(shards, decode_images=False, ties=ties, rank=0,
                                                          world_size=1)))


def pair_loss(r_w: torch.Tensor, r_l: torch.Tensor, label: torch.Tensor, prompts: list[str],
              provenance: list[dict] | None = None, loss: str = "soft_ce", k: float = 5.0,
              prompt_weight: str = "none", gather: bool = False,
              num_per_prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (B,) of row i and its partner, label (B,) P(row i preferred) in {1, 0.5 (tie), 0} -> the loss from
    `mmalign.losses` and its metrics (unprefixed names: `accuracy`, `num_ties`, ...). `num_per_prompt` (B,): the
    pairs of each pair's caption in the data (`shard_prompt_counts`), the weights 1 / it of prompt_weight 'shards'.

    With `gather` (needs torch.distributed), rewards, labels, weights and prompts are gathered across processes
    first, so the loss is over the global batch (see the module docstring)."""
    from mmalign.losses import bt_loss, btt_loss, soft_ce_loss

    label = label.to(r_w.device)
    weight = None
    if prompt_weight == "dataset":
        weight = dataset_prompt_weight(provenance).to(r_w.device)
    elif prompt_weight == "shards":
        if num_per_prompt is None:
            raise ValueError("method.prompt_weight 'shards': the batch has no num_example_per_prompt (RewardTask."
                             "batches adds it from shard_prompt_counts)")
        weight = 1.0 / num_per_prompt.to(r_w.device, torch.float32)
    if gather:
        r_w, r_l, label = gather_cat(r_w), gather_cat(r_l), gather_cat(label)
        if weight is not None:
            weight = gather_cat(weight)
        if prompt_weight == "batch":
            prompts = gather_objects(prompts)
    if prompt_weight == "batch":
        weight = prompt_counts_weight(prompts).to(r_w.device)
    if loss == "soft_ce":
        return soft_ce_loss(r_w, r_l, label, weight)
    if loss == "bt":
        return bt_loss(r_w, r_l, _pair_labels(label), weight)
    if weight is not None:
        raise ValueError(f"prompt_weight {prompt_weight!r}: btt takes no per-pair weights")
    return btt_loss(r_w, r_l, _pair_labels(label), k=k)


def image_pair_loss(module, batch: dict, loss: str = "soft_ce", k: float = 5.0, prompt_weight: str = "none",
                    gather: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `collate_pairs` batch ([winners; losers], pixel values in [-1, 1]) -> `pair_loss` of the image rewards."""
    prompts = list(batch["captions"])
    rewards = module((batch["pixel_values"] + 1) / 2, prompts + prompts)
    b = len(prompts)
    r_w, r_l = rewards[:b], rewards[b:]
    value, m = pair_loss(r_w, r_l, batch["label"], prompts, batch.get("provenance"), loss, k, prompt_weight, gather,
                         num_per_prompt=batch.get("num_example_per_prompt"))
    metrics = {f"rewards/{name}": v for name, v in m.items()}
    metrics["rewards/chosen"] = r_w.detach().mean()
    metrics["rewards/rejected"] = r_l.detach().mean()
    return value, metrics


def pair_dim_labels(batch: dict, dims: Sequence[str]) -> torch.Tensor:
    """(B, D) P(row i preferred to row B+i) per dimension, from each pair's JSON field `dim_labels` {dim: 1 | 0 |
    0.5} (label_0's convention: 1 = stored image 0 better on that dimension), put in the batch's row order with
    `winner_index` (row i holds stored image `winner_index[i]`). A pair without them is an error naming its shard
    and key."""
    extra = batch.get("extra") or [None] * len(batch["keys"])
    rows = []
    for i, key in enumerate(batch["keys"]):
        where = f"{batch['shards'][i]}: pair {key!r}"
        labels = (extra[i] or {}).get("dim_labels")
        if not isinstance(labels, dict):
            raise ValueError(f"{where}: no dim_labels in its JSON; model.latent.dims {list(dims)} (more than one) "
                             "needs per-dimension labels in every pair, dim_labels {dim: 1 | 0 | 0.5} (1 = image 0 "
                             "better, 0 = image 1, 0.5 = tie), e.g. pair_sample(..., dim_labels={...}); or train "
                             "one dimension")
        missing = [d for d in dims if d not in labels]
        if missing:
            raise ValueError(f"{where}: dim_labels has no {missing} (it has {sorted(labels)}); model.latent.dims "
                             f"is {list(dims)}")
        # Not a bool, not text: a label written as true or "1" is a broken converter (as for label_0).
        bad = {d: labels[d] for d in dims if isinstance(labels[d], bool) or not isinstance(labels[d], (int, float))
               or labels[d] not in (0, 0.5, 1)}
        if bad:
            raise ValueError(f"{where}: dim_labels {bad}: each must be 1 (image 0 better), 0 (image 1) or 0.5 (tie)")
        p0 = torch.tensor([float(labels[d]) for d in dims])
        rows.append(p0 if int(batch["winner_index"][i]) == 0 else 1 - p0)
    return torch.stack(rows)


def latent_pair_loss(module, unwrapped, vae, batch: dict, latent: LatentModelConfig,
                     method: RewardMethodConfig, generator: torch.Generator | None = None,
                     gather: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `collate_pairs` batch -> `pair_loss` of a `LatentRewardModel`'s rewards of the noised latents.

    x0 = the generator's latents of the 2B images ([winners; losers]); `noised`: per pair one t ~ U(t_min, t_max)
    (snapped to the process's grid, `snap_t`) and one noise draw, both shared by its two latents,
    `x_t = add_noise(x0, noise, t)`; `clean`: x_t = x0, t = 0. All randomness from `generator` (CPU).
    One dimension: the batch's label; several: `pair_dim_labels`, the loss is the mean over dimensions.
    `module` is what runs forward (possibly DDP-wrapped), `unwrapped` the bare model (its forward process)."""
    from mmalign.rewards.latent import encode_latents

    prompts = list(batch["captions"])
    b = len(prompts)
    device = unwrapped.device
    x0 = encode_latents(vae, batch["pixel_values"].to(device), mode=latent.latents, generator=generator)
    if latent.train_noise == "clean":
        t, x_t = torch.zeros(2 * b, device=device), x0
    else:
        t = unwrapped.snap_t(latent.t_min + (latent.t_max - latent.t_min) * torch.rand(b, generator=generator))
        noise = torch.randn((b, *x0.shape[1:]), generator=generator, dtype=x0.dtype).to(device)
        t = torch.cat([t, t]).to(device)
        x_t = unwrapped.add_noise(x0, torch.cat([noise, noise]), t)
    rewards = module(x_t, t, prompts + prompts)
    r_w, r_l = rewards[:b], rewards[b:]
    dims = list(latent.dims)
    args = (prompts, batch.get("provenance"), method.loss, method.btt_k, method.prompt_weight, gather,
            batch.get("num_example_per_prompt"))
    if len(dims) == 1:
        value, m = pair_loss(r_w[:, 0], r_l[:, 0], batch["label"], *args)
        metrics = {f"rewards/{name}": v for name, v in m.items()}
        metrics["rewards/chosen"] = r_w.detach().mean()
        metrics["rewards/rejected"] = r_l.detach().mean()
        return value, metrics
    labels = pair_dim_labels(batch, dims)
    losses, metrics = [], {}
    for j, dim in enumerate(dims):
        value, m = pair_loss(r_w[:, j], r_l[:, j], labels[:, j], *args)
        losses.append(value)
        metrics.update({f"rewards/{dim}/{name}": v for name, v in m.items()})
        metrics[f"rewards/{dim}/loss"] = value.detach()
    metrics["rewards/accuracy"] = torch.stack([metrics[f"rewards/{d}/accuracy"] for d in dims]).mean()
    return torch.stack(losses).mean(), metrics


def step_aware_pair_loss(module, denoiser, batch: dict, sa: StepAwareModelConfig, method: RewardMethodConfig,
                         generator: torch.Generator | None = None,
                         gather: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `collate_pairs` batch -> `pair_loss` of a `StepAwareScorer`'s rewards of the pairs' one-step estimates.

    Per pair one timestep k uniform on the grid of [t_min, t_max) and one noise draw, both shared by its two
    images (`OneStepDenoiser.x0_images`, frozen, no grad); the model scores both estimates at t = k / T. All
    randomness from `generator` (CPU): timesteps, then the VAE posterior draws and the noise. `module` is what runs
    forward (possibly DDP-wrapped); `denoiser` the `OneStepDenoiser` (`Built.model`). Metrics as the image models',
    plus `rewards/t` (the batch's mean t)."""
    prompts = list(batch["captions"])
    b = len(prompts)
    k = denoiser.draw_timesteps(b, sa.t_min, sa.t_max, generator)
    images = denoiser.x0_images(batch["pixel_values"], prompts, k, generator)
    t = torch.cat([k, k]).float() / denoiser.num_train_timesteps
    rewards = module(images, prompts + prompts, t)
    r_w, r_l = rewards[:b], rewards[b:]
    value, m = pair_loss(r_w, r_l, batch["label"], prompts, batch.get("provenance"), method.loss, method.btt_k,
                         method.prompt_weight, gather, num_per_prompt=batch.get("num_example_per_prompt"))
    metrics = {f"rewards/{name}": v for name, v in m.items()}
    metrics["rewards/chosen"] = r_w.detach().mean()
    metrics["rewards/rejected"] = r_l.detach().mean()
    metrics["rewards/t"] = t[:b].mean()
    return value, metrics


def music_pair_loss(module, unwrapped, batch: dict, method: RewardMethodConfig, gather: bool = False
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `collate_music_pairs` batch (codes (2B, K, T) as [chosen; rejected], codes_mask (2B, T)) -> `pair_loss`
    of a `MusicRewardModel`'s rewards (every music pair is decided: label 1) and its metrics: `rewards/...` with
    one dimension; with several, `rewards/<dim>/...` (the same label for every dimension), `rewards/<dim>/loss`
    and the mean `rewards/accuracy`; the loss is the mean over dimensions. Codes the model cannot score are an
    error naming the batch's shard keys. `module` runs forward (possibly DDP-wrapped), `unwrapped` is the model."""
    prompts = list(batch["prompts"])
    b = len(prompts)
    codes = unwrapped.check_codes(batch["codes"], f"codes of pairs {batch['keys']} ({sorted(set(batch['shards']))})")
    rewards = module(codes, prompts + prompts, batch["codes_mask"])
    r_w, r_l = rewards[:b], rewards[b:]
    dims = list(unwrapped.config.dims)
    losses, metrics = [], {}
    for j, dim in enumerate(dims):
        value, m = pair_loss(r_w[:, j], r_l[:, j], torch.ones(b), prompts, batch.get("provenance"), method.loss,
                             method.btt_k, method.prompt_weight, gather)
        losses.append(value)
        prefix = "rewards/" if len(dims) == 1 else f"rewards/{dim}/"
        metrics.update({f"{prefix}{name}": v for name, v in m.items()})
        if len(dims) > 1:
            metrics[f"{prefix}loss"] = value.detach()
    if len(dims) > 1:
        metrics["rewards/accuracy"] = torch.stack([metrics[f"rewards/{d}/accuracy"] for d in dims]).mean()
    metrics["rewards/chosen"] = r_w.detach().mean()
    metrics["rewards/rejected"] = r_l.detach().mean()
    return torch.stack(losses).mean(), metrics


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
    denoiser = None  # kind step_aware: the generator's OneStepDenoiser, set by build

    def _is_video(self) -> bool:
        return self.cfg.model.kind == "video"

    def _extra_fields(self) -> tuple[str, ...]:
        m = self.cfg.model
        return ("dim_labels",) if m.kind == "latent" and len(m.latent.dims) > 1 else ()

    def check_inputs(self) -> None:
        from mmalign.data.manifest import open_source

        src = open_source(self.cfg.data.shards)
        wanted = {"video": "video_pair", "music": "music_pair"}.get(self.cfg.model.kind, "pair")
        if src.schema != wanted:
            raise ValueError(f"data.shards {self.cfg.data.shards}: holds {src.schema!r} samples; model.kind "
                             f"{self.cfg.model.kind!r} trains on {wanted!r} shards")
        held_out = self.cfg.validation.shards
        if held_out is not None and open_source(held_out).schema != wanted:
            raise ValueError(f"validation.shards {held_out}: holds {open_source(held_out).schema!r} samples; the "
                             f"held-out accuracy of model.kind {self.cfg.model.kind!r} reads {wanted!r} shards")
        if self._extra_fields():  # the first pair, before any model loads; every batch is checked again
            from mmalign.data.collate import collate_pairs
            from mmalign.data.dataset import PairDataset

            first = next(iter(PairDataset(self.cfg.data.shards, decode_images=False, ties="keep", rank=0,
                                          world_size=1, extra_fields=self._extra_fields())), None)
            if first is not None:
                pair_dim_labels(collate_pairs([first]), self.cfg.model.latent.dims)

    def build(self, device) -> Built:
        from mmalign.rewards.clip import load_clip_scorer, set_trainable

        m = self.cfg.model
        if m.kind == "latent":
            return self._build_latent(device)
        if m.kind == "step_aware":
            return self._build_step_aware(device)
        if m.kind == "music":
            return self._build_music(device)
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

    def _build_latent(self, device) -> Built:
        """A fresh `LatentRewardModel` (seeded with run.seed) and the generator's frozen VAE (None: pixel space),
        passed to the loss as `Built.model`."""
        from mmalign.rewards.latent import build_latent_reward, load_generator_vae

        m, lc = self.cfg.model, self.cfg.model.latent
        module = build_latent_reward(lc.generator, dims=lc.dims, width=lc.width, name=m.name, seed=self.cfg.run.seed)
        vae = load_generator_vae(lc.generator)
        if vae is not None:
            vae.to(device)
        module.to(device).train()
        return Built(module=module, params=[p for p in module.parameters() if p.requires_grad], model=vae)

    def _build_music(self, device) -> Built:
        """A fresh `MusicRewardModel` of `model.music` (seeded with run.seed), or the exported music folder
        `model.pretrained` trained further (its architecture must be `model.music`'s)."""
        from mmalign.rewards.music import MusicRewardModel

        m = self.cfg.model
        config = m.music.model_copy(update={"name": m.name})
        if m.pretrained is not None:
            module = MusicRewardModel.from_pretrained(m.pretrained)
            if module.config.model_copy(update={"name": m.name}) != config:
                raise ValueError(f"model.pretrained {m.pretrained}: a music reward model with {module.config}; "
                                 f"model.music asks for {m.music}: set model.music to the folder's")
            module.config = config
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.run.seed)
                module = MusicRewardModel(config)
        module.to(device).train()
        return Built(module=module, params=list(module.parameters()))

    def _build_step_aware(self, device) -> Built:
        """A `StepAwareScorer` on `model.pretrained` (time MLP seeded with run.seed, last layer zero; or a step-aware
        folder, trained further) and the generator's frozen `OneStepDenoiser`, passed to the loss as `Built.model`
        and kept for validation."""
        from mmalign.rewards.clip import read_scorer_card, set_trainable
        from mmalign.rewards.step_aware import OneStepDenoiser, StepAwareScorer

        m, sa = self.cfg.model, self.cfg.model.step_aware
        source = _tiny_clip(self.cfg.run.output_dir, self.cfg.run.seed) if m.pretrained == "tiny" else m.pretrained
        card = read_scorer_card(source) if Path(source).is_dir() else None
        if card is not None and card.get("kind") == "step_aware":
            module = StepAwareScorer.from_pretrained(source)
            if (module.time_dim, module.hidden_dim) != (sa.time_dim, sa.hidden_dim):
                raise ValueError(f"model.pretrained {source}: a step-aware model with time_dim {module.time_dim}, "
                                 f"hidden_dim {module.hidden_dim}; model.step_aware asks for {sa.time_dim}, "
                                 f"{sa.hidden_dim}: set them to the folder's")
            module.name = m.name
        else:
            module = StepAwareScorer.from_clip(source, name=m.name, time_dim=sa.time_dim, hidden_dim=sa.hidden_dim,
                                               seed=self.cfg.run.seed, generator=sa.generator)
        set_trainable(module.clip, m.unfreeze_vision_blocks, m.unfreeze_text_blocks, m.train_logit_scale)
        module.time_mlp.requires_grad_(True)
        self.denoiser = OneStepDenoiser.from_pretrained(sa.generator, guidance_scale=sa.guidance_scale,
                                                        negative_prompt=sa.negative_prompt).to(device)
        module.to(device).train()
        return Built(module=module, params=[p for p in module.parameters() if p.requires_grad], model=self.denoiser)

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.data.collate import collate_pairs, collate_video_pairs
        from mmalign.data.dataset import PairDataset, VideoPairDataset
        from mmalign.train.data import endless_batches

        d = self.cfg.data
        common = dict(shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1), seed=self.cfg.run.seed,
                      rank=rank, world_size=world_size, strict=d.strict)
        if self._is_video():
            dataset, collate = VideoPairDataset(d.shards, frames=d.frames, **common), collate_video_pairs
        elif self.cfg.model.kind == "music":
            from mmalign.data.collate import collate_music_pairs
            from mmalign.data.dataset import MusicPairDataset

            dataset, collate = MusicPairDataset(d.shards, **common), collate_music_pairs
        else:
            dataset = PairDataset(d.shards, transforms={"resolution": d.resolution, "crop": "center"}, ties=d.ties,
                                  extra_fields=self._extra_fields(), **common)
            collate = collate_pairs
        counts = None
        if self.cfg.method.prompt_weight == "shards" and self.cfg.model.kind not in ("video", "music"):
            counts = shard_prompt_counts(d.shards, d.ties)
        for batch in endless_batches(dataset, collate, self.cfg.train.batch_size, skip=skip,
                                     num_workers=d.num_workers, what=f"data.shards {d.shards}"):
            if counts is not None:
                batch["num_example_per_prompt"] = torch.tensor([float(counts[c]) for c in batch["captions"]])
            yield batch

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch, generator):
        gather = cfg.method.gather and world_size() > 1
        if cfg.model.kind == "video":
            from mmalign.rewards.video import video_pair_loss

            return video_pair_loss(module, batch, k=cfg.method.btt_k, gather=gather)
        if cfg.model.kind == "latent":
            return latent_pair_loss(module, unwrapped, model, batch, cfg.model.latent, cfg.method, generator, gather)
        if cfg.model.kind == "music":
            return music_pair_loss(module, unwrapped, batch, cfg.method, gather)
        if cfg.model.kind == "step_aware":
            return step_aware_pair_loss(module, model, batch, cfg.model.step_aware, cfg.method, generator, gather)
        return image_pair_loss(module, batch, cfg.method.loss, cfg.method.btt_k, cfg.method.prompt_weight, gather)

    def after_optimizer_step(self, unwrapped) -> None:
        import math

        if self.cfg.model.kind in ("latent", "music"):
            return  # no logit scale
        clip = unwrapped.clip if self.cfg.model.kind in ("video", "step_aware") else unwrapped.model
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

    @property
    def validation_every(self) -> int:
        return self.cfg.validation.every if self.cfg.validation.shards else 0

    def validate(self, unwrapped, run_dir: Path, step: int, logger) -> dict[str, str]:
        """kind music with validation.shards: `music_pair_accuracy` on the held-out music pairs; kind step_aware:
        `step_aware_accuracy` on the held-out pairs; logged at `step`
        (`BucketAccuracy.metrics`, prefix `eval`) and written to `RUN/eval/step-<step>.json`."""
        v = self.cfg.validation
        if not v.shards:
            return {}
        from mmalign.config import atomic_write_text

        if self.cfg.model.kind == "music":
            from mmalign.rewards.music import music_pair_accuracy

            result = music_pair_accuracy(unwrapped, v.shards, max_pairs=v.max_pairs, batch_size=v.batch_size)
            metrics = {"eval/accuracy": result["accuracy"]}
            if len(result["per_dim"]) > 1:
                metrics.update({f"eval/{d}/accuracy": a for d, a in result["per_dim"].items()})
            logger.log(step, metrics)
            path = Path(run_dir) / "eval" / f"step-{step:06d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"step": step, "shards": v.shards, **result}, indent=1))
            return {"eval": str(path)}
        from mmalign.rewards.step_aware import step_aware_accuracy

        result = step_aware_accuracy(unwrapped, self.denoiser, v.shards, v.buckets, resolution=self.cfg.data.resolution,
                                     max_pairs=v.max_pairs, batch_size=v.batch_size, seed=v.seed)
        metrics = result.metrics("eval")
        logger.log(step, metrics)
        path = Path(run_dir) / "eval" / f"step-{step:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"step": step, "shards": v.shards, "edges": result.edges,
                                            "accuracy": result.accuracy, "num_pairs": result.num_pairs,
                                            "num_ties": result.num_ties}, indent=1))
        return {"eval": str(path)}

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
