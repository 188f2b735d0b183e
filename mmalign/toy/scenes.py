"""Toy text-to-image world: 32x32 scenes with one hard-edged shape and a caption that describes it exactly.

Contract (fixed; other parts of mmalign and independent checks rely on it):

- image: (32, 32, 3) uint8, background exactly `BACKGROUND` = (24, 24, 24);
- one shape in `SHAPES`, rasterised with integer maths (no anti-aliasing), filled with exactly one colour of
  `PALETTE`; every shape's bounding box is exactly `size` x `size` pixels, `size` in 8..14;
- the box spans columns `cx - size // 2 .. cx - size // 2 + size - 1` (rows likewise with `cy`): odd sizes are
  centred on pixel `cx`, even sizes half a pixel left of it (and above `cy`);
- `cx` lies in the band of the position (`POSITION_BANDS`: left 6-11, center 13-18, right 21-26), `cy` in 9..22,
  and the shape lies entirely inside the frame. Because a 14-pixel shape cannot be centred on column 6 or 26 (nor a
  13-pixel one on 26) inside a 32-pixel frame, those three (size, cx) combinations are not allowed; the sampler
  draws the size first and then `cx` uniformly among the allowed columns of the band (`allowed_cx`);
- caption: ``a {color} {shape} on the {position}``;
- everything is deterministic from a seed (`numpy.random.default_rng`).
"""

from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

import numpy as np

IMAGE_SIZE = 32
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 40, 40),
        "green": (40, 200, 60),
        "blue": (50, 80, 230),
        "yellow": (230, 210, 40),
    }
)
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
# Inclusive ranges of the shape centre column for each caption position word.
POSITION_BANDS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"left": (6, 11), "center": (13, 18), "right": (21, 26)}
)
SIZE_RANGE = (8, 14)  # inclusive, pixels across (bounding-box width and height)
CY_RANGE = (9, 22)  # inclusive
CAPTION_TEMPLATE = "a {color} {shape} on the {position}"



def as_rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    """A `numpy.random.Generator`: returned as is, or `default_rng(seed)` for an integer seed."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(
        f"expected a numpy.random.Generator or an integer seed, got {type(rng_or_seed).__name__}"
    )


@functools.lru_cache(maxsize=None)
def _shape_mask_cached(shape: str, size: int) -> np.ndarray:
    u = np.arange(size)[None, :]  # column inside the box
    v = np.arange(size)[:, None]  # row inside the box
    # Doubled coordinates keep pixel centres (u + 1/2) integral: 2u + 1 - size is twice the signed offset of the
    # pixel centre from the box centre.
    du = 2 * u + 1 - size
    dv = 2 * v + 1 - size
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        # Pixel centre inside the disc of diameter `size` inscribed in the box.
        mask = du * du + dv * dv <= size * size
    elif shape == "triangle":
        # Isosceles, apex up, base on the bottom row spanning the full width. Doubled half-width grows linearly
        # from `a` on the top row (1 or 2 centre pixels) to size - 1 on the bottom row.
        a = 1 - size % 2
        mask = np.abs(du) * (size - 1) <= a * (size - 1) + (size - 1 - a) * v
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    mask.flags.writeable = False
    return mask


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` in its bounding box; every row and column of the box is touched.

    circle: pixel centres inside the inscribed disc, ``(2u+1-s)^2 + (2v+1-s)^2 <= s^2``;
    square: the whole box;
    triangle: apex up, ``|2u+1-s| * (s-1) <= a*(s-1) + (s-1-a)*v`` with ``a = 1 - s % 2`` (base = bottom row).
    The result is read-only (cached).
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return _shape_mask_cached(shape, int(size))


def allowed_cx(position: str, size: int) -> range:
    """Centre columns allowed for `position` and `size`: the band, cut to where the box stays inside the frame."""
    if position not in POSITION_BANDS:
        raise ValueError(f"unknown position {position!r}; valid positions: {', '.join(POSITIONS)}")
    lo, hi = POSITION_BANDS[position]
    # Box columns cx - size//2 .. cx - size//2 + size - 1 must lie in 0 .. IMAGE_SIZE - 1.
    lo = max(lo, size // 2)
    hi = min(hi, IMAGE_SIZE - size + size // 2)
    return range(lo, hi + 1)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One toy scene. `cx`, `cy`: centre pixel (column, row); `size`: bounding-box side in pixels."""

    color: str
    shape: str
    position: str
    size: int
    cx: int
    cy: int

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"Scene.color={self.color!r}; valid colours: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"Scene.shape={self.shape!r}; valid shapes: {', '.join(SHAPES)}")
        if self.position not in POSITIONS:
            raise ValueError(f"Scene.position={self.position!r}; valid positions: {', '.join(POSITIONS)}")
        if not SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]:
            raise ValueError(f"Scene.size={self.size}; valid sizes: {SIZE_RANGE[0]}..{SIZE_RANGE[1]}")
        if not CY_RANGE[0] <= self.cy <= CY_RANGE[1]:
            raise ValueError(f"Scene.cy={self.cy}; valid rows: {CY_RANGE[0]}..{CY_RANGE[1]}")
        cols = allowed_cx(self.position, self.size)
        if self.cx not in cols:
            raise ValueError(
                f"Scene.cx={self.cx} with position={self.position!r} and size={self.size}; "
                f"valid columns: {cols.start}..{cols.stop - 1} (the position band, kept inside the frame)"
            )

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(color=self.color, shape=self.shape, position=self.position)

    @property
    def box(self) -> tuple[int, int]:
        """(x0, y0): the top-left pixel of the size x size bounding box."""
        return self.cx - self.size // 2, self.cy - self.size // 2

    def mask(self) -> np.ndarray:
        """Boolean (32, 32) foreground mask."""
        x0, y0 = self.box
        out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        out[y0 : y0 + self.size, x0 : x0 + self.size] = shape_mask(self.shape, self.size)
        return out

    def render(self) -> np.ndarray:
        """(32, 32, 3) uint8 image: `BACKGROUND` everywhere, `PALETTE[color]` on the shape."""
        image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        image[self.mask()] = PALETTE[self.color]
        return image


