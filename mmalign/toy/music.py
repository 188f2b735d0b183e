"""Toy token-music world: short phrases of MusicGen-style codes whose melody and timbre a caption describes.

Contract (fixed; the music rewards, the toy MusicGen and independent checks rely on it):

- codes: (K, T) int64 with K = `NUM_CODEBOOKS` = 4 codebooks of `CODEBOOK_SIZE` = 64 codes (the tiny MusicGen's
  defaults, `mmalign.music.tiny`) and T = `NUM_FRAMES` = 32 frames at 50 frames per second: `NUM_NOTES` = 8 notes
  of `NOTE_FRAMES` = 4 frames each. Code `SILENCE` = 0 is silence in every codebook;
- codebook 0 carries the melody: code c >= 1 is the pitch ``c - 1`` semitones above the lowest C, so its pitch
  class is ``(c - 1) % 12`` (codes 1..63 span five octaves and a quarter). A note is held for its 4 frames;
- the key: tonic `TONICS[key]` (c, d, e, f, g) and the major or natural-minor scale `SCALES[mode]`. Notes are
  *scale degrees*: absolute degree a is degree ``a % 7`` of octave ``a // 7``, the code of
  ``TONICS[key] + 12 * (a // 7) + SCALES[mode][a % 7]`` semitones (`degree_code`);
- the pattern of the 8 notes, from the first degree `start` and the signed `step` in degrees:
  ascending ``start + w * step`` with step in {1, 2}; descending the same with step in {-1, -2}; repeating
  ``start`` 8 times (step 0); alternating ``start, start + step, start, ...`` with step in {±2, ±3, ±4};
- codebooks 1..K-1 carry the timbre: every token is drawn uniformly from the instrument's band of 8 codes
  `TIMBRE_BANDS[instrument]` = [lo, hi) (guard gaps of 8 codes between bands; silence is in none), from
  `default_rng(timbre_seed)`;
- caption: ``a {pattern} {instrument} melody in {key} {mode}``; every word is one token of the tiny MusicGen's
  word tokenizer (`mmalign.music.tiny.MUSIC_WORDS`). The article is "a" even before a vowel, so that only the
  pattern word says the pattern (a wrong-pattern caption changes one word);
- everything is deterministic from a seed (`numpy.random.default_rng`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

import numpy as np

from mmalign.toy.scenes import as_rng

NUM_CODEBOOKS = 4
CODEBOOK_SIZE = 64
FRAME_RATE = 50.0  # frames per second, as MusicGen's EnCodec (32 kHz / 640) and the tiny MusicGen's (8 kHz / 160)
NOTE_FRAMES = 4
NUM_NOTES = 8
NUM_FRAMES = NUM_NOTES * NOTE_FRAMES
SILENCE = 0
PATTERNS: tuple[str, ...] = ("ascending", "descending", "repeating", "alternating")
INSTRUMENTS: tuple[str, ...] = ("piano", "guitar", "violin", "flute")
KEYS: tuple[str, ...] = ("c", "d", "e", "f", "g")
MODES: tuple[str, ...] = ("major", "minor")
TONICS: Mapping[str, int] = MappingProxyType({"c": 0, "d": 2, "e": 4, "f": 5, "g": 7})  # pitch class of the tonic
SCALES: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
)
# Signed steps (scale degrees) each pattern is drawn with.
PATTERN_STEPS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {"ascending": (1, 2), "descending": (-1, -2), "repeating": (0,), "alternating": (-4, -3, -2, 2, 3, 4)}
)
TIMBRE_BAND_WIDTH = 8
# Instrument i owns codes [4 + 16 i, 12 + 16 i) of every timbre codebook.
TIMBRE_BANDS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {name: (4 + 16 * i, 4 + 16 * i + TIMBRE_BAND_WIDTH) for i, name in enumerate(INSTRUMENTS)}
)
MUSIC_CAPTION_TEMPLATE = "a {pattern} {instrument} melody in {key} {mode}"


def degree_code(key: str, mode: str, degree: int | np.ndarray) -> int | np.ndarray:
    """Codebook-0 code of absolute scale degree(s) `degree` >= 0 in `key` `mode` (module docstring)."""
    d = np.asarray(degree, dtype=np.int64)
    code = 1 + TONICS[key] + 12 * (d // 7) + np.asarray(SCALES[mode])[d % 7]
    return int(code) if code.ndim == 0 else code


def max_degree(key: str, mode: str) -> int:
    """The highest absolute degree whose code is still in the codebook (<= 63)."""
    d = 0
    while degree_code(key, mode, d + 1) < CODEBOOK_SIZE:
        d += 1
    return d


def pattern_offsets(pattern: str, step: int) -> np.ndarray:
    """(8,) degree offsets of the notes from `start`: ``w * step``, or ``(w % 2) * step`` for alternating."""
    w = np.arange(NUM_NOTES)
    return (w % 2) * step if pattern == "alternating" else w * step


def start_range(pattern: str, key: str, mode: str, step: int) -> range:
    """First degrees that keep every note of the phrase inside the codebook (degree >= 0, code <= 63)."""
    off = pattern_offsets(pattern, step)
    return range(-int(off.min()), max_degree(key, mode) - int(off.max()) + 1)


@dataclasses.dataclass(frozen=True)
class Phrase:
    """One toy phrase. `start`: absolute scale degree of the first note; `step`: signed degrees (module docstring);
    `timbre_seed`: seed of the timbre tokens."""

    pattern: str
    instrument: str
    key: str
    mode: str
    start: int
    step: int
    timbre_seed: int

    def __post_init__(self) -> None:
        for name, valid in (("pattern", PATTERNS), ("instrument", INSTRUMENTS), ("key", KEYS), ("mode", MODES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"Phrase.{name}={getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.step not in PATTERN_STEPS[self.pattern]:
            raise ValueError(f"Phrase.step={self.step} for pattern {self.pattern!r}; valid steps: "
                             f"{PATTERN_STEPS[self.pattern]}")
        allowed = start_range(self.pattern, self.key, self.mode, self.step)
        if self.start not in allowed:
            raise ValueError(f"Phrase.start={self.start} takes a note outside codes 1..{CODEBOOK_SIZE - 1} "
                             f"({self.pattern}, step {self.step}, {self.key} {self.mode}); valid starts: "
                             f"{allowed.start}..{allowed.stop - 1}")

    @property
    def caption(self) -> str:
        return MUSIC_CAPTION_TEMPLATE.format(pattern=self.pattern, instrument=self.instrument, key=self.key,
                                             mode=self.mode)

    def notes(self) -> np.ndarray:
        """(8,) int64 codebook-0 codes of the notes."""
        return degree_code(self.key, self.mode, self.start + pattern_offsets(self.pattern, self.step))

    def render(self) -> np.ndarray:
        """(4, 32) int64 codes: the notes held for 4 frames each in codebook 0, timbre tokens in codebooks 1..3."""
        lo, hi = TIMBRE_BANDS[self.instrument]
        codes = np.empty((NUM_CODEBOOKS, NUM_FRAMES), dtype=np.int64)
        codes[0] = np.repeat(self.notes(), NOTE_FRAMES)
        codes[1:] = np.random.default_rng(self.timbre_seed).integers(lo, hi, size=(NUM_CODEBOOKS - 1, NUM_FRAMES))
        return codes


def parse_music_caption(caption: str) -> tuple[str, str, str, str]:
    """``"a descending violin melody in d minor"`` -> ``("descending", "violin", "d", "minor")``; anything outside
    the grammar raises ValueError (words are split on whitespace)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    w = caption.split()
    if (len(w) == 7 and w[0] == "a" and w[1] in PATTERNS and w[2] in INSTRUMENTS and w[3] == "melody"
            and w[4] == "in" and w[5] in KEYS and w[6] in MODES):
        return w[1], w[2], w[5], w[6]
    raise ValueError(f"caption {caption!r} is outside the toy music grammar {MUSIC_CAPTION_TEMPLATE!r} with pattern "
                     f"in {PATTERNS}, instrument in {INSTRUMENTS}, key in {KEYS}, mode in {MODES}")


