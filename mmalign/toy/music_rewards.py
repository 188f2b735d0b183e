"""Ground-truth rewards of the toy token-music world: pattern adherence and quality, with their parts.

Codes conventions: int codes ``(N, K, T)`` with N captions -> ``(N,)`` float64 arrays, or one ``(K, T)`` with one
caption -> float; K = 4 codebooks, every code in 0..63, T a multiple of `NOTE_FRAMES` = 4 with at least 2 notes
(the toy contract, `mmalign.toy.music`, has T = 32). Every reward lies in [0, 1].

*Notes.* Codebook 0 is cut into W = T / 4 windows of one note each; the note of a window is its most frequent
code (ties go to the lowest code, so a half-silent window is a silent note). A note is *sounding* when it is not
`SILENCE`. The S = W - 1 *steps* are ``d_w = note_{w+1} - note_w`` (in semitones); a step counts only when both
of its notes sound.

- pattern, adherence of the notes to the captioned pattern, over the S steps:
  ascending ``clip((#up - #down) / S, 0, 1)``, descending ``clip((#down - #up) / S, 0, 1)``,
  repeating ``#same / S``, alternating ``#{w: d_w != 0 and (w = 0 or d_w = -d_{w-1})} / S`` (notes swing
  between two pitches; the steps around a silent note never count). A rendered phrase scores 1 on its own
  pattern and at most 1/S (1/7) on any other: an alternating line is neither ascending nor descending, a
  monotone line alternates only on its first step.
- quality, ``in_key * sounding * timbre``, with frame-level parts (not the notes: a stray token inside a note
  costs quality even when the note's majority hides it from `pattern`):
  ``in_key`` = fraction of sounding frames of codebook 0 whose pitch class ``(c - 1) % 12`` is in the captioned
  key's scale; ``sounding`` = fraction of the T frames whose codebook-0 code is not `SILENCE` (no silence gaps);
  ``timbre`` = fraction of the timbre tokens (codebooks 1..K-1) of sounding frames inside the captioned
  instrument's band `TIMBRE_BANDS`. With no sounding frame, in_key, timbre and quality are 0.

The formulas need no gradients: numpy only, vectorised over the batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmalign.toy.music import (
    CODEBOOK_SIZE, NOTE_FRAMES, NUM_CODEBOOKS, SCALES, SILENCE, TIMBRE_BANDS, TONICS,
    parse_music_caption,
)

MUSIC_DIMENSIONS: tuple[str, ...] = ("pattern", "quality")
QUALITY_PARTS: tuple[str, ...] = ("in_key", "sounding", "timbre")


def check_codes(codes: np.ndarray, name: str = "codes") -> tuple[np.ndarray, bool]:
    """`codes` as int64 (N, K, T) and whether it was one (K, T) phrase; errors name `name` and what is valid."""
    arr = np.asarray(codes)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array (N, {NUM_CODEBOOKS}, T) of codes, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or arr.shape[-2] != NUM_CODEBOOKS:
        raise ValueError(f"{name} must be (N, {NUM_CODEBOOKS}, T) or ({NUM_CODEBOOKS}, T) (K = {NUM_CODEBOOKS} "
                         f"codebooks), got shape {arr.shape}")
    t = arr.shape[-1]
    if t % NOTE_FRAMES or t < 2 * NOTE_FRAMES:
        raise ValueError(f"{name} must have T frames a multiple of {NOTE_FRAMES} (one note per {NOTE_FRAMES} "
                         f"frames) with at least 2 notes, got T = {t}")
    single = arr.ndim == 2
    arr = arr[None] if single else arr
    bad = (arr < 0) | (arr >= CODEBOOK_SIZE)
    if bad.any():
        i, k, f = (int(j) for j in np.argwhere(bad)[0])
        raise ValueError(f"{name}: sample {i} codebook {k} frame {f} holds code {int(arr[i, k, f])}, outside the "
                         f"codebook 0..{CODEBOOK_SIZE - 1} ({int(bad.sum())} such codes)")
    return arr.astype(np.int64), single


def _batch(codes: np.ndarray, captions: str | Sequence[str]) -> tuple[np.ndarray, list[tuple], bool]:
    """(N, K, T) int64 codes, the N parsed captions, and whether the input was one phrase."""
    codes, single = check_codes(codes)
    if single != isinstance(captions, str):
        raise TypeError("one (K, T) phrase takes one caption string; a batch (N, K, T) takes a sequence of N "
                        "captions")
    captions = [captions] if single else list(captions)
    if len(captions) != codes.shape[0]:
        raise ValueError(f"got {codes.shape[0]} phrases in codes but {len(captions)} captions")
    parsed = []
    for i, c in enumerate(captions):
        try:
            parsed.append(parse_music_caption(c))
        except (TypeError, ValueError) as err:
            raise type(err)(f"captions[{i}]: {err}") from None
    return codes, parsed, single


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def note_sequence(codes: np.ndarray) -> np.ndarray:
    """(N, W) int64 notes of codes (N, K, T): the most frequent codebook-0 code of each 4-frame window, ties to
    the lowest code (module docstring); one (K, T) phrase -> (W,)."""
    codes, single = check_codes(codes)
    n, _, t = codes.shape
    windows = codes[:, 0].reshape(n, t // NOTE_FRAMES, NOTE_FRAMES)
    counts = (windows[..., None] == np.arange(CODEBOOK_SIZE)).sum(2)  # (N, W, 64)
    notes = counts.argmax(-1)  # argmax returns the first maximum: the lowest code
    return notes[0] if single else notes


def _pattern_scores(notes: np.ndarray) -> dict[str, np.ndarray]:
    """{pattern: (N,) adherence} of (N, W) notes to each of the four patterns (module docstring)."""
    d = np.diff(notes, axis=1)
    sounding = notes != SILENCE
    both = sounding[:, 1:] & sounding[:, :-1]
    s = d.shape[1]
    up, down = (both & (d > 0)).sum(1), (both & (d < 0)).sum(1)
    swing = both & (d != 0)
    swing[:, 1:] &= both[:, :-1] & (d[:, 1:] == -d[:, :-1])
    return {
        "ascending": np.clip((up - down) / s, 0.0, 1.0),
        "descending": np.clip((down - up) / s, 0.0, 1.0),
        "repeating": (both & (d == 0)).sum(1) / s,
        "alternating": swing.sum(1) / s,
    }


def _quality_parts(codes: np.ndarray, parsed: list[tuple]) -> dict[str, np.ndarray]:
    n, k, t = codes.shape
    melody = codes[:, 0]
    sounding = melody != SILENCE  # (N, T)
    n_sounding = sounding.sum(1)
    in_scale = np.zeros((n, 12), dtype=bool)  # pitch classes of each caption's key
    for i, (_, _, key, mode) in enumerate(parsed):
        in_scale[i, (TONICS[key] + np.asarray(SCALES[mode])) % 12] = True
    pitch_class = (melody - 1) % 12
    in_key = (sounding & np.take_along_axis(in_scale, pitch_class, 1)).sum(1) / np.maximum(n_sounding, 1)
    band = np.array([TIMBRE_BANDS[instrument] for _, instrument, _, _ in parsed])  # (N, 2): [lo, hi)
    timbre = codes[:, 1:]
    inside = (timbre >= band[:, :1, None]) & (timbre < band[:, 1:, None]) & sounding[:, None]
    timbre_ok = inside.sum((1, 2)) / np.maximum((k - 1) * n_sounding, 1)
    return {"in_key": in_key, "sounding": n_sounding / t, "timbre": timbre_ok}


def _pattern(codes: np.ndarray, parsed: list[tuple]) -> np.ndarray:
    scores = _pattern_scores(note_sequence(codes))
    return np.array([scores[p][i] for i, (p, _, _, _) in enumerate(parsed)], dtype=np.float64)


def pattern_adherence(codes: np.ndarray, captions: str | Sequence[str]) -> float | np.ndarray:
    """Adherence in [0, 1] of codebook 0's notes to the captioned pattern (formula: module docstring)."""
    codes, parsed, single = _batch(codes, captions)
    return _out(_pattern(codes, parsed), single)


