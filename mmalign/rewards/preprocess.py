"""Image preprocessing of CLIP-style scorers, for PIL images and (differentiably) for float tensors in [0, 1].

Two modes:

- `center_crop` (CLIP, PickScore, the aesthetic predictor; transformers' `CLIPImageProcessor`): resize so the
  shortest side is `resize_to` (the long side becomes `int(resize_to * long / short)`), bicubic; crop the centre
  `size` x `size` (top = (h - size) // 2, left = (w - size) // 2).
- `letterbox` (HPSv2's `ResizeMaxSize`): resize so the longest side is `size` (each side `round(side * scale)`),
  bicubic; pad to `size` x `size` with black, `pad // 2` before and the rest after. HPSv2 skips the padding when
  the longest side is already `size` (a non-square input then fails inside the ViT); we always pad.

Then `(x - mean) / std` per channel.

- center_crop: PIL images are resized by PIL (bicubic, as `CLIPImageProcessor` does) and quantised to uint8 before
  normalising; tensors are resized with `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` (PIL's
  kernel) and clamped to [0, 1], so the two paths agree to about one uint8 step.
- letterbox: both paths do what HPSv2's `preprocess_val` does (`ToTensor()`, then torchvision's `F.resize` of the
  float tensor, i.e. `interpolate(bicubic, align_corners=False, antialias=True)` with no clamp and no uint8 step,
  then the padding): PIL images are converted to float32 `/ 255` first, so the PIL and tensor paths are the same
  computation and equal HPSv2's to float rounding (tested to 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_MODES = ("center_crop", "letterbox")


@dataclass(frozen=True)
class ImagePreprocess:
    """`mode`: center_crop or letterbox; `size`: output side; `resize_to`: shortest side before the crop
    (center_crop; defaults to `size`)."""

    mode: Literal["center_crop", "letterbox"] = "center_crop"
    size: int = 224
    resize_to: int | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess mode must be one of {PREPROCESS_MODES}, got {self.mode!r}")
        if self.size < 1 or (self.resize_to is not None and self.resize_to < self.size):
            raise ValueError(f"need size >= 1 and resize_to >= size, got size={self.size}, "
                             f"resize_to={self.resize_to}")

    # -- geometry shared by both paths ---------------------------------------------------------------------
    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.mode == "center_crop":
            target = self.resize_to or self.size
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = target, int(target * long / short)
            return (new_short, new_long) if h <= w else (new_long, new_short)
        scale = self.size / float(max(h, w))
        return round(h * scale), round(w * scale)

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        """center_crop: (top, left) of the crop; letterbox: (top, bottom, left, right) padding."""
        if self.mode == "center_crop":
            return (h - self.size) // 2, (w - self.size) // 2, 0, 0
        ph, pw = self.size - h, self.size - w
        return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    # -- the two paths -----------------------------------------------------------------------------------------
    def from_pil(self, images: list) -> torch.Tensor:
        """RGB PIL images -> normalised float32 (N, 3, size, size)."""
        from PIL import Image

        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.float32)
        if self.mode == "letterbox":  # HPSv2: ToTensor, then the float resize (no uint8 step)
            for i, im in enumerate(images):
                x = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
                out[i] = self.from_tensor(x.to(torch.float32).div(255)[None])[0]
            return out
        for i, im in enumerate(images):
            w, h = im.size
            nh, nw = self.resized_hw(h, w)
            if (nh, nw) != (h, w):
                im = im.resize((nw, nh), resample=Image.Resampling.BICUBIC)
            arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            if self.mode == "center_crop":
                top, left, _, _ = self._window(nh, nw)
                out[i] = arr[:, top:top + self.size, left:left + self.size]
            else:
                top, _, left, _ = self._window(nh, nw)
                out[i].zero_()
                out[i, :, top:top + nh, left:left + nw] = arr
        return self._normalize(out)

    def from_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Float (N, 3, H, W) in [0, 1] -> normalised (N, 3, size, size); differentiable."""
        h, w = images.shape[-2:]
        nh, nw = self.resized_hw(h, w)
        x = images
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            if self.mode == "center_crop":  # as the uint8 PIL path; HPSv2 (letterbox) does not clamp
                x = x.clamp(0, 1)
        if self.mode == "center_crop":
            top, left, _, _ = self._window(nh, nw)
            x = x[:, :, top:top + self.size, left:left + self.size]
        else:
            top, bottom, left, right = self._window(nh, nw)
            x = F.pad(x, (left, right, top, bottom), value=0.0)
        return self._normalize(x)

    def __call__(self, kind: str, images, device=None, dtype=None) -> torch.Tensor:
        x = self.from_tensor(images) if kind == "tensor" else self.from_pil(images)
        return x.to(device=device, dtype=dtype)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "size": self.size, "resize_to": self.resize_to, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_processor_config(cls, config: dict, mode: Literal["center_crop", "letterbox"] = "center_crop"):
        """From a transformers `preprocessor_config.json` (CLIPImageProcessor keys)."""
        crop = config.get("crop_size", 224)
        size = crop if isinstance(crop, int) else int(crop.get("height", crop.get("shortest_edge", 224)))
        resize = config.get("size", size)
        resize_to = resize if isinstance(resize, int) else int(resize.get("shortest_edge", resize.get("height", size)))
        if config.get("resample", 3) != 3:
            raise ValueError(f"preprocessor config asks for resample={config.get('resample')}; the scorer "
                             "preprocessing is bicubic (3) only")
        return cls(mode=mode, size=size, resize_to=max(resize_to, size) if mode == "center_crop" else None,
                   mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(config.get("image_std", OPENAI_CLIP_STD)))