def sample_phrase(rng_or_seed: np.random.Generator | int, caption: str | None = None) -> Phrase:
    """A random phrase; with `caption`, one the caption describes (only step, start and timbre seed are drawn).

    Draw order (part of the determinism contract): pattern, instrument, key, mode (each uniform, skipped when
    `caption` is given), step (uniform over `PATTERN_STEPS[pattern]`), start (uniform over `start_range`),
    timbre_seed (uniform in 0 .. 2**31 - 1).
    """
    rng = as_rng(rng_or_seed)
    if caption is None:
        pattern, instrument, key, mode = (v[rng.integers(len(v))] for v in (PATTERNS, INSTRUMENTS, KEYS, MODES))
    else:
        pattern, instrument, key, mode = parse_music_caption(caption)
    steps = PATTERN_STEPS[pattern]
    step = int(steps[rng.integers(len(steps))])
    starts = start_range(pattern, key, mode, step)
    start = int(starts[rng.integers(len(starts))])
    return Phrase(pattern, instrument, key, mode, start, step, timbre_seed=int(rng.integers(2**31)))


def sample_phrases(n: int, seed: int) -> list[Phrase]:
    """`n` phrases drawn one after another from `default_rng(seed)`."""
    rng = as_rng(seed)
    return [sample_phrase(rng) for _ in range(n)]


