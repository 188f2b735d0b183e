"""Ground-truth rewards of the toy text-to-video world, one per VideoAlign dimension: VQ, MQ, TA.

Clip conventions: uint8 clips ``(N, T, 32, 32, 3)`` with N captions -> ``(N,)`` float64 arrays, or one clip
``(T, 32, 32, 3)`` with one caption -> float; T >= 2 (the toy contract has T = 9). Float clips are refused:
convert model outputs with `to_uint8_clips`. Every reward lies in [0, 1].

Per-frame features reuse the image toy's definitions (`mmalign.toy.rewards`): a pixel is *foreground* when its
Euclidean RGB distance to `BACKGROUND` is > 60 (`foreground_mask`); the *object* of a frame is its largest
8-connected foreground component (`_largest_component`) if it covers at most 256 pixels (a quarter of the frame;
the largest toy shape covers 144), else the frame has no object (noise or a flat colour everywhere is no shape).
An object has centroid ``c_k`` (mean column, mean row) and area ``a_k`` (pixels); a_k = 0 without an object. The
*track* of a clip is the least-squares line ``c_k ~ c + k v`` through the centroids of the frames that have an
object (`v` in pixels per frame, (column, row)); its RMS residual is ``rho = sqrt(mean_k ||c_k - c - k v||^2)``.
The *warp error* ``w`` is the mean RGB distance between an object pixel p of frame k and pixel
``p + round(c_{k+1} - c_k)`` of frame k + 1, over the object pixels that stay inside the frame and the consecutive
frame pairs that both have an object (0 for a shape that translates unchanged; large for flicker).

- VQ, visual quality (no caption): per frame, the product of
  ``shape = clip((max_s IoU_s - 0.5) / (0.94 - 0.5), 0, 1)`` with ``IoU_s`` the image toy's `shape_scores` (the
  object against the ideal circle / square / triangle of its bounding box; a rendered triangle reaches >= 0.94,
  a shapeless blob about 0.5-0.8),
  ``single = a_k / #foreground`` (no stray foreground outside the object),
  ``crisp = #{object pixels within 40 of a palette colour} / a_k`` (hard, pure-coloured edges),
  ``clean = #{background pixels within 20 of BACKGROUND} / #background`` (no sub-threshold speckle);
  averaged over frames (a frame without an object scores 0).
- MQ, motion quality (no caption): ``MQ = smooth * steady * consistent`` with
  ``smooth = clip(1 - max(0, rho - 0.5) / 2, 0, 1)`` (a constant-velocity track; 0.5 px of residual is free
  because rendered positions are rounded to whole pixels),
  ``steady = clip(1 - std_k(a_k) / mean_k(a_k), 0, 1)`` over all T frames (the object neither changes size nor
  vanishes) and ``consistent = clip(1 - max(0, w - 10) / 100, 0, 1)`` (its pixels keep their colour as it moves:
  no flicker; 10 RGB units are free, faint pixel noise being VQ's concern).
  Fewer than 2 frames with an object: MQ = 0.
- TA, text alignment: ``TA = (color + shape + direction) / 3`` with
  ``color`` = the image toy's `color_adherence` per frame (fraction of foreground pixels nearest the captioned
  palette colour), averaged over frames;
  ``shape`` = fraction of frames whose object the image toy's rule (`classify_shape`: highest `shape_scores` IoU)
  calls the captioned shape;
  ``direction`` from the track velocity v and the captioned unit step u (`DIRECTION_STEPS`, rows down):
  moving: ``clip(v.u / 1, 0, 1) * clip(1 - |v - (v.u) u| / 1, 0, 1)`` (at least 1 px/frame along u, less than
  1 px/frame across it); still: ``clip(1 - |v| / 1, 0, 1)``; 0 with fewer than 2 frames with an object.

A rendered clip scores 1 on all three for its own caption (tests). The formulas need no gradients: numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmalign.data.schemas import VIDEO_DIMENSIONS
from mmalign.toy.rewards import _largest_component, color_adherence, foreground_mask, shape_scores
from mmalign.toy.scenes import BACKGROUND, CAPTION_TEMPLATE, COLORS, IMAGE_SIZE, PALETTE, SHAPES
from mmalign.toy.video import DIRECTION_STEPS, parse_video_caption

SHAPE_IOU_FLOOR = 0.5  # IoU a shapeless blob reaches against its best template
SHAPE_IOU_FULL = 0.94  # lowest IoU of a rendered shape against its own template (an 8-pixel triangle)
CRISP_TOLERANCE = 40.0  # RGB distance to the nearest palette colour for an object pixel to count as crisp
CLEAN_TOLERANCE = 20.0  # RGB distance to BACKGROUND for a background pixel to count as clean
FREE_RESIDUAL = 0.5  # pixels of track residual that rounding to whole pixels explains
RESIDUAL_SCALE = 2.0  # pixels of residual beyond the free part that take `smooth` from 1 to 0
DIRECTION_SPEED = 1.0  # pixels per frame along the captioned direction for full credit (and across it for none)
MAX_OBJECT_AREA = 256  # pixels; a larger component is not an object (the largest toy shape covers 144)
FREE_WARP = 10.0  # RGB units of warp error that faint pixel noise explains (it belongs to VQ, not MQ)
WARP_SCALE = 100.0  # RGB units of warp error beyond the free part that take `consistent` from 1 to 0

_PALETTE_F = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)
_BACKGROUND_F = np.array(BACKGROUND, dtype=np.float64)


def to_uint8_clips(clips: np.ndarray | torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float channel-last clips ``(N, T, H, W, 3)`` (or one ``(T, H, W, 3)``) in `value_range` -> uint8.

    ``uint8 = round(clip((x - lo) / (hi - lo), 0, 1) * 255)``; `ToyVideoPipeline(..., output_type="np")` returns
    frames in this layout with value_range (0, 1).
    """
    if isinstance(clips, torch.Tensor):
        clips = clips.detach().cpu().numpy()
    clips = np.asarray(clips)
    if not np.issubdtype(clips.dtype, np.floating):
        raise TypeError(f"to_uint8_clips expects float clips, got dtype {clips.dtype}")
    if clips.ndim not in (4, 5) or clips.shape[-1] != 3:
        raise ValueError(f"to_uint8_clips expects channel-last (N, T, H, W, 3) clips, got shape {clips.shape}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    return np.rint(np.clip((clips.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _batch(clips: np.ndarray, captions: str | Sequence[str] | None) -> tuple[np.ndarray, list[str] | None, bool]:
    """(N, T, 32, 32, 3) clips, N captions (None when not needed), and whether the input was one clip."""
    clips = np.asarray(clips)
    if clips.dtype != np.uint8:
        raise TypeError(
            f"clips must be uint8 (N, T, 32, 32, 3) arrays, got dtype {clips.dtype}; convert float model outputs "
            "with mmalign.toy.video_rewards.to_uint8_clips(x, value_range=...)"
        )
    if clips.ndim not in (4, 5) or clips.shape[-3:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or clips.shape[-4] < 2:
        raise ValueError(f"clips must be (T, 32, 32, 3) or (N, T, 32, 32, 3) uint8 with T >= 2, got {clips.shape}")
    single = clips.ndim == 4
    if single:
        clips = clips[None]
    if captions is None:
        return clips, None, single
    if single != isinstance(captions, str):
        raise TypeError("one (T, 32, 32, 3) clip takes one caption string; a batch (N, T, 32, 32, 3) takes a "
                        "sequence of N captions")
    captions = [captions] if single else list(captions)
    if len(captions) != clips.shape[0]:
        raise ValueError(f"got {clips.shape[0]} clips but {len(captions)} captions")
    for c in captions:
        parse_video_caption(c)
    return clips, captions, single


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def clip_features(clips: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame features of uint8 clips (N, T, 32, 32, 3) (module docstring).

    Returns ``foreground`` (N, T) pixel counts, ``area`` (N, T) object pixels, ``centroid`` (N, T, 2) (column,
    row; NaN without an object), ``shape_iou`` (N, T, 3) `shape_scores` in `SHAPES` order, ``crisp`` and
    ``clean`` (N, T) fractions, ``velocity`` (N, 2) track slope in px/frame and ``residual`` (N,) track RMS
    residual in px (both NaN with fewer than 2 frames with an object), ``warp_error`` (N,) in RGB units (NaN
    without a consecutive pair of frames with objects).
    """
    clips, _, _ = _batch(clips, None)
    n, t = clips.shape[:2]
    frames = clips.reshape(n * t, IMAGE_SIZE, IMAGE_SIZE, 3)
    fg = foreground_mask(frames)
    obj = _largest_component(fg)
    obj[obj.sum((1, 2)) > MAX_OBJECT_AREA] = False
    area = obj.sum((1, 2))
    idx = np.arange(IMAGE_SIZE, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (obj.sum(1) * idx).sum(1) / area
        cy = (obj.sum(2) * idx).sum(1) / area
    x = frames.astype(np.float64)
    d_palette = np.sqrt(((x[..., None, :] - _PALETTE_F) ** 2).sum(-1)).min(-1)
    d_background = np.sqrt(((x - _BACKGROUND_F) ** 2).sum(-1))
    crisp = (obj & (d_palette <= CRISP_TOLERANCE)).sum((1, 2)) / np.maximum(area, 1)
    n_bg = (~fg).sum((1, 2))
    clean = np.where(n_bg > 0, ((~fg) & (d_background <= CLEAN_TOLERANCE)).sum((1, 2)) / np.maximum(n_bg, 1), 1.0)
    centroid = np.stack([cx, cy], -1).reshape(n, t, 2)
    velocity, residual = _tracks(centroid)
    shape_iou = np.where((area > 0)[:, None], shape_scores(frames), 0.0)
    return {
        "foreground": fg.sum((1, 2)).reshape(n, t),
        "area": area.reshape(n, t),
        "centroid": centroid,
        "shape_iou": shape_iou.reshape(n, t, len(SHAPES)),
        "crisp": crisp.reshape(n, t),
        "clean": clean.reshape(n, t),
        "velocity": velocity,
        "residual": residual,
        "warp_error": _warp_errors(x.reshape(n, t, IMAGE_SIZE, IMAGE_SIZE, 3),
                                   obj.reshape(n, t, IMAGE_SIZE, IMAGE_SIZE), centroid),
    }


def _warp_errors(frames: np.ndarray, obj: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """(N,) mean RGB distance between object pixels of frame k and their centroid-shifted place in frame k + 1
    (module docstring); NaN when no consecutive pair of frames both has an object."""
    n, t = obj.shape[:2]
    out = np.full(n, np.nan)
    for i in range(n):
        errors = []
        for k in range(t - 1):
            if not (np.isfinite(centroid[i, k, 0]) and np.isfinite(centroid[i, k + 1, 0])):
                continue
            dx, dy = np.rint(centroid[i, k + 1] - centroid[i, k]).astype(int)
            ys, xs = np.nonzero(obj[i, k])
            inside = (ys + dy >= 0) & (ys + dy < IMAGE_SIZE) & (xs + dx >= 0) & (xs + dx < IMAGE_SIZE)
            if not inside.any():
                continue
            ys, xs = ys[inside], xs[inside]
            diff = frames[i, k + 1, ys + dy, xs + dx] - frames[i, k, ys, xs]
            errors.append(np.sqrt((diff**2).sum(-1)).mean())
        if errors:
            out[i] = float(np.mean(errors))
    return out


def _tracks(centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line through the finite centroids of each clip: slope (N, 2) and RMS residual (N,)."""
    n, t, _ = centroid.shape
    velocity = np.full((n, 2), np.nan)
    residual = np.full(n, np.nan)
    k = np.arange(t, dtype=np.float64)
    for i in range(n):
        ok = np.isfinite(centroid[i, :, 0])
        if ok.sum() < 2:
            continue
        kk, c = k[ok], centroid[i, ok]
        kc = kk - kk.mean()
        slope = (kc[:, None] * (c - c.mean(0))).sum(0) / (kc**2).sum()
        fit = c.mean(0) + kc[:, None] * slope
        velocity[i] = slope
        residual[i] = np.sqrt(((c - fit) ** 2).sum(1).mean())
    return velocity, residual


def _visual_quality(f: dict[str, np.ndarray]) -> np.ndarray:
    shape = np.clip((f["shape_iou"].max(-1) - SHAPE_IOU_FLOOR) / (SHAPE_IOU_FULL - SHAPE_IOU_FLOOR), 0.0, 1.0)
    single = f["area"] / np.maximum(f["foreground"], 1)
    per_frame = np.where(f["foreground"] > 0, shape * single * f["crisp"] * f["clean"], 0.0)
    return per_frame.mean(1)


def _motion_quality(f: dict[str, np.ndarray]) -> np.ndarray:
    rho = f["residual"]
    smooth = np.clip(1.0 - np.maximum(0.0, rho - FREE_RESIDUAL) / RESIDUAL_SCALE, 0.0, 1.0)
    area = f["area"].astype(np.float64)
    mean = area.mean(1)
    steady = np.clip(1.0 - area.std(1) / np.maximum(mean, 1e-12), 0.0, 1.0)
    consistent = np.clip(1.0 - np.maximum(0.0, f["warp_error"] - FREE_WARP) / WARP_SCALE, 0.0, 1.0)
    ok = np.isfinite(rho) & np.isfinite(f["warp_error"])
    return np.where(ok, smooth * steady * np.nan_to_num(consistent), 0.0)


def _direction_adherence(velocity: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    u = np.array([DIRECTION_STEPS[d] for d in directions], dtype=np.float64)  # (N, 2); still: (0, 0)
    along = (velocity * u).sum(1)
    across = np.linalg.norm(velocity - along[:, None] * u, axis=1)
    moving = np.clip(along / DIRECTION_SPEED, 0.0, 1.0) * np.clip(1.0 - across / DIRECTION_SPEED, 0.0, 1.0)
    still = np.clip(1.0 - np.linalg.norm(velocity, axis=1) / DIRECTION_SPEED, 0.0, 1.0)
    score = np.where(np.array([d == "still" for d in directions]), still, moving)
    return np.where(np.isfinite(velocity).all(1), score, 0.0)


def _text_alignment_parts(clips: np.ndarray, captions: list[str], f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n, t = clips.shape[:2]
    parsed = [parse_video_caption(c) for c in captions]
    # The image toy's colour adherence, per frame, through a caption of its own grammar naming the same colour.
    frame_captions = [CAPTION_TEMPLATE.format(color=c, shape=s, position="center") for c, s, _ in parsed for _ in
                      range(t)]
    color = color_adherence(clips.reshape(n * t, IMAGE_SIZE, IMAGE_SIZE, 3), frame_captions).reshape(n, t).mean(1)
    # `classify_shape` on the IoUs already computed: argmax in SHAPES order, no shape without foreground.
    iou = f["shape_iou"]
    target = np.array([SHAPES.index(s) for _, s, _ in parsed])
    shape = ((iou.argmax(-1) == target[:, None]) & (iou.max(-1) > 0)).mean(1)
    direction = _direction_adherence(f["velocity"], [d for _, _, d in parsed])
    return {"color": color, "shape": shape, "direction": direction}


def visual_quality(clips: np.ndarray) -> float | np.ndarray:
    """VQ in [0, 1] of uint8 clips (N, T, 32, 32, 3) -> (N,), or one clip -> float (formula: module docstring)."""
    clips, _, single = _batch(clips, None)
    return _out(_visual_quality(clip_features(clips)), single)


def motion_quality(clips: np.ndarray) -> float | np.ndarray:
    """MQ in [0, 1] of uint8 clips (N, T, 32, 32, 3) -> (N,), or one clip -> float (formula: module docstring)."""
    clips, _, single = _batch(clips, None)
    return _out(_motion_quality(clip_features(clips)), single)


def text_alignment(clips: np.ndarray, captions: str | Sequence[str]) -> float | np.ndarray:
    """TA in [0, 1]: mean of colour, shape and direction adherence to the caption (module docstring)."""
    clips, captions, single = _batch(clips, captions)
    parts = _text_alignment_parts(clips, captions, clip_features(clips))
    return _out((parts["color"] + parts["shape"] + parts["direction"]) / 3.0, single)


def video_reward_components(clips: np.ndarray, captions: str | Sequence[str]) -> dict[str, float | np.ndarray]:
    """All rewards from one feature pass: {"VQ", "MQ", "TA", "color", "shape", "direction"} (the last three are
    TA's parts), each (N,) for a batch or a float for one clip."""
    clips, captions, single = _batch(clips, captions)
    f = clip_features(clips)
    parts = _text_alignment_parts(clips, captions, f)
    out = {
        "VQ": _visual_quality(f),
        "MQ": _motion_quality(f),
        "TA": (parts["color"] + parts["shape"] + parts["direction"]) / 3.0,
        **parts,
    }
    return {k: _out(v, single) for k, v in out.items()}


def video_rewards(clips: np.ndarray, captions: str | Sequence[str]) -> dict[str, float | np.ndarray]:
    """{"VQ", "MQ", "TA"}: the three ground-truth rewards (same input rules as `video_reward_components`)."""
    parts = video_reward_components(clips, captions)
    return {d: parts[d] for d in VIDEO_DIMENSIONS}
