"""Audio inputs of audio scorers (`modality = "audio"`): clips, their sample rate, and resampling.

    scores = scorer.score(audio, prompts, sample_rate=32000)    # (N,) float32

`audio` is a float tensor or array (N, samples) or (N, channels, samples) (what `MusicAdapter.decode_audio`
returns), or a list of N clips, each (samples,) or (channels, samples), of any lengths. Channels are averaged to
mono: CLAP and the audio hook see mono clips. `sample_rate` (Hz) is required: a silent wrong rate is the classic
audio bug.

Resampling (`resample`) is FFmpeg's libswresample through PyAV (`av`, the `audio` / `video` extras and the test
environment) with its default polyphase filter (a Kaiser-windowed sinc of 32 taps, 1024 phases, cutoff near the
lower of the two Nyquist frequencies), in float64. The output is aligned with the input (sample 0 at
time 0, no filter delay) and has `ceil(n · target / orig)` samples, the length torchaudio and julius give; the signal
is taken as zero outside the clip, so the first and last few output samples of a clip that does not start or end
in silence see the edge. `tests/test_rewards_clap.py` checks it against band-limited sines evaluated analytically
at the new rate (|error| < 1e-4 away from the edges) and that a tone above the new Nyquist frequency is removed.

Sample rates must be whole numbers of hertz (an int, or a float with an integral value such as 44100.0): any two
such rates resample exactly (libswresample works with their integer ratio). Anything else (<= 0, 44100.5, a bool,
a string) is a `ScorerError` naming `sample_rate`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from mmalign.rewards.base import ScorerError


def check_sample_rate(value: Any, name: str = "sample_rate") -> int:
    """`value` as an int number of hertz, or a `ScorerError` naming `name` and what would be valid."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value) == int(value) and int(value) >= 1
    if not ok:
        raise ScorerError(f"{name} must be a whole positive number of hertz (e.g. 32000 or 48000.0), got "
                          f"{type(value).__name__} {value!r}; audio at a fractional or non-positive rate cannot be "
                          "resampled")
    return int(value)


def split_audio(audio: Any) -> list[np.ndarray]:
    """Clips as a list of mono float32 arrays (samples,); see the module docstring for what `audio` may be. A clip
    with no samples or with non-finite values is a `ScorerError` naming it."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    if isinstance(audio, np.ndarray):
        if audio.ndim not in (2, 3) or not np.issubdtype(audio.dtype, np.floating):
            raise ScorerError(f"audio arrays must be float (N, samples) or (N, channels, samples), got {audio.dtype} "
                              f"{audio.shape}; pass a list of clips of different lengths")
        audio = list(audio)
    out = []
    for i, clip in enumerate(audio):
        if isinstance(clip, torch.Tensor):
            clip = clip.detach().float().cpu().numpy()
        arr = np.asarray(clip)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.floating):
            raise ScorerError(f"audio[{i}]: a clip must be a float (samples,) or (channels, samples) array, got "
                              f"{arr.dtype} {arr.shape}")
        arr = arr.astype(np.float32, copy=False)
        if arr.ndim == 2:
            arr = arr.mean(axis=0)
        if arr.size == 0:
            raise ScorerError(f"audio[{i}]: the clip has no samples")
        if not np.isfinite(arr).all():
            raise ScorerError(f"audio[{i}]: {int((~np.isfinite(arr)).sum())} samples are not finite (nan or inf)")
        out.append(arr)
    return out


def resample(clip: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """A mono clip (samples,) at `orig_sr` Hz -> float64 (ceil(samples · target_sr / orig_sr),) at `target_sr` Hz
    (libswresample; see the module docstring). Equal rates return the clip unchanged (as float64)."""
    orig_sr, target_sr = check_sample_rate(orig_sr), check_sample_rate(target_sr, "target sample rate")
    x = np.asarray(clip, dtype=np.float64)
    if x.ndim != 1:
        raise ScorerError(f"resample takes one mono clip (samples,), got shape {x.shape}")
    if orig_sr == target_sr:
        return x.copy()
    try:
        import av
    except ImportError:
        raise ScorerError(f"resampling audio from {orig_sr} Hz to {target_sr} Hz needs PyAV: pip install "
                          "'mmalign[audio]' (or pass audio at the scorer's rate)") from None
    n_out = -(-x.size * target_sr // orig_sr)
    # Trailing zeros (the filter's reach, in input samples) let libswresample emit every output sample; the clip's
    # own ends are unchanged (the filter treats the outside as zero anyway).
    tail = 64 * (1 + -(-orig_sr // target_sr)) + 64
    frame = av.AudioFrame.from_ndarray(np.concatenate([x, np.zeros(tail)])[None], format="dbl", layout="mono")
    frame.sample_rate = orig_sr
    resampler = av.AudioResampler(format="dbl", layout="mono", rate=target_sr)
    parts = [f.to_ndarray()[0] for f in resampler.resample(frame)] + [f.to_ndarray()[0] for f in
                                                                     resampler.resample(None)]
    y = np.concatenate(parts) if parts else np.zeros(0)
    if y.size < n_out:
        raise ScorerError(f"resampling {x.size} samples from {orig_sr} Hz to {target_sr} Hz gave {y.size} samples, "
                          f"expected {n_out}")
    return y[:n_out]