def music_quality(codes: np.ndarray, captions: str | Sequence[str]) -> float | np.ndarray:
    """Quality in [0, 1]: ``in_key * sounding * timbre`` against the caption's key and instrument (module
    docstring)."""
    codes, parsed, single = _batch(codes, captions)
    parts = _quality_parts(codes, parsed)
    return _out(parts["in_key"] * parts["sounding"] * parts["timbre"], single)


def music_reward_components(codes: np.ndarray, captions: str | Sequence[str]) -> dict[str, float | np.ndarray]:
    """All rewards in one pass: {"pattern", "quality", "in_key", "sounding", "timbre"} (the last three are
    quality's parts), each (N,) for a batch or a float for one phrase."""
    codes, parsed, single = _batch(codes, captions)
    parts = _quality_parts(codes, parsed)
    out = {"pattern": _pattern(codes, parsed), "quality": parts["in_key"] * parts["sounding"] * parts["timbre"],
           **parts}
    return {name: _out(v, single) for name, v in out.items()}


def music_rewards(codes: np.ndarray, captions: str | Sequence[str]) -> dict[str, float | np.ndarray]:
    """{"pattern", "quality"}: the two ground-truth rewards (same input rules as `music_reward_components`)."""
    parts = music_reward_components(codes, captions)
    return {d: parts[d] for d in MUSIC_DIMENSIONS}

