"""The scorer interface shared by every reward model.

    scores = scorer.score(images, prompts)      # (N,) float32, or (N, D) when scorer.dims names D dimensions

`images` is one of
- a list of PIL images (any size, any mode; converted to RGB),
- a uint8 array or tensor (N, H, W, 3), or a list of (H, W, 3) uint8 arrays,
- a float tensor (N, 3, H, W) with values in [0, 1]: the differentiable path (reward guidance, training); the
  scorer's preprocessing is done with torch ops, so gradients reach the pixels.
`prompts` is a list of N strings, or one string for all images.

Video scorers (`modality = "video"`) take videos instead; audio scorers (`modality = "audio"`) take waveforms and
their rate, `score(audio, prompts, sample_rate=...)` (`mmalign.rewards.audio`).

`score` does not switch off autograd: wrap inference in `torch.inference_mode()` (the batch scorer does).
A scorer is an `nn.Module`; `.to(device, dtype)` moves it and inputs follow its device and dtype; scores come
back as float32 on the scorer's device.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

# Values beyond this slack around [0, 1] mean another convention ([-1, 1] or [0, 255]), not an overshoot.
_RANGE_SLACK = 0.5


class ScorerError(ValueError):
    """A scorer cannot be built or called as asked; the message names the argument and what would be valid."""


def check_scorer_name(name: Any, where: str = "scorer") -> str:
    """Return `name` if it can name the scorer's output sub-folder: one plain path component (no `/` or `\\`, not
    `.` / `..`, not absolute, no drive letter or control characters, at most 200 characters). A name read from a
    model's files must never become a path outside the folder it is written under. `where` names the source (the
    scorer card file)."""
    problem = None
    if not isinstance(name, str) or not name.strip():
        problem = "must be a non-empty string"
    elif len(name) > 200:
        problem = "is longer than 200 characters"
    elif "/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name) \
            or (os.name == "nt" and ":" in name):
        problem = "is a path, not a plain name (it would write outside the output folder)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name) or name != name.strip():
        problem = "holds control characters or surrounding spaces"
    if problem is not None:
        raise ScorerError(f"{where}: scorer name {name!r} {problem}; a scorer name is one plain folder name "
                          "(letters, digits, '_', '-', '.')")
    return name


def as_prompt_list(prompts: str | Sequence[str], n: int, what: str = "image") -> list[str]:
    """One prompt per input (`what`: "image", "video", "clip"): a list of n strings, or one string for all."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ScorerError(f"got {n} {what}s but {len(prompts)} prompts; pass one prompt per {what} or one string")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ScorerError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return prompts


def split_images(images: Any) -> tuple[str, Any]:
    """("tensor", float (N,3,H,W)) for the differentiable path, else ("pil", list of RGB PIL images)."""
    from PIL import Image

    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ScorerError(f"float image tensors must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        with torch.no_grad():
            lo, hi = images.min().item(), images.max().item()
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ScorerError(f"float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]; convert [-1, 1] "
                              "images with (x + 1) / 2 and uint8 ones with x / 255 (or pass them as uint8)")
        return "tensor", images
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ScorerError(f"image arrays must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}; float "
                              "images go in as torch tensors (N, 3, H, W) in [0, 1]")
        return "pil", [Image.fromarray(a) for a in images]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append(im if im.mode == "RGB" else im.convert("RGB"))
        else:
            arr = np.asarray(im)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
                raise ScorerError(f"images[{i}]: expected a PIL image or a uint8 (H, W, 3) array, got "
                                  f"{type(im).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}")
            out.append(Image.fromarray(arr))
    return "pil", out


def unique_prompts(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts in first-seen order and, for every prompt, the index of its distinct entry."""
    index: dict[str, int] = {}
    for p in prompts:
        index.setdefault(p, len(index))
    return list(index), torch.tensor([index[p] for p in prompts], dtype=torch.long)


def fingerprint_files(paths: Sequence[str | os.PathLike]) -> str:
    """A short sha256 over the names and contents of files (weights, configs): the scorer's version."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def fingerprint_folder(folder: str | os.PathLike) -> str:
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise ScorerError(f"{folder}: no files to load a scorer from")
    return fingerprint_files(files)


class Scorer(nn.Module):
    """Base class: subclasses set `name`, `version`, `dims` and implement `_score(kind, images, prompts)`.

    `dims` is None for a scalar reward ((N,) scores) or the names of the D columns of (N, D) scores.
    `version` identifies the weights (a fingerprint of the files they came from) so stored scores of different
    models never mix.
    """

    name: str = "scorer"
    dims: tuple[str, ...] | None = None
    modality: str = "image"  # what `score` takes: "image", "video" or "audio" (`mmalign.rewards.audio`)
    differentiable: bool = False  # score is differentiable in a float image tensor (gradient guidance can use it)

    def __init__(self) -> None:
        super().__init__()
        self.version = "unversioned"
        # Keeps `.device` / `.dtype` right for scorers without parameters (toy, user functions).
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        """Where the scorer's parameters are (a scorer built around a model already on the GPU is there too);
        a scorer without parameters: where it was moved with `.to()`."""
        for p in self.parameters():
            return p.device
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return self._anchor.dtype

    def score(self, images: Any, prompts: str | Sequence[str]) -> torch.Tensor:
        """(N,) float32 rewards, or (N, D) when `dims` is set; see the module docstring for the inputs."""
        kind, batch = split_images(images)
        n = batch.shape[0] if kind == "tensor" else len(batch)
        prompts = as_prompt_list(prompts, n)
        if n == 0:
            shape = (0,) if self.dims is None else (0, len(self.dims))
            return torch.zeros(shape, device=self.device)
        out = self._score(kind, batch, prompts).float()
        expected = (n,) if self.dims is None else (n, len(self.dims))
        if tuple(out.shape) != expected:
            raise ScorerError(f"scorer {self.name!r} returned shape {tuple(out.shape)}, expected {expected}")
        return out

    def _score(self, kind: str, images: Any, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What identifies stored scores: name, version and dimension names."""
        return {"name": self.name, "version": self.version, "dims": list(self.dims) if self.dims else None}
