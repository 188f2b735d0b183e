"""Video decoding behind one function: decord when it is installed, PyAV otherwise.

`read_frames` samples frames uniformly in time: at a target `fps` (as VideoAlign / Qwen-VL do), then at most
`max_frames` spread evenly over those, optionally downscaled to at most `max_pixels` per frame.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import Literal

from pydantic import Field

from mmalign.config import StrictModel
from mmalign.data.deps import require


def have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def sample_indices(num_frames: int, native_fps: float, fps: float | None = None,
                   max_frames: int | None = None) -> list[int]:
    """Frame indices to keep: every `native_fps / fps`-th frame (nearest), then at most `max_frames` of those,
    spread evenly from the first to the last."""
    if num_frames <= 0:
        return []
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        duration = num_frames / native_fps
        n = max(1, int(math.floor(duration * fps + 1e-6)))
        idx = [min(num_frames - 1, int(round(k * native_fps / fps))) for k in range(n)]
    else:
        idx = list(range(num_frames))
    if max_frames is not None and len(idx) > max_frames:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if max_frames == 1:
            idx = [idx[0]]
        else:
            step = (len(idx) - 1) / (max_frames - 1)
            idx = [idx[int(round(i * step))] for i in range(max_frames)]
    return idx


def fit_pixels(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """(h, w) scaled down (aspect kept, even sizes) so that h * w <= max_pixels; unchanged when it already fits."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    s = math.sqrt(max_pixels / (height * width))
    h, w = max(2, int(height * s) // 2 * 2), max(2, int(width * s) // 2 * 2)
    return h, w


def video_info(src: str | os.PathLike | bytes) -> dict:
    """`{"fps", "num_frames", "height", "width"}` of a video, by demuxing (no decoding) with PyAV."""
    av = require("av", "video_info")

    with av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        n = sum(1 for p in container.demux(stream) if p.size > 0)
        return {"fps": fps, "num_frames": n, "height": stream.codec_context.height,
                "width": stream.codec_context.width}


def read_frames(src: str | os.PathLike | bytes, fps: float | None = None, max_frames: int | None = None,
                max_pixels: int | None = None, backend: Literal["decord", "pyav"] | None = None):
    """Decode frames of a video (a path or the mp4 bytes) as a uint8 tensor (T, H, W, 3).

    fps: sample at this rate (None: every frame). max_frames: keep at most this many, evenly spread.
    max_pixels: downscale each frame so that H * W <= max_pixels (aspect kept).
    backend: None picks decord if installed, else PyAV.
    """
    if backend is None:
        backend = "decord" if have_decord() else "pyav"
    if backend == "decord":
        return _read_decord(src, fps, max_frames, max_pixels)
    if backend == "pyav":
        return _read_pyav(src, fps, max_frames, max_pixels)
    raise ValueError(f"backend must be 'decord', 'pyav' or None, got {backend!r}")


def _read_decord(src, fps, max_frames, max_pixels):
    import torch

    decord = require("decord", "read_frames(backend='decord') (x86-64 Linux wheels only; backend='pyav' reads "
                     "everywhere)")

    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)
    probe = decord.VideoReader(f, num_threads=1)
    h, w = probe[0].shape[:2] if len(probe) else (0, 0)
    native = probe.get_avg_fps()
    n = len(probe)
    th, tw = fit_pixels(h, w, max_pixels)
    if (th, tw) != (h, w):
        if isinstance(f, io.BytesIO):
            f.seek(0)
        probe = decord.VideoReader(f, num_threads=1, width=tw, height=th)
    idx = sample_indices(n, native, fps, max_frames)
    if not idx:
        return torch.zeros((0, th, tw, 3), dtype=torch.uint8)
    return torch.from_numpy(probe.get_batch(idx).asnumpy())


def _read_pyav(src, fps, max_frames, max_pixels):
    import numpy as np
    import torch

    av = require("av", "read_frames (PyAV backend; decord is not installed)")

    def _open():
        return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src))

    with _open() as container:  # pass 1: count frames without decoding
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        n = sum(1 for p in container.demux(stream) if p.size > 0)
        h, w = stream.codec_context.height, stream.codec_context.width
    idx = sample_indices(n, float(rate), fps, max_frames)
    th, tw = fit_pixels(h, w, max_pixels)
    if not idx:
        return torch.zeros((0, th, tw, 3), dtype=torch.uint8)
    wanted: dict[int, int] = {}
    for slot, i in enumerate(idx):
        wanted.setdefault(i, slot)
    out = np.empty((len(idx), th, tw, 3), dtype=np.uint8)
    last = max(idx)
    filled = 0
    with _open() as container:  # pass 2: decode in order, convert only the wanted frames
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                arr = frame.to_ndarray(format="rgb24", width=tw, height=th)
                for slot, j in enumerate(idx):  # an index may repeat when fps is above the native rate
                    if j == i:
                        out[slot] = arr
                        filled += 1
            if i >= last:
                break
    if filled < len(idx):
        out = out[:filled]  # fewer decodable frames than packets: return what decoded
    return torch.from_numpy(out)


class FrameSampling(StrictModel):
    """How a reader decodes videos into frames (the arguments of `read_frames`)."""

    fps: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    backend: Literal["decord", "pyav"] | None = None
