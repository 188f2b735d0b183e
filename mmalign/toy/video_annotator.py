"""Simulated video annotator and `video_pair` shards of toy clips.

Labels are given per dimension, as VideoAlign's data is: for clips A and B and each dimension d in VQ, MQ, TA, the
image toy's pairwise annotator (`mmalign.toy.annotator.label_pairs`: Bradley-Terry with a tie margin) is applied
to the ground-truth rewards ``r_d(A)``, ``r_d(B)`` of `mmalign.toy.video_rewards`:

- ``|r_d(A) - r_d(B)| <= tie_margin_d``  -> "same", always;
- otherwise -> "A" with probability ``sigmoid((r_d(A) - r_d(B)) / temperature_d)``, else "B".

Clips are stored as mp4 (`encode_mp4`): by default losslessly (H.264 in RGB, qp 0), so that decoding a shard gives
back exactly the frames the labels were computed on.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from mmalign.data.schemas import VIDEO_DIMENSIONS, sanitize_key, video_pair_sample
from mmalign.toy.annotator import label_dimensions

DEFAULT_FPS = 8.0


def label_video_pairs(
    rewards_a: Mapping[str, np.ndarray],
    rewards_b: Mapping[str, np.ndarray],
    rng: np.random.Generator | int,
    temperature: float | Mapping[str, float] = 0.05,
    tie_margin: float | Mapping[str, float] = 0.02,
) -> list[dict[str, str]]:
    """One label dict ``{"VQ": "A" | "B" | "same", "MQ": ..., "TA": ...}`` per pair (module docstring).

    `rewards_a` / `rewards_b`: {"VQ", "MQ", "TA"} -> (N,) ground-truth rewards (e.g. `video_rewards`).
    `temperature` and `tie_margin` are one value for all dimensions or a dict per dimension (reward units; the
    defaults make a 0.1 reward gap a 0.88 preference and gaps up to 0.02 ties). Dimensions draw from `rng` in
    VQ, MQ, TA order, N uniforms each.
    """
    return label_dimensions(rewards_a, rewards_b, VIDEO_DIMENSIONS, rng, temperature, tie_margin)


def encode_mp4(frames: np.ndarray, fps: float = DEFAULT_FPS, codec: Literal["lossless", "h264"] = "lossless") -> bytes:
    """mp4 bytes of uint8 frames (T, H, W, 3) (H and W even), written with PyAV.

    codec "lossless": H.264 in RGB (`libx264rgb`, qp 0): decoding gives the frames back bit for bit (what toy
    labels need). "h264": ordinary 4:2:0 H.264 (`libx264`, default quality), as web video is stored: colours
    bleed across the edges of small shapes.
    """
    from mmalign.data.deps import require

    av = require("av", "encode_mp4")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 with T >= 1, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {h}x{w}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if codec == "lossless":
        name, pix_fmt, options = "libx264rgb", "rgb24", {"qp": "0"}
    elif codec == "h264":
        name, pix_fmt, options = "libx264", "yuv420p", {}
    else:
        raise ValueError(f"codec must be 'lossless' or 'h264', got {codec!r}")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_video_pair_shards(
    out_dir: str | os.PathLike,
    clips_a: np.ndarray,
    clips_b: np.ndarray,
    prompts: Sequence[str],
    labels: Sequence[Mapping[str, str]],
    *,
    rewards_a: Mapping[str, np.ndarray] | None = None,
    rewards_b: Mapping[str, np.ndarray] | None = None,
    fps: float = DEFAULT_FPS,
    codec: Literal["lossless", "h264"] = "lossless",
    key_prefix: str = "toyvideo",
    provenance: Mapping[str, Any] | None = None,
    max_count: int = 1000,
    overwrite: bool = False,
):
    """Write N toy clip pairs as a `video_pair` shard set in `out_dir`; returns its `Manifest`.

    `clips_a` / `clips_b`: uint8 (N, T, H, W, 3); `prompts`: N captions; `labels`: N dicts {VQ, MQ, TA} -> A / B /
    same (e.g. `label_video_pairs`). Sample i has key ``f"{key_prefix}-{i:09d}"``, `a.mp4` / `b.mp4` from
    `encode_mp4(fps, codec)`, and, when given, the ground-truth rewards as extra JSON fields ``rewards_a`` /
    ``rewards_b`` ({dimension: float}). `provenance` defaults to ``{"dataset": "mmalign-toy-video"}``.
    """
    from mmalign.data.writer import ShardSetWriter

    clips_a, clips_b = np.asarray(clips_a), np.asarray(clips_b)
    n = len(prompts)
    for name, clips in (("clips_a", clips_a), ("clips_b", clips_b)):
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[0] != n:
            raise ValueError(f"{name} must be uint8 (N, T, H, W, 3) with N = {n} (one per prompt), "
                             f"got {clips.shape} {clips.dtype}")
    if len(labels) != n:
        raise ValueError(f"got {n} prompts but {len(labels)} label dicts")
    rewards = {"rewards_a": rewards_a, "rewards_b": rewards_b}
    prov = dict(provenance) if provenance is not None else {"dataset": "mmalign-toy-video"}
    prefix = sanitize_key(key_prefix)
    with ShardSetWriter(out_dir, "video_pair", max_count=max_count, overwrite=overwrite) as writer:
        for i in range(n):
            extra = {name: {d: float(np.asarray(r[d])[i]) for d in VIDEO_DIMENSIONS}
                     for name, r in rewards.items() if r is not None}
            writer.write(video_pair_sample(
                f"{prefix}-{i:09d}", encode_mp4(clips_a[i], fps, codec), encode_mp4(clips_b[i], fps, codec),
                prompt=prompts[i], labels=dict(labels[i]), fps_a=fps, fps_b=fps,
                num_frames_a=int(clips_a.shape[1]), num_frames_b=int(clips_b.shape[1]), provenance=prov, **extra))
        writer.set_conversion({"from": "mmalign.toy.video_annotator", "codec": codec, "fps": fps, "pairs": n})
        return writer.close()
