"""The toy world's ground-truth rewards as scorers (`mmalign.toy.rewards`), and user functions (`module:function`).

| name | score |
|---|---|
| `toy_color`, `toy_shape`, `toy_position`, `toy_total` | the exact NumPy rewards on uint8 images (float tensors are quantised) |
| `toy_color_soft` | `color_adherence_torch`: differentiable, for guidance |
| `toy_brightness` | mean luma `0.299 R + 0.587 G + 0.114 B` of the image in [0, 1]: differentiable, a second reward that pulls against colour adherence (brighter backgrounds become foreground) |
| `toy` | (N, 4) with dims color, shape, position, total |
| `toy_video` | the video toy world's ground truth (`mmalign.toy.video_rewards`), (N, 3): VQ, MQ, TA, on clips |
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any, Callable

import numpy as np
import torch

from mmalign.rewards.base import Scorer, ScorerError


def _source_version(prefix: str, *objects: Any) -> str:
    h = hashlib.sha256()
    for obj in objects:
        try:
            h.update(inspect.getsource(obj).encode())
        except (OSError, TypeError):
            h.update(repr(obj).encode())
    return f"{prefix}-{h.hexdigest()[:16]}"


def _uint8(kind: str, images) -> np.ndarray:
    from mmalign.toy.rewards import to_uint8_images

    if kind == "tensor":
        return to_uint8_images(images, value_range=(0.0, 1.0))
    return np.stack([np.asarray(im) for im in images])


class ToyScorer(Scorer):
    """A toy-world ground-truth reward; see the module table."""

    COMPONENTS = ("color", "shape", "position", "total")

    def __init__(self, component: str):
        super().__init__()
        valid = (*self.COMPONENTS, "color_soft", "brightness", "all")
        if component not in valid:
            raise ScorerError(f"toy reward must be one of {valid}, got {component!r}")
        from mmalign.toy import rewards as r

        self.component = component
        self.name = "toy" if component == "all" else f"toy_{component}"
        self.dims = self.COMPONENTS if component == "all" else None
        self.version = _source_version("toy", r)
        self.differentiable = component in ("color_soft", "brightness")

    def _score(self, kind, images, prompts):
        from mmalign.toy import rewards as r

        if self.component in ("color_soft", "brightness"):
            x = images if kind == "tensor" else torch.from_numpy(_uint8(kind, images)).permute(0, 3, 1, 2) / 255.0
            x = x.to(self.device, torch.float32)
            if self.component == "brightness":
                luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                return (x * luma).sum(1).mean((1, 2))
            return r.color_adherence_torch(x, prompts)
        arr = _uint8(kind, images)
        if self.component == "all":
            parts = r.reward_components(arr, prompts)
            values = np.stack([parts["color"], parts["shape"], parts["position"], r.total_reward(arr, prompts)], 1)
        else:
            fn = {"color": r.color_adherence, "shape": r.shape_adherence, "position": r.position_adherence,
                  "total": r.total_reward}[self.component]
            values = fn(arr, prompts)
        return torch.as_tensor(np.asarray(values), dtype=torch.float32, device=self.device)


class ToyVideoScorer(Scorer):
    """The video toy world's ground-truth rewards VQ, MQ, TA (`mmalign.toy.video_rewards`): `score(videos,
    prompts) -> (N, 3)`.

    videos: a float tensor (N, T, 3, H, W) in [0, 1] (what `WanPipeline(output_type="pt")` returns; quantised to
    uint8 as a saved clip would be) or uint8 clips (N, T, H, W, 3) / a list of (T, H, W, 3). Not differentiable.
    """

    modality = "video"

    def __init__(self):
        super().__init__()
        from mmalign.toy import video_rewards as r

        self.name = "toy_video"
        self.dims = r.VIDEO_DIMENSIONS
        self.version = _source_version("toy_video", r)
        self.differentiable = False

    def score(self, videos: Any, prompts) -> torch.Tensor:
        from mmalign.rewards.base import as_prompt_list
        from mmalign.toy import video_rewards as r

        if isinstance(videos, torch.Tensor) and videos.is_floating_point():
            if videos.ndim != 5 or videos.shape[2] != 3:
                raise ScorerError(f"float videos must be (N, T, 3, H, W) in [0, 1], got {tuple(videos.shape)}")
            clips = r.to_uint8_clips(videos.detach().permute(0, 1, 3, 4, 2))
        else:
            clips = np.stack([np.asarray(v) for v in videos])
            if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
                raise ScorerError(f"videos must be a float (N, T, 3, H, W) tensor in [0, 1] or uint8 (N, T, H, W, 3) "
                                  f"clips, got {clips.dtype} {clips.shape}")
        prompts = as_prompt_list(prompts, clips.shape[0])
        try:
            parts = r.video_rewards(clips, prompts)
        except (TypeError, ValueError) as err:
            raise ScorerError(f"toy_video: {err}") from None
        values = np.stack([np.asarray(parts[d], dtype=np.float32) for d in self.dims], 1)
        return torch.as_tensor(values, dtype=torch.float32, device=self.device)


class FunctionScorer(Scorer):
    """A user function `fn(images, prompts) -> (N,) or (N, D)` (tensor, array or list) as a scorer.

    `images` reach the function as given to `score` after the common checks: a list of RGB PIL images, or the
    float (N, 3, H, W) tensor in [0, 1]. Set `fn.dims = ("a", "b")` for a multi-dimension reward, and
    `fn.differentiable = True` when its output is differentiable in the tensor (gradient guidance may use it).
    A video reward sets `fn.modality = "video"`: it gets the videos as given (float (N, T, 3, H, W) in [0, 1] from
    the samplers), unchecked.

    An audio reward (an audio-quality scorer, say) sets `fn.modality = "audio"`: the scorer is then called
    `score(audio, prompts, sample_rate=...)` like CLAP, and the function `fn(clips, prompts, sample_rate)` with the
    clips as a list of mono float32 NumPy arrays (samples,) (`mmalign.rewards.audio.split_audio`: channels
    averaged, empty or non-finite clips refused) and their rate in Hz. With `fn.sample_rate = R` the clips are
    resampled to R Hz first (`mmalign.rewards.audio.resample`) and the function gets `sample_rate=R`.
    """

    def __init__(self, fn: Callable, name: str):
        super().__init__()
        self.fn = fn
        self.name = name
        dims = getattr(fn, "dims", None)
        self.dims = tuple(dims) if dims else None
        self.version = _source_version("fn", fn)
        self.differentiable = bool(getattr(fn, "differentiable", False))
        self.modality = getattr(fn, "modality", "image")
        if self.modality not in ("image", "video", "audio"):
            raise ScorerError(f"user scorer {name!r}: modality must be 'image', 'video' or 'audio', got "
                              f"{self.modality!r}")
        self.sample_rate = getattr(fn, "sample_rate", None)
        if self.sample_rate is not None:
            from mmalign.rewards.audio import check_sample_rate

            if self.modality != "audio":
                raise ScorerError(f"user scorer {name!r}: fn.sample_rate is for audio scorers (fn.modality = "
                                  f"'audio'), this one is {self.modality!r}")
            self.sample_rate = check_sample_rate(self.sample_rate, f"user scorer {name!r}: fn.sample_rate")

    def score(self, images, prompts, *, sample_rate=None) -> torch.Tensor:
        if self.modality == "audio":
            return self._score_audio(images, prompts, sample_rate)
        if sample_rate is not None:
            raise ScorerError(f"scorer {self.name!r} scores {self.modality}s; sample_rate is for audio scorers")
        if self.modality == "image":
            return super().score(images, prompts)
        from mmalign.rewards.base import as_prompt_list

        n = len(images)
        out = self._score("video", images, as_prompt_list(prompts, n, what="video")).float()
        expected = (n,) if self.dims is None else (n, len(self.dims))
        if tuple(out.shape) != expected:
            raise ScorerError(f"scorer {self.name!r} returned shape {tuple(out.shape)}, expected {expected}")
        return out

    def _score_audio(self, audio, prompts, sample_rate) -> torch.Tensor:
        from mmalign.rewards.audio import check_sample_rate, resample, split_audio
        from mmalign.rewards.base import as_prompt_list

        if sample_rate is None:
            raise ScorerError(f"scorer {self.name!r}: sample_rate is required (the rate, in Hz, of the audio given)")
        rate = check_sample_rate(sample_rate)
        clips = split_audio(audio)
        prompts = as_prompt_list(prompts, len(clips), what="clip")
        if self.sample_rate is not None and self.sample_rate != rate:
            clips = [resample(c, rate, self.sample_rate).astype(np.float32) for c in clips]
            rate = self.sample_rate
        out = self.fn(clips, prompts, rate)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out, dtype=np.float32))
        out = out.to(self.device).float()
        expected = (len(clips),) if self.dims is None else (len(clips), len(self.dims))
        if tuple(out.shape) != expected:
            raise ScorerError(f"scorer {self.name!r} returned shape {tuple(out.shape)}, expected {expected}")
        return out

    def _score(self, kind, images, prompts):
        out = self.fn(images, prompts)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out, dtype=np.float32))
        return out.to(self.device)


def load_function(spec: str) -> FunctionScorer:
    """`package.module:function` -> FunctionScorer (the module is imported: only name code you trust)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ScorerError(f"user scorer {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ScorerError(f"user scorer {spec!r}: cannot import {module_name!r}: {err}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ScorerError(f"user scorer {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ScorerError(f"user scorer {spec!r}: {attr!r} is not callable")
    return FunctionScorer(fn, name=spec)