def render_phrases(phrases: Sequence[Phrase]) -> np.ndarray:
    """(N, 4, 32) int64 codes of `phrases`."""
    if not phrases:
        return np.zeros((0, NUM_CODEBOOKS, NUM_FRAMES), dtype=np.int64)
    return np.stack([p.render() for p in phrases])


def noisy_music_caption(phrase: Phrase, rng: np.random.Generator | int, p_wrong: float = 0.5) -> str:
    """The phrase's caption naming, with probability `p_wrong`, a uniformly drawn wrong pattern.

    Models the base model's training captions, often wrong about the pattern (instrument and key are always
    right), so that the pattern is what alignment can move. Exactly two draws are consumed per call (one
    uniform, one integer), whatever the outcome, so streams stay aligned across `p_wrong` values.
    """
    if not 0.0 <= p_wrong <= 1.0:
        raise ValueError(f"p_wrong must be in [0, 1], got {p_wrong}")
    rng = as_rng(rng)
    wrong = rng.random() < p_wrong
    others = [p for p in PATTERNS if p != phrase.pattern]
    other = others[rng.integers(len(others))]
    return MUSIC_CAPTION_TEMPLATE.format(pattern=other if wrong else phrase.pattern, instrument=phrase.instrument,
                                         key=phrase.key, mode=phrase.mode)


def all_music_prompts() -> list[str]:
    """The 160 captions of the grammar; pattern varies fastest, then instrument, mode and key (`KEYS` order), so
    any 4 consecutive prompts cover every pattern and any 16 every pattern x instrument."""
    return [MUSIC_CAPTION_TEMPLATE.format(pattern=p, instrument=i, key=k, mode=m)
            for k in KEYS for m in MODES for i in INSTRUMENTS for p in PATTERNS]


def music_prompt_seed_pairs(split: Literal["train", "heldout"], n: int) -> list[tuple[str, int]]:
    """`n` deterministic (prompt, seed) pairs of a split: pair i is ``(all_music_prompts()[i % 160], 2*i + k)``.

    k = 0 for "train" and 1 for "heldout": the splits never share a seed, and both cycle through all 160 prompts
    evenly. The seed is meant for the sampler and for ``sample_phrase(seed, caption=prompt)`` when a reference
    phrase is wanted.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    prompts = all_music_prompts()
    k = 0 if split == "train" else 1
    return [(prompts[i % len(prompts)], 2 * i + k) for i in range(n)]