def parse_caption(caption: str) -> tuple[str, str, str]:
    """``"a red circle on the left"`` -> ``("red", "circle", "left")``.

    Words are split on whitespace (so surrounding or repeated spaces are tolerated); anything else outside the
    grammar ``a {color} {shape} on the {position}`` raises ValueError.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    words = caption.split()
    if (
        len(words) == 6
        and words[0] == "a"
        and words[1] in PALETTE
        and words[2] in SHAPES
        and words[3:5] == ["on", "the"]
        and words[5] in POSITIONS
    ):
        return words[1], words[2], words[5]
    raise ValueError(
        f"caption {caption!r} is outside the toy grammar {CAPTION_TEMPLATE!r} with color in {COLORS}, "
        f"shape in {SHAPES}, position in {POSITIONS}"
    )


def sample_scene(rng_or_seed: np.random.Generator | int, caption: str | None = None) -> Scene:
    """A random scene; with `caption`, one that the caption describes (only size and centre are drawn).

    Draw order (part of the determinism contract): color, shape, position (each uniform, skipped when `caption`
    is given), size (uniform 8..14), cx (uniform over `allowed_cx(position, size)`), cy (uniform 9..22).
    """
    rng = as_rng(rng_or_seed)
    if caption is None:
        color = COLORS[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
    else:
        color, shape, position = parse_caption(caption)
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    cols = allowed_cx(position, size)
    cx = int(cols[rng.integers(len(cols))])
    cy = int(rng.integers(CY_RANGE[0], CY_RANGE[1] + 1))
    return Scene(color=color, shape=shape, position=position, size=size, cx=cx, cy=cy)


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """`n` scenes drawn one after another from `default_rng(seed)`."""
    rng = as_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def noisy_caption(scene: Scene, rng: np.random.Generator | int, p_true: float = 0.6) -> str:
    """The scene's caption naming the true colour with probability `p_true`, else a uniformly drawn other colour.

    Models a noisy web caption: shape and position are always right. Exactly two draws are consumed per call
    (one uniform, one integer), whatever the outcome, so streams stay aligned across `p_true` values.
    """
    if not 0.0 <= p_true <= 1.0:
        raise ValueError(f"p_true must be in [0, 1], got {p_true}")
    rng = as_rng(rng)
    keep = rng.random() < p_true
    others = [c for c in COLORS if c != scene.color]
    other = others[rng.integers(len(others))]
    color = scene.color if keep else other
    return CAPTION_TEMPLATE.format(color=color, shape=scene.shape, position=scene.position)


def all_prompts() -> list[str]:
    """The 36 captions of the grammar, colour-major in `PALETTE` x `SHAPES` x `POSITIONS` order."""
    return [
        CAPTION_TEMPLATE.format(color=c, shape=s, position=p) for c in COLORS for s in SHAPES for p in POSITIONS
    ]


def prompt_seed_pairs(split: Literal["train", "heldout", "val"], n: int) -> list[tuple[str, int]]:
    """`n` deterministic (prompt, seed) pairs of a split: pair i is ``(all_prompts()[i % 36], seed_i)``.

    seed_i is ``2*i`` for "train" and ``2*i + 1`` for "heldout" (the two splits of the quickstart and the benches),
    and ``2**32 - 1 - i`` for "val" (the split settings are chosen on, counted down from the top of the 32-bit
    seed range), so no two splits share a (prompt, seed) pair (nor a seed, for fewer
    than 2**31 pairs) and all three cycle through the 36 prompts evenly. The seed is meant for the sampler's noise
    and for ``sample_scene(seed, caption=prompt)`` when a reference scene is wanted.
    """
    if split not in ("train", "heldout", "val"):
        raise ValueError(f"split must be 'train', 'heldout' or 'val', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    prompts = all_prompts()
    if split == "val":
        return [(prompts[i % len(prompts)], 2**32 - 1 - i) for i in range(n)]
    k = 0 if split == "train" else 1
    return [(prompts[i % len(prompts)], 2 * i + k) for i in range(n)]


def save_scene_grid(
    images: np.ndarray | Sequence[np.ndarray], path: str, ncol: int = 8, scale: int = 4, pad: int = 1
) -> None:
    """Write a contact sheet PNG of (N, H, W, 3) uint8 images, `ncol` per row, each enlarged `scale`x with
    nearest-neighbour upscaling and separated by `pad` (pre-scale) pixels of mid grey."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if ncol < 1 or scale < 1 or pad < 0:
        raise ValueError(f"need ncol >= 1, scale >= 1, pad >= 0; got ncol={ncol}, scale={scale}, pad={pad}")
    n, h, w, _ = images.shape
    nrow = max(1, -(-n // ncol))
    sheet = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y : y + h, x : x + w] = image
    sheet = sheet.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(sheet).save(path)
