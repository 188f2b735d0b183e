"""Video reward model with three dimensions, in the manner of VideoAlign / VideoReward (Liu et al. 2025):
VQ (visual quality), MQ (motion quality), TA (text alignment).

    frames (B, T, 3, S, S) --CLIP image tower per frame--> (B, T, D) --temporal--> (B, D) video embedding v
    VQ = head_VQ(v),  MQ = head_MQ(v),  TA = head_TA([v, t, v * t])   with t the CLIP text embedding

`temporal` is a masked mean over frames, or a small pre-norm transformer over the frames (with learned frame
positions) followed by the masked mean. Only TA sees the text. Heads are 2-layer MLPs giving one raw score each.

Normalisation: per-dimension `mean` / `std` (buffers saved with the model, set by `calibrate` on the training
videos) give z-scores `z_d = (r_d - mean_d) / std_d`; `Overall = sum_d w_d z_d` with user weights (default 1 each).
The scorer reports `(N, 4)`: z_VQ, z_MQ, z_TA, Overall.

Frames come from `mmalign.data.read_frames(path_or_bytes, fps, max_frames, max_pixels)` (decord or PyAV, uniform
sampling) and go through the center-crop preprocessing of the CLIP tower (tensor path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.config import StrictModel
from mmalign.rewards.base import Scorer, ScorerError, as_prompt_list, fingerprint_folder, unique_prompts
from mmalign.rewards.preprocess import ImagePreprocess

HEADS_FILE = "video_reward.safetensors"
DIMENSIONS = ("VQ", "MQ", "TA")


class VideoRewardConfig(StrictModel):
    """Architecture and frame sampling of a video reward model."""

    temporal: Literal["mean", "transformer"] = "transformer"
    """How frame embeddings become one video embedding: masked mean, or a transformer then the masked mean."""
    temporal_layers: int = 1
    temporal_heads: int = 2
    head_hidden: int = 64
    """Width of the hidden layer of each dimension's MLP head."""
    fps: float | None = 2.0
    """Frames per second sampled from a video (VideoAlign samples at 2 fps); None: every frame."""
    max_frames: int = 8
    """At most this many frames per video (evenly spread); also the number of learned frame positions."""
    max_pixels: int | None = None
    """Downscale decoded frames to at most this many pixels before preprocessing (None: keep)."""
    overall_weights: dict[str, float] = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}
    """Weights of the z-normalised dimensions in Overall."""
    name: str = "video"


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, 1))


