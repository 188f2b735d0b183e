"""Ground-truth rewards of the toy text-to-image world.

Image conventions:

- NumPy rewards take uint8 images, ``(32, 32, 3)`` with one caption (-> float) or ``(N, 32, 32, 3)`` with a
  sequence of N captions (-> ``(N,)`` float64 array). Float images are refused; convert model outputs with
  `to_uint8_images` first (it states the value range explicitly).
- The differentiable `color_adherence_torch` takes float ``(N, 3, H, W)`` tensors in `value_range` ((0, 1) by
  default, or (-1, 1)).

All colour distances are Euclidean in 0..255 RGB units. A pixel is *foreground* when its distance to
`BACKGROUND` is > `FOREGROUND_THRESHOLD` (60). Every reward is 0 for an image with no foreground.
"""

from __future__ import annotations

from typing import Sequence, overload

import numpy as np
import torch

from mmalign.toy.scenes import BACKGROUND, COLORS, IMAGE_SIZE, PALETTE, POSITION_BANDS, SHAPES, parse_caption

FOREGROUND_THRESHOLD = 60.0
DEFAULT_POSITION_FALLOFF = 2.0

_PALETTE_F = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)  # (4, 3)
_BACKGROUND_F = np.array(BACKGROUND, dtype=np.float64)


