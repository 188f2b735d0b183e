"""Image transforms shared by the images of one sample: resize, flip, crop, to a [-1, 1] tensor.

A winner and its loser (or the K images of a ranked sample) get the *same* transform: the first image fixes the
geometry (its size is the sample's `original_size`, SDXL's micro-conditioning), every image is resized to the
size the first one is resized to, then all get the same flip and the same crop. The steps and the coordinates
follow diffusers' SDXL training scripts: resize so the image covers the target, flip, crop; `crop_top_left` is
`(top, left)` in the resized (and flipped) image.

Randomness comes from a generator seeded by `(seed, epoch, sample key)`, so a sample gets the same crop and flip
whichever worker or rank reads it, and a resumed run repeats them exactly.

Video clips (`video_to_tensor`, the flow task's video pairs) take the first frames, resize the shorter side and crop
the centre, on float frames (torch's antialiased bilinear `interpolate`), with no randomness.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

from mmalign.config import StrictModel


class ImageTransforms(StrictModel):
    """How images become `pixel_values`. Defaults are the precise ones; `jpeg_draft` is an opt-in speed-up."""

    resolution: int | tuple[int, int] = 512
    """Target size: an int for a square, or (height, width)."""
    crop: Literal["center", "random"] = "center"
    """Center crop (evaluation, most T2I fine-tuning) or random crop (augmentation)."""
    random_flip: bool = False
    """Flip horizontally with probability 0.5 (same flip for all images of a sample)."""
    interpolation: Literal["bilinear", "bicubic", "lanczos"] = "bilinear"
    """PIL resampling filter for the resize (PIL filters antialias when downscaling)."""
    jpeg_draft: bool = False
    """Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below the target size) before the resize:
    several times faster for big images, not bit-identical to a full decode."""

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator for one sample's random transforms (string seeds hash with SHA-512: stable across processes)."""
    return random.Random(f"{seed}:{epoch}:{key}")


def transform_images(images: list, cfg: ImageTransforms, rng: random.Random):
    """Apply one transform to all `images` (PIL, possibly not yet decoded).

    Returns `(pixels (N,H,W,3) uint8 tensor, original_size (h, w) of images[0], crop_top_left (top, left),
    flipped)`. Samples stay uint8 (4x less memory to move between processes); the collators turn them into
    float `pixel_values` in one pass (`to_pixel_values`).
    """
    import numpy as np
    import torch
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "lanczos": Image.Resampling.LANCZOS}[cfg.interpolation]
    th, tw = cfg.size
    w0, h0 = images[0].size
    scale = max(th / h0, tw / w0)
    nw, nh = max(tw, round(w0 * scale)), max(th, round(h0 * scale))
    flip = cfg.random_flip and rng.random() < 0.5
    if cfg.crop == "center":
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    else:
        top, left = rng.randint(0, nh - th), rng.randint(0, nw - tw)
    out = np.empty((len(images), th, tw, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if cfg.jpeg_draft and im.format == "JPEG":
            im.draft("RGB", (nw, nh))  # picks the largest reduction that keeps the image >= (nw, nh)
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (nw, nh):
            im = im.resize((nw, nh), resample=resample)
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(im.crop((left, top, left + tw, top + th)))
    return torch.from_numpy(out), (h0, w0), (top, left), flip


def to_pixel_values(pixels: "torch.Tensor", out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1] (x / 127.5 - 1), written into `out` if given
    (else on the device of `pixels`)."""
    import torch

    chw = pixels.movedim(-1, -3)
    if out is None:
        out = torch.empty(chw.shape, dtype=torch.float32, device=pixels.device)
    out.copy_(chw)
    return out.div_(127.5).sub_(1.0)


def video_to_tensor(frames, num_frames: int, resolution: int) -> "torch.Tensor":
    """A clip's uint8 frames (T, H, W, 3) (tensor or array, T >= num_frames) -> float32 (3, num_frames, resolution,
    resolution) in [-1, 1] (x / 127.5 - 1; Wan's (C, F, H, W) layout): the first `num_frames` frames, the shorter
    side resized to `resolution` (bilinear, antialiased, on the float frames), then centre-cropped."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames[:num_frames]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[:, :, top:top + resolution, left:left + resolution].permute(1, 0, 2, 3).contiguous()
