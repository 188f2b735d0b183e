"""Toy text-to-video world: 9-frame 32x32 clips of one hard-edged shape moving at a constant speed.

Contract (fixed; the video rewards, the toy video model and independent checks rely on it):

- clip: (9, 32, 32, 3) uint8 frames (T, H, W, C); 9 = 4k + 1 frames, the lengths Wan's video VAE accepts, so a
  latent-space variant stays possible. Background exactly `BACKGROUND` = (24, 24, 24) of the image toy;
- one shape of the image toy (`SHAPES`, filled with one colour of `PALETTE`, rasterised by `shape_mask`, bounding
  box `size` x `size`, `size` in 8..12), the same in every frame;
- motion: the box's top-left corner in frame k is ``start + floor(k * speed + 1/2) * u`` with `u` the unit step of
  the direction (left (-1, 0), right (1, 0), up (0, -1), down (0, 1), in (column, row) pixels; still (0, 0)) and
  `speed` in [1.5, 2.5] pixels per frame (0 for still). The box lies entirely inside the frame in every frame;
- caption: ``a {color} {shape} moving {direction}``, direction in `DIRECTIONS` (``... moving still`` for a still
  shape, so that every caption has the same five words);
- everything is deterministic from a seed (`numpy.random.default_rng`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

import numpy as np

from mmalign.models.tiny import TOY_WORDS
from mmalign.toy.scenes import BACKGROUND, COLORS, IMAGE_SIZE, PALETTE, SHAPES, as_rng, shape_mask

NUM_FRAMES = 9
CLIP_SIZE_RANGE = (8, 12)  # inclusive, pixels across (bounding-box width and height)
SPEED_RANGE = (1.5, 2.5)  # pixels per frame, drawn uniformly for moving clips
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Unit step of each direction in (column, row) pixels: rows grow downwards, as in the image arrays.
DIRECTION_STEPS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
)
VIDEO_CAPTION_TEMPLATE = "a {color} {shape} moving {direction}"
# Vocabulary of the toy video model's tokenizer: the image toy's words plus those of the video captions.
VIDEO_WORDS: tuple[str, ...] = TOY_WORDS + tuple(
    w for w in ("moving", "up", "down", "still") if w not in TOY_WORDS
)
CAPTION_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "direction")


def displacement(k: int | np.ndarray, speed: float) -> int | np.ndarray:
    """Pixels travelled by frame k: ``floor(k * speed + 1/2)`` (rounding halves up, never to even)."""
    d = np.floor(np.asarray(k) * speed + 0.5).astype(np.int64)
    return int(d) if d.ndim == 0 else d


def start_range(direction: str, size: int, speed: float) -> tuple[range, range]:
    """(columns, rows) allowed for the top-left corner in frame 0, so the box stays inside all 9 frames."""
    if direction not in DIRECTION_STEPS:
        raise ValueError(f"unknown direction {direction!r}; valid directions: {', '.join(DIRECTIONS)}")
    last = IMAGE_SIZE - size  # largest top-left coordinate that keeps the box inside
    travel = displacement(NUM_FRAMES - 1, speed)
    out = []
    for step in DIRECTION_STEPS[direction]:
        lo, hi = (travel, last) if step < 0 else (0, last - travel) if step > 0 else (0, last)
        out.append(range(lo, hi + 1))
    return out[0], out[1]


@dataclasses.dataclass(frozen=True)
class Clip:
    """One toy clip. `x`, `y`: top-left pixel (column, row) of the box in frame 0; `speed` in pixels per frame."""

    color: str
    shape: str
    direction: str
    size: int
    x: int
    y: int
    speed: float

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"Clip.color={self.color!r}; valid colours: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"Clip.shape={self.shape!r}; valid shapes: {', '.join(SHAPES)}")
        if self.direction not in DIRECTION_STEPS:
            raise ValueError(f"Clip.direction={self.direction!r}; valid directions: {', '.join(DIRECTIONS)}")
        if not CLIP_SIZE_RANGE[0] <= self.size <= CLIP_SIZE_RANGE[1]:
            raise ValueError(f"Clip.size={self.size}; valid sizes: {CLIP_SIZE_RANGE[0]}..{CLIP_SIZE_RANGE[1]}")
        if self.direction == "still":
            if self.speed != 0:
                raise ValueError(f"Clip.speed={self.speed} for a still clip; a still clip has speed 0")
        elif not SPEED_RANGE[0] <= self.speed <= SPEED_RANGE[1]:
            raise ValueError(f"Clip.speed={self.speed}; valid speeds: {SPEED_RANGE[0]}..{SPEED_RANGE[1]} px/frame")
        cols, rows = start_range(self.direction, self.size, self.speed)
        if self.x not in cols or self.y not in rows:
            raise ValueError(
                f"Clip start (x={self.x}, y={self.y}) leaves the frame for direction={self.direction!r}, "
                f"size={self.size}, speed={self.speed}; valid x: {cols.start}..{cols.stop - 1}, "
                f"y: {rows.start}..{rows.stop - 1}"
            )

    @property
    def caption(self) -> str:
        return VIDEO_CAPTION_TEMPLATE.format(color=self.color, shape=self.shape, direction=self.direction)

    def boxes(self) -> np.ndarray:
        """(9, 2) int array: top-left (column, row) of the box in each frame."""
        d = displacement(np.arange(NUM_FRAMES), self.speed)
        ux, uy = DIRECTION_STEPS[self.direction]
        return np.stack([self.x + ux * d, self.y + uy * d], axis=1)

    def masks(self) -> np.ndarray:
        """Boolean (9, 32, 32) foreground masks."""
        out = np.zeros((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        mask = shape_mask(self.shape, self.size)
        for k, (x0, y0) in enumerate(self.boxes()):
            out[k, y0 : y0 + self.size, x0 : x0 + self.size] = mask
        return out

    def render(self) -> np.ndarray:
        """(9, 32, 32, 3) uint8 frames: `BACKGROUND` everywhere, `PALETTE[color]` on the shape."""
        frames = np.empty((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        frames[:] = BACKGROUND
        frames[self.masks()] = PALETTE[self.color]
        return frames


def parse_video_caption(caption: str) -> tuple[str, str, str]:
    """``"a red circle moving left"`` -> ``("red", "circle", "left")``; anything outside the grammar raises
    ValueError (words are split on whitespace)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    words = caption.split()
    if (
        len(words) == 5
        and words[0] == "a"
        and words[1] in PALETTE
        and words[2] in SHAPES
        and words[3] == "moving"
        and words[4] in DIRECTION_STEPS
    ):
        return words[1], words[2], words[4]
    raise ValueError(
        f"caption {caption!r} is outside the toy video grammar {VIDEO_CAPTION_TEMPLATE!r} with color in {COLORS}, "
        f"shape in {SHAPES}, direction in {DIRECTIONS}"
    )