def _check_uint8(images: np.ndarray, name: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"{name} must be uint8 (..., 32, 32, 3) arrays, got dtype {images.dtype}; convert float model outputs "
            "with mmalign.toy.rewards.to_uint8_images(x, value_range=...)"
        )
    if images.ndim not in (3, 4) or images.shape[-3:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{name} must be (32, 32, 3) or (N, 32, 32, 3) uint8 HWC, got shape {images.shape}")
    return images


def _batch(images: np.ndarray, captions: str | Sequence[str]) -> tuple[np.ndarray, list[str], bool]:
    """(N, 32, 32, 3) images, N captions, and whether the input was a single image."""
    images = _check_uint8(images)
    single = images.ndim == 3
    if single:
        if not isinstance(captions, str):
            raise TypeError("a single (32, 32, 3) image takes one caption string")
        return images[None], [captions], True
    if isinstance(captions, str):
        raise TypeError("a batch of images (N, 32, 32, 3) takes a sequence of N captions, got one string")
    captions = list(captions)
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions")
    return images, captions, False


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def to_uint8_images(images: np.ndarray | torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float channel-first images ``(N, 3, H, W)`` (or ``(3, H, W)``) in `value_range` -> uint8 ``(N, H, W, 3)``.

    ``uint8 = round(clip((x - lo) / (hi - lo), 0, 1) * 255)``.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"to_uint8_images expects float images, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"to_uint8_images expects (N, 3, H, W) channel-first images, got shape {images.shape}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    scaled = np.clip((images.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1)


def foreground_mask(images: np.ndarray) -> np.ndarray:
    """Boolean mask (..., 32, 32): Euclidean distance of the pixel to `BACKGROUND` > 60."""
    images = _check_uint8(images).astype(np.float64)
    return np.sqrt(((images - _BACKGROUND_F) ** 2).sum(-1)) > FOREGROUND_THRESHOLD


def nearest_palette_index(images: np.ndarray) -> np.ndarray:
    """Index into `COLORS` of the palette colour nearest to each pixel (..., 32, 32); ties go to the first colour."""
    images = _check_uint8(images).astype(np.float64)
    d2 = ((images[..., None, :] - _PALETTE_F) ** 2).sum(-1)
    return d2.argmin(-1)


@overload
def color_adherence(images: np.ndarray, captions: str) -> float: ...
@overload
def color_adherence(images: np.ndarray, captions: Sequence[str]) -> np.ndarray: ...
def color_adherence(images, captions):
    """Fraction of foreground pixels whose nearest palette colour is the captioned colour.

    ``r = #{p : ||x_p - bg|| > 60 and argmin_c ||x_p - palette_c|| = captioned} / #{p : ||x_p - bg|| > 60}``,
    and r = 0 when there is no foreground pixel. uint8 (32, 32, 3) + caption -> float; (N, 32, 32, 3) + N
    captions -> (N,) array.
    """
    images, captions, single = _batch(images, captions)
    target = np.array([COLORS.index(parse_caption(c)[0]) for c in captions])
    fg = foreground_mask(images)
    hit = fg & (nearest_palette_index(images) == target[:, None, None])
    n_fg = fg.sum((1, 2))
    values = np.where(n_fg > 0, hit.sum((1, 2)) / np.maximum(n_fg, 1), 0.0)
    return _out(values, single)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of each (N, H, W) boolean mask (ties: the one holding the first pixel).

    Vectorised label propagation: every foreground pixel starts with its own index and repeatedly takes the
    minimum over its 3x3 neighbourhood until nothing changes (about one pass per pixel of component diameter).
    """
    n, h, w = mask.shape
    big = h * w + 1
    dtype = np.int16 if big < np.iinfo(np.int16).max else np.int32
    padded = np.full((n, h + 2, w + 2), big, dtype=dtype)  # the border stays `big`
    labels = padded[:, 1:-1, 1:-1]
    labels[...] = np.where(mask, np.arange(1, h * w + 1, dtype=dtype).reshape(1, h, w), big)
    while True:
        new = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(new, padded[:, dy : dy + h, dx : dx + w], out=new)
        new[~mask] = big
        if np.array_equal(new, labels):
            break
        labels[...] = new
    flat = np.where(mask, labels, 0).astype(np.int64) + (np.arange(n) * big)[:, None, None]
    counts = np.bincount(flat.ravel(), minlength=n * big).reshape(n, big)
    counts[:, 0] = 0
    best = counts.argmax(1)
    return mask & (labels == best[:, None, None])


def _bounding_boxes(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x0, x1, y0, y1) inclusive pixel bounds of each non-empty (N, H, W) mask."""
    rows, cols = mask.any(2), mask.any(1)
    y0, y1 = rows.argmax(1), mask.shape[1] - 1 - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), mask.shape[2] - 1 - cols[:, ::-1].argmax(1)
    return x0, x1, y0, y1


def shape_scores(images: np.ndarray) -> np.ndarray:
    """(..., 3) IoU of the largest 8-connected foreground component with each ideal shape, in `SHAPES` order.

    With the component's bounding box (w x h pixels, top-left x0, y0) and, for a pixel at column x and row y,
    doubled box coordinates ``X = 2(x - x0) + 1``, ``Y = 2(y - y0) + 1`` (pixel centres, integers), the templates
    are the pixels of the box with
    circle: ``(X - w)^2 h^2 + (Y - h)^2 w^2 <= w^2 h^2`` (inscribed ellipse);
    square: the whole box;
    triangle: ``2 h |X - w| <= w Y`` (apex up, base at the bottom), or one of its three rotations by 90 degrees
    (the best of the four counts).
    The template for a rendered circle or square is the shape itself (IoU 1); a rendered triangle scores >= 0.94
    against its template and every rendered shape <= 0.86 against the other two. Using the largest component keeps
    stray pixels of a generated image from inflating the box. Rows of images with no foreground are 0.
    """
    images = _check_uint8(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    comp = _largest_component(foreground_mask(batch))
    x0, x1, y0, y1 = (v[:, None, None] for v in _bounding_boxes(comp))
    w, h = x1 - x0 + 1, y1 - y0 + 1
    idx = np.arange(IMAGE_SIZE)
    xx = 2 * (idx[None, None, :] - x0) + 1
    yy = 2 * (idx[None, :, None] - y0) + 1
    inbox = (xx > 0) & (xx < 2 * w) & (yy > 0) & (yy < 2 * h)
    circle = inbox & ((xx - w) ** 2 * h**2 + (yy - h) ** 2 * w**2 <= w**2 * h**2)
    triangles = [
        np.abs(xx - w) * 2 * h <= yy * w,  # apex up
        np.abs(xx - w) * 2 * h <= (2 * h - yy) * w,  # apex down
        np.abs(yy - h) * 2 * w <= xx * h,  # apex left
        np.abs(yy - h) * 2 * w <= (2 * w - xx) * h,  # apex right
    ]

    def iou(template: np.ndarray) -> np.ndarray:
        union = (comp | template).sum((1, 2))
        return (comp & template).sum((1, 2)) / np.maximum(union, 1)

    scores = {
        "circle": iou(circle),
        "square": iou(inbox),
        "triangle": np.max([iou(inbox & t) for t in triangles], axis=0),
    }
    out = np.stack([scores[s] for s in SHAPES], axis=1)
    out[~comp.any((1, 2))] = 0.0
    return out[0] if single else out


def classify_shape(images: np.ndarray) -> str | None | list[str | None]:
    """The shape with the highest `shape_scores` IoU (first in `SHAPES` order on a tie); None with no foreground.

    One image -> str | None; a batch -> list.
    """
    scores = shape_scores(images)
    single = scores.ndim == 1
    scores = scores[None] if single else scores
    out = [None if row.max() == 0 else SHAPES[int(row.argmax())] for row in scores]
    return out[0] if single else out


@overload
def shape_adherence(images: np.ndarray, captions: str) -> float: ...
@overload
def shape_adherence(images: np.ndarray, captions: Sequence[str]) -> np.ndarray: ...
def shape_adherence(images, captions):
    """1.0 when `classify_shape` returns the captioned shape, else 0.0 (0.0 with no foreground).

    A hard score on purpose: the IoUs of `shape_scores` are not comparable across shapes as degrees of adherence
    (a perfect triangle scores 0.94-1.0 on its own template, a square 0.78 on the circle's).
    """
    images, captions, single = _batch(images, captions)
    predicted = classify_shape(images)
    values = np.array([float(p == parse_caption(c)[1]) for p, c in zip(predicted, captions)])
    return _out(values, single)


@overload
def position_adherence(images: np.ndarray, captions: str, falloff: float = ...) -> float: ...
@overload
def position_adherence(images: np.ndarray, captions: Sequence[str], falloff: float = ...) -> np.ndarray: ...
def position_adherence(images, captions, falloff=DEFAULT_POSITION_FALLOFF):
    """Soft score of the foreground centroid column against the captioned position band.

    ``mx`` = mean column index of all foreground pixels; the band of a position word with centre columns lo..hi
    (`POSITION_BANDS`) is the interval [lo - 0.5, hi + 0.5] (even-sized shapes have their centroid half a pixel
    left of `cx`); ``d`` = distance from mx to that interval (0 inside);
    ``r = max(0, 1 - d / falloff)`` (falloff 2 px: full credit inside the band, none 2 px outside it; the bands
    are 1 px apart, so a shape centred in a neighbouring band scores at most 0.5). r = 0 with no foreground.
    """
    if falloff <= 0:
        raise ValueError(f"falloff must be > 0 pixels, got {falloff}")
    images, captions, single = _batch(images, captions)
    fg = foreground_mask(images)
    n_fg = fg.sum((1, 2))
    mx = (fg.sum(1) * np.arange(IMAGE_SIZE)).sum(1) / np.maximum(n_fg, 1)
    bands = np.array([POSITION_BANDS[parse_caption(c)[2]] for c in captions], dtype=np.float64)
    lo, hi = bands[:, 0] - 0.5, bands[:, 1] + 0.5
    d = np.maximum(0.0, np.maximum(lo - mx, mx - hi))
    values = np.where(n_fg > 0, np.maximum(0.0, 1.0 - d / falloff), 0.0)
    return _out(values, single)


def reward_components(images: np.ndarray, captions: str | Sequence[str]) -> dict[str, float | np.ndarray]:
    """{"color": ..., "shape": ..., "position": ...}: the three adherence rewards (same input rules)."""
    return {
        "color": color_adherence(images, captions),
        "shape": shape_adherence(images, captions),
        "position": position_adherence(images, captions),
    }


def total_reward(
    images: np.ndarray,
    captions: str | Sequence[str],
    w_color: float = 0.5,
    w_shape: float = 0.25,
    w_position: float = 0.25,
) -> float | np.ndarray:
    """``w_color * color_adherence + w_shape * shape_adherence + w_position * position_adherence``.

    Default weights 0.5 / 0.25 / 0.25 sum to 1, so the reward lies in [0, 1]; weights are used as given (not
    renormalised) and must be >= 0.
    """
    if min(w_color, w_shape, w_position) < 0:
        raise ValueError(f"reward weights must be >= 0, got color={w_color}, shape={w_shape}, position={w_position}")
    parts = reward_components(images, captions)
    return w_color * parts["color"] + w_shape * parts["shape"] + w_position * parts["position"]


def color_adherence_torch(
    images: torch.Tensor,
    captions: Sequence[str],
    value_range: tuple[float, float] = (0.0, 1.0),
    fg_temperature: float = 5.0,
    color_temperature: float = 1000.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Differentiable colour adherence: float images (N, 3, H, W) in `value_range` -> (N,) tensor.

    With x in 0..255 units (``x = (images - lo) / (hi - lo) * 255``), per pixel p:
    ``fg_p = sigmoid((sqrt(||x_p - bg||^2 + eps) - 60) / fg_temperature)`` (soft foreground; units of 0..255),
    ``q_p = softmax_c(-||x_p - palette_c||^2 / color_temperature)[captioned]`` (soft nearest colour; units of
    squared 0..255 distance), and ``r = sum_p fg_p q_p / (sum_p fg_p + eps)``.
    As both temperatures -> 0 this equals `color_adherence` on any image whose pixels are not exactly at distance
    60 from the background or equidistant from two palette colours (e.g. every rendered scene); the tests use
    1e-3 for both. The defaults (5 and 1000) keep gradients alive on generic images while a rendered scene still
    scores > 0.99 on its own caption (the ~900 background pixels leak sigmoid(-60/5) ~ 6e-6 foreground each).
    Values may overshoot `value_range` by up to half its width (unclipped model predictions); beyond that a
    ValueError points at a wrong `value_range`.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("color_adherence_torch expects a float torch.Tensor (N, 3, H, W)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"color_adherence_torch expects (N, 3, H, W) images, got shape {tuple(images.shape)}")
    if isinstance(captions, str) or len(captions) != images.shape[0]:
        raise ValueError(f"need a sequence of {images.shape[0]} captions, one per image")
    if fg_temperature <= 0 or color_temperature <= 0:
        raise ValueError(
            f"temperatures must be > 0, got fg_temperature={fg_temperature}, color_temperature={color_temperature}"
        )
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    slack = 0.5 * (hi - lo)
    with torch.no_grad():
        vmin, vmax = images.min().item(), images.max().item()
    if vmin < lo - slack or vmax > hi + slack:
        raise ValueError(
            f"image values span [{vmin:.3g}, {vmax:.3g}], far outside value_range={value_range}; "
            "pass value_range=(0, 1) or (-1, 1) to match the images"
        )
    x = (images - lo) * (255.0 / (hi - lo))  # (N, 3, H, W) in 0..255
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    palette = torch.tensor(_PALETTE_F, dtype=x.dtype, device=x.device)  # (C, 3)
    dist_bg = torch.sqrt(((x - bg) ** 2).sum(1) + eps)  # (N, H, W)
    fg = torch.sigmoid((dist_bg - FOREGROUND_THRESHOLD) / fg_temperature)
    d2 = ((x.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # (N, C, H, W)
    probs = torch.softmax(-d2 / color_temperature, dim=1)
    target = torch.tensor([COLORS.index(parse_caption(c)[0]) for c in captions], device=x.device)
    q = probs.gather(1, target.view(-1, 1, 1, 1).expand(-1, 1, *probs.shape[2:])).squeeze(1)
    return (fg * q).sum((1, 2)) / (fg.sum((1, 2)) + eps)