def frames_to_batch(videos: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (T_i, H, W, 3) videos (same H, W) -> float (B, T, 3, H, W) in [0, 1] padded with zeros, and the
    frame mask (B, T) (True = a real frame)."""
    if not videos:
        raise ScorerError("no videos to batch")
    sizes = {tuple(v.shape[1:]) for v in videos}
    if len(sizes) != 1:
        raise ScorerError(f"videos of one batch must share the frame size, got {sorted(sizes)}; set max_pixels or "
                          "resize when decoding")
    if any(v.shape[0] == 0 for v in videos):
        raise ScorerError("a video decoded to zero frames")
    t = max(v.shape[0] for v in videos)
    h, w, _ = videos[0].shape[1:]
    out = torch.zeros((len(videos), t, 3, h, w), dtype=torch.float32)
    mask = torch.zeros((len(videos), t), dtype=torch.bool)
    for i, v in enumerate(videos):
        out[i, : v.shape[0]] = v.permute(0, 3, 1, 2).float() / 255.0
        mask[i, : v.shape[0]] = True
    return out, mask


class VideoRewardModel(nn.Module):
    """CLIP image/text towers + temporal module + heads VQ, MQ, TA; see the module docstring."""

    def __init__(self, clip, tokenizer, preprocess: ImagePreprocess, config: VideoRewardConfig):
        super().__init__()
        self.clip, self.tokenizer, self.preprocess, self.config = clip, tokenizer, preprocess, config
        d = clip.config.projection_dim
        self.frame_pos = nn.Parameter(torch.zeros(config.max_frames, d))
        self.temporal = None
        if config.temporal == "transformer":
            layer = nn.TransformerEncoderLayer(d, config.temporal_heads, 4 * d, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.temporal = nn.TransformerEncoder(layer, config.temporal_layers, enable_nested_tensor=False)
        self.heads = nn.ModuleDict({"VQ": _mlp(d, config.head_hidden), "MQ": _mlp(d, config.head_hidden),
                                    "TA": _mlp(3 * d, config.head_hidden)})
        self.register_buffer("dim_mean", torch.zeros(len(DIMENSIONS)))
        self.register_buffer("dim_std", torch.ones(len(DIMENSIONS)))

    @property
    def device(self) -> torch.device:
        return self.frame_pos.device

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Float frames (B, T, 3, H, W) in [0, 1] + mask (B, T) -> video embeddings (B, D)."""
        b, t = frames.shape[:2]
        if t > self.config.max_frames:
            raise ScorerError(f"{t} frames per video, the model takes at most max_frames={self.config.max_frames}")
        pixels = self.preprocess.from_tensor(frames.flatten(0, 1).to(self.device))
        feats = self.clip.get_image_features(pixel_values=pixels.to(self.frame_pos.dtype)).pooler_output
        feats = F.normalize(feats, dim=-1).view(b, t, -1)
        mask = mask.to(self.device)
        if self.temporal is not None:
            feats = self.temporal(feats + self.frame_pos[:t], src_key_padding_mask=~mask)
        weights = mask.to(feats.dtype).unsqueeze(-1)
        return (feats * weights).sum(1) / weights.sum(1).clamp(min=1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding=True, truncation=True,
                             max_length=self.clip.config.text_config.max_position_embeddings, return_tensors="pt")
        feats = self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                            attention_mask=tok["attention_mask"].to(self.device)).pooler_output
        return F.normalize(feats, dim=-1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw scores (B, 3) in `DIMENSIONS` order; text embeddings once per distinct prompt."""
        v = self.encode_video(frames, mask)
        distinct, index = unique_prompts(prompts)
        t = self.encode_text(distinct)[index.to(self.device)]
        return torch.cat([self.heads["VQ"](v), self.heads["MQ"](v), self.heads["TA"](torch.cat([v, t, v * t], -1))],
                         dim=-1)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.dim_mean) / self.dim_std

    def overall(self, z: torch.Tensor, weights: dict[str, float] | None = None) -> torch.Tensor:
        """Sum over dimensions of weight * z-score; unknown names in `weights` are an error."""
        weights = self.config.overall_weights if weights is None else weights
        unknown = set(weights) - set(DIMENSIONS)
        if unknown:
            raise ScorerError(f"overall weights name unknown dimensions {sorted(unknown)}; valid: {DIMENSIONS}")
        w = torch.tensor([float(weights.get(d, 0.0)) for d in DIMENSIONS], dtype=z.dtype, device=z.device)
        return (z * w).sum(-1)

    @torch.no_grad()
    def calibrate(self, raw: torch.Tensor) -> None:
        """Set the per-dimension mean / std from raw scores (N, 3) of reference videos (e.g. the training set)."""
        if raw.ndim != 2 or raw.shape[1] != len(DIMENSIONS) or raw.shape[0] < 2:
            raise ScorerError(f"calibrate needs raw scores (N >= 2, {len(DIMENSIONS)}), got {tuple(raw.shape)}")
        self.dim_mean.copy_(raw.mean(0))
        self.dim_std.copy_(raw.std(0).clamp(min=1e-6))

    # -- export / load ---------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """A folder `VideoScorer.from_pretrained` / `load_scorer(folder)` loads: `clip/` (transformers CLIPModel,
        tokenizer), the temporal module, heads and normalisation in safetensors, and `mmalign_scorer.json`."""
        from safetensors.torch import save_file

        from mmalign.rewards.clip import write_scorer_card

        out = Path(out_dir)
        self.clip.save_pretrained(out / "clip", safe_serialization=True)
        self.tokenizer.save_pretrained(out / "clip")
        own = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("clip.")}
        save_file(own, str(out / HEADS_FILE))
        write_scorer_card(out, {"kind": "video", "name": self.config.name, "config": self.config.model_dump(),
                                "preprocess": self.preprocess.to_dict(), "dims": list(DIMENSIONS)})
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "VideoRewardModel":
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPModel

        from mmalign.rewards.clip import read_scorer_card

        card = read_scorer_card(folder)
        if card is None or card.get("kind") != "video":
            raise ScorerError(f"{folder}: not a video reward model folder (mmalign_scorer.json of kind 'video')")
        model = cls(CLIPModel.from_pretrained(os.path.join(folder, "clip")),
                    AutoTokenizer.from_pretrained(os.path.join(folder, "clip")),
                    ImagePreprocess(**card["preprocess"]), VideoRewardConfig.model_validate(card["config"]))
        state = load_file(os.path.join(folder, HEADS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("clip.")]
        if missing or unexpected:
            raise ScorerError(f"{folder}/{HEADS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()

    @classmethod
    def from_clip(cls, clip_source: str, config: VideoRewardConfig | dict | None = None) -> "VideoRewardModel":
        """A new model on a CLIP folder / hub id (heads randomly initialised, normalisation identity)."""
        from transformers import AutoTokenizer, CLIPModel

        from mmalign.rewards.clip import _resolve

        config = VideoRewardConfig.model_validate(config or {})
        proc = _resolve(clip_source, "preprocessor_config.json", required=False)
        preprocess = ImagePreprocess.from_processor_config(json.loads(Path(proc).read_text()) if proc else {})
        return cls(CLIPModel.from_pretrained(clip_source), AutoTokenizer.from_pretrained(clip_source), preprocess,
                   config)


def video_pair_loss(model: VideoRewardModel, batch: dict[str, Any], k: float = 5.0, gather: bool = False
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry-with-ties loss per dimension on a `collate_video_pairs` batch with decoded frames.

    labels[d] is P(A preferred): 1 -> label 1, 0 -> -1, 0.5 (same) -> tie 0. Loss = mean over the three dimensions
    of `btt_loss(r_A[:, d], r_B[:, d], label_d, k)`; metrics `rewards/{d}/accuracy`, `rewards/{d}/loss` and
    `rewards/accuracy` (the mean over dimensions). With `gather`, rewards and labels of every process are gathered
    first (`mmalign.train.distributed.gather_cat`): the loss is over the global batch.
    """
    from mmalign.losses import btt_loss

    if "frames_a" not in batch:
        raise ScorerError("video reward training needs decoded frames: read video_pair shards with "
                          "VideoPairDataset(frames=FrameSampling(...))")
    frames, mask = frames_to_batch(list(batch["frames_a"]) + list(batch["frames_b"]))
    prompts = list(batch["prompts"])
    raw = model(frames, mask, prompts + prompts)
    b = len(prompts)
    r_a, r_b = raw[:b], raw[b:]
    labels = {dim: batch["labels"][dim].to(raw.device) for dim in DIMENSIONS}
    if gather:
        from mmalign.train.distributed import gather_cat

        r_a, r_b = gather_cat(r_a), gather_cat(r_b)
        labels = {dim: gather_cat(v) for dim, v in labels.items()}
    losses, metrics = [], {}
    for j, dim in enumerate(DIMENSIONS):
        label = labels[dim] * 2 - 1  # 1 -> 1, 0 -> -1, 0.5 -> 0
        loss, m = btt_loss(r_a[:, j], r_b[:, j], label, k=k)
        losses.append(loss)
        metrics[f"rewards/{dim}/loss"] = loss.detach()
        metrics[f"rewards/{dim}/accuracy"] = m["accuracy"]
    total = torch.stack(losses).mean()
    metrics["rewards/accuracy"] = torch.stack([metrics[f"rewards/{d}/accuracy"] for d in DIMENSIONS]).mean()
    return total, metrics


class VideoScorer(Scorer):
    """A `VideoRewardModel` behind the scorer interface: `score(videos, prompts) -> (N, 4)` (z_VQ, z_MQ, z_TA,
    Overall).

    videos: a list of mp4 bytes or paths (decoded with `read_frames` and the model's sampling), a list of uint8
    (T, H, W, 3) tensors, or a float tensor (N, T, 3, H, W) in [0, 1] (differentiable; all frames real).
    """

    modality = "video"

    def __init__(self, model: VideoRewardModel, version: str = "unversioned"):
        super().__init__()
        self.model = model.eval()
        self.name = model.config.name
        self.dims = (*DIMENSIONS, "Overall")
        self.version = version

    @property
    def frame_sampling(self) -> dict[str, Any]:
        c = self.model.config
        return {"fps": c.fps, "max_frames": c.max_frames, "max_pixels": c.max_pixels}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "VideoScorer":
        model = VideoRewardModel.from_pretrained(folder)
        return cls(model, version=f"{model.config.name}-{fingerprint_folder(folder)}")

    def decode(self, video: Any) -> torch.Tensor:
        from mmalign.data.video import read_frames

        if isinstance(video, (bytes, bytearray, str, os.PathLike)):
            return read_frames(video, **self.frame_sampling)
        if isinstance(video, torch.Tensor) and video.dtype == torch.uint8 and video.ndim == 4:
            return video[: self.model.config.max_frames]
        raise ScorerError(f"a video must be mp4 bytes, a path, or a uint8 (T, H, W, 3) tensor, got "
                          f"{type(video).__name__}")

    def score(self, videos: Any, prompts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(videos, torch.Tensor) and videos.is_floating_point():
            if videos.ndim != 5 or videos.shape[2] != 3:
                raise ScorerError(f"float videos must be (N, T, 3, H, W) in [0, 1], got {tuple(videos.shape)}")
            frames = videos
            mask = torch.ones(videos.shape[:2], dtype=torch.bool)
        else:
            decoded = [self.decode(v) for v in videos]
            frames, mask = frames_to_batch(decoded)
        prompts = as_prompt_list(prompts, frames.shape[0])
        z = self.model.normalize(self.model(frames, mask, prompts))
        return torch.cat([z, self.model.overall(z).unsqueeze(-1)], dim=-1).float()