def sample_clip(rng_or_seed: np.random.Generator | int, caption: str | None = None) -> Clip:
    """A random clip; with `caption`, one that the caption describes (only size, speed and start are drawn).

    Draw order (part of the determinism contract): color, shape, direction (each uniform, skipped when `caption`
    is given), size (uniform 8..12), speed (uniform [1.5, 2.5), drawn for still clips too and then set to 0),
    x (uniform over the allowed columns), y (uniform over the allowed rows; `start_range`).
    """
    rng = as_rng(rng_or_seed)
    if caption is None:
        color = COLORS[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    else:
        color, shape, direction = parse_video_caption(caption)
    size = int(rng.integers(CLIP_SIZE_RANGE[0], CLIP_SIZE_RANGE[1] + 1))
    speed = float(rng.uniform(*SPEED_RANGE))
    if direction == "still":
        speed = 0.0
    cols, rows = start_range(direction, size, speed)
    x = int(cols[rng.integers(len(cols))])
    y = int(rows[rng.integers(len(rows))])
    return Clip(color=color, shape=shape, direction=direction, size=size, x=x, y=y, speed=speed)


def sample_clips(n: int, seed: int) -> list[Clip]:
    """`n` clips drawn one after another from `default_rng(seed)`."""
    rng = as_rng(seed)
    return [sample_clip(rng) for _ in range(n)]


def render_clips(clips: Sequence[Clip]) -> np.ndarray:
    """(N, 9, 32, 32, 3) uint8 frames of `clips`."""
    if not clips:
        return np.zeros((0, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.stack([c.render() for c in clips])


def noisy_video_caption(
    clip: Clip,
    rng: np.random.Generator | int,
    p_wrong: float = 0.4,
    attribute: Literal["color", "shape", "direction"] = "color",
) -> str:
    """The clip's caption with `attribute` replaced, with probability `p_wrong`, by a uniformly drawn other value.

    Models a noisy web caption for pretraining an imperfect base; the other attributes are always right. Colour is
    the default because a tiny video model learns colour first and most reliably (shared TOY-NOTES), so colour
    adherence is the attribute alignment can measurably move. Exactly two draws are consumed per call (one
    uniform, one integer), whatever the outcome, so streams stay aligned across `p_wrong` values.
    """
    if not 0.0 <= p_wrong <= 1.0:
        raise ValueError(f"p_wrong must be in [0, 1], got {p_wrong}")
    if attribute not in CAPTION_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {CAPTION_ATTRIBUTES}, got {attribute!r}")
    rng = as_rng(rng)
    wrong = rng.random() < p_wrong
    values = {"color": COLORS, "shape": SHAPES, "direction": DIRECTIONS}[attribute]
    true = getattr(clip, attribute)
    others = [v for v in values if v != true]
    other = others[rng.integers(len(others))]
    words = {"color": clip.color, "shape": clip.shape, "direction": clip.direction}
    words[attribute] = other if wrong else true
    return VIDEO_CAPTION_TEMPLATE.format(**words)


def all_video_prompts() -> list[str]:
    """The 60 captions of the grammar, colour-major in `PALETTE` x `SHAPES` x `DIRECTIONS` order."""
    return [
        VIDEO_CAPTION_TEMPLATE.format(color=c, shape=s, direction=d)
        for c in COLORS
        for s in SHAPES
        for d in DIRECTIONS
    ]


def video_prompt_seed_pairs(split: Literal["train", "heldout", "val"], n: int) -> list[tuple[str, int]]:
    """`n` deterministic (prompt, seed) pairs of a split: pair i is ``(all_video_prompts()[i % 60], seed_i)``.

    seed_i is ``2*i`` for "train" and ``2*i + 1`` for "heldout", and ``2**32 - 1 - i`` for "val" (the split settings
    are chosen on, as the image world's `prompt_seed_pairs`): the splits never share a seed (for fewer than 2**31
    pairs), and all three cycle through all 60 prompts evenly. The seed is meant for the sampler's noise and for
    ``sample_clip(seed, caption=prompt)`` when a reference clip is wanted.
    """
    if split not in ("train", "heldout", "val"):
        raise ValueError(f"split must be 'train', 'heldout' or 'val', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    prompts = all_video_prompts()
    if split == "val":
        return [(prompts[i % len(prompts)], 2**32 - 1 - i) for i in range(n)]
    k = 0 if split == "train" else 1
    return [(prompts[i % len(prompts)], 2 * i + k) for i in range(n)]


def _check_clips(clips: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    clips = np.asarray(clips)
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be (N, T, H, W, 3) uint8, got {clips.shape} {clips.dtype}")
    return clips


def _caption_band(text: str, width: int, height: int):
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(band).text((2, max(0, (height - 11) // 2)), text, fill=(0, 0, 0))
    return band


def save_clip_strip(
    clips: np.ndarray | Sequence[np.ndarray],
    path: str,
    captions: Sequence[str] | None = None,
    scale: int = 4,
    pad: int = 1,
) -> None:
    """Write a PNG with one row per clip: its T frames left to right, each enlarged `scale`x (nearest neighbour),
    separated by `pad` (pre-scale) pixels of mid grey, with the clip's caption (if given) in a band above it."""
    from PIL import Image

    clips = _check_clips(clips)
    if captions is not None and len(captions) != len(clips):
        raise ValueError(f"got {len(clips)} clips but {len(captions)} captions")
    if scale < 1 or pad < 0:
        raise ValueError(f"need scale >= 1 and pad >= 0; got scale={scale}, pad={pad}")
    n, t, h, w, _ = clips.shape
    row_w = (t * (w + pad) + pad) * scale
    band_h = 14 if captions is not None else 0
    row_h = (h + 2 * pad) * scale
    sheet = Image.new("RGB", (row_w, max(1, n) * (row_h + band_h)), (128, 128, 128))
    for i, clip in enumerate(clips):
        strip = np.full((h + 2 * pad, t * (w + pad) + pad, 3), 128, dtype=np.uint8)
        for k, frame in enumerate(clip):
            x = pad + k * (w + pad)
            strip[pad : pad + h, x : x + w] = frame
        top = i * (row_h + band_h)
        if captions is not None:
            sheet.paste(_caption_band(captions[i], row_w, band_h), (0, top))
        sheet.paste(Image.fromarray(strip.repeat(scale, 0).repeat(scale, 1)), (0, top + band_h))
    sheet.save(path)


def save_clip_gif(
    clips: np.ndarray | Sequence[np.ndarray],
    path: str,
    ncol: int = 8,
    scale: int = 4,
    pad: int = 1,
    fps: float = 4.0,
) -> None:
    """Write an animated GIF (looping) of a grid of clips, `ncol` per row, all playing in step at `fps`; frame k
    of the GIF is the contact sheet of every clip's frame k (the image toy's `save_scene_grid` layout)."""
    from PIL import Image

    clips = _check_clips(clips)
    if ncol < 1 or scale < 1 or pad < 0 or fps <= 0:
        raise ValueError(f"need ncol >= 1, scale >= 1, pad >= 0, fps > 0; got {ncol}, {scale}, {pad}, {fps}")
    n, t, h, w, _ = clips.shape
    nrow = max(1, -(-n // ncol))
    frames = []
    for k in range(t):
        sheet = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 128, dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, ncol)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y : y + h, x : x + w] = clips[i, k]
        frames.append(Image.fromarray(sheet.repeat(scale, 0).repeat(scale, 1)))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0)
