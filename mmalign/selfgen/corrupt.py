"""Image corruptions for STIC's dispreferred answers, applied for real and recorded.

Each corruption draws its parameters from a seeded generator, applies them with PIL (the same operations
torchvision's PIL path performs: `Resize`, `ColorJitter`'s brightness and hue), and returns the corrupted image with
a record of what was done. A corruption that leaves every pixel unchanged (a hue shift of a grey image, a resize
of a flat one) is redrawn, and after `max_tries` raises `CorruptionNoOpError`: the caller skips and counts the
image instead of silently storing an uncorrupted one as "corrupted".

Specs on the command line: `resize:shorter_side=20`, `jitter:brightness=0.5,hue=0.3` (optionally `hue_min=0.1`:
the smallest hue shift drawn, to make sure the colour category moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CORRUPTIONS = ("resize", "jitter")
_DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "resize": {"shorter_side": 20},
    "jitter": {"brightness": 0.5, "hue": 0.3, "hue_min": 0.0},
}


class CorruptionNoOpError(ValueError):
    """The corruption left the image's pixels unchanged after every retry."""


@dataclass(frozen=True)
class Corruption:
    """One corruption kind with its parameter ranges (see the module docstring)."""

    name: str
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {self.name!r}; valid: {', '.join(CORRUPTIONS)}")
        unknown = set(self.params) - set(_DEFAULT_PARAMS[self.name])
        if unknown:
            raise ValueError(f"corruption {self.name!r}: unknown parameter(s) {sorted(unknown)}; valid: "
                             f"{sorted(_DEFAULT_PARAMS[self.name])}")
        p = self.resolved()
        if self.name == "resize" and p["shorter_side"] < 1:
            raise ValueError(f"resize: shorter_side must be >= 1 pixel, got {p['shorter_side']}")
        if self.name == "jitter":
            if not 0 <= p["brightness"] < 1 or not 0 <= p["hue_min"] <= p["hue"] <= 0.5:
                raise ValueError(f"jitter: need 0 <= brightness < 1 and 0 <= hue_min <= hue <= 0.5, got {p}")
            if p["brightness"] == 0 and p["hue"] == 0:
                raise ValueError("jitter: brightness and hue are both 0; the image would never change")

    def resolved(self) -> dict[str, float]:
        return {**_DEFAULT_PARAMS[self.name], **self.params}

    @classmethod
    def parse(cls, spec: str) -> "Corruption":
        """`"jitter:brightness=0.5,hue=0.3"` or `"resize"` (defaults) -> Corruption."""
        name, _, rest = spec.partition(":")
        params: dict[str, float] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            try:
                params[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"corruption spec {spec!r}: {item!r} is not key=number") from None
            if not eq:
                raise ValueError(f"corruption spec {spec!r}: {item!r} is not key=number")
        return cls(name.strip(), params)

    def describe(self) -> str:
        p = self.resolved()
        return f"{self.name}:" + ",".join(f"{k}={v:g}" for k, v in p.items())


DEFAULT_CORRUPTIONS = (Corruption("resize"), Corruption("jitter"))


def _shift_hue(image, shift: float):
    from PIL import Image

    h, s, v = image.convert("HSV").split()
    np_h = (np.asarray(h, dtype=np.int16) + int(round(shift * 255))) % 256
    return Image.merge("HSV", (Image.fromarray(np_h.astype(np.uint8), "L"), s, v)).convert("RGB")


def _apply(image, corruption: Corruption, rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    from PIL import Image, ImageEnhance

    p = corruption.resolved()
    if corruption.name == "resize":
        w, h = image.size
        short = int(p["shorter_side"])
        size = (short, max(1, round(h * short / w))) if w <= h else (max(1, round(w * short / h)), short)
        return image.resize(size, Image.BILINEAR), {"name": "resize", "size": list(size)}
    brightness = float(rng.uniform(max(0.0, 1 - p["brightness"]), 1 + p["brightness"])) if p["brightness"] else 1.0
    hue = 0.0
    if p["hue"]:
        hue = float(rng.uniform(p["hue_min"], p["hue"])) * (1 if rng.random() < 0.5 else -1)
    out = ImageEnhance.Brightness(image).enhance(brightness) if brightness != 1.0 else image.copy()
    if hue:
        out = _shift_hue(out, hue)
    return out, {"name": "jitter", "brightness": round(brightness, 6), "hue": round(hue, 6)}


def pixels_changed(original, corrupted) -> bool:
    """Whether `corrupted` differs from `original` in any pixel, compared at the original size (a resized image
    is scaled back first, as the model's processor would)."""
    from PIL import Image

    if corrupted.size != original.size:
        corrupted = corrupted.resize(original.size, Image.BILINEAR)
    return not np.array_equal(np.asarray(original.convert("RGB")), np.asarray(corrupted.convert("RGB")))


def corrupt_image(image, corruption: Corruption, rng: np.random.Generator, max_tries: int = 10):
    """(corrupted image, record) with the drawn parameters in `record`; raises `CorruptionNoOpError` when no draw
    changes a pixel."""
    image = image.convert("RGB")
    for _ in range(max_tries):
        out, record = _apply(image, corruption, rng)
        if pixels_changed(image, out):
            return out, record
    raise CorruptionNoOpError(f"corruption {corruption.describe()} left every pixel unchanged in {max_tries} "
                              "tries (e.g. a hue shift of a grey image)")
