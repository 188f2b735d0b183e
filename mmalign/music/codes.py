"""Which codes a MusicGen model can score, and the `music_pair` / `music_ranked` readers that skip (and count) the
others.

A model with K codebooks of V codes scores code arrays (K, T) with T >= 1 frames and every code in `0 .. V - 1`
(V itself is the pad / start token, never a code). `code_problem` is the one check: the adapter raises
`MusicCodesError` with it before any forward pass, naming the sample; `CheckedMusicPairDataset` applies it while
reading, so one bad sample in a long run is skipped and counted (stage `decode`, logged with its shard and key) or,
with `strict=True`, is a `CorruptSampleError` naming the shard and key.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mmalign.data.dataset import MusicPairDataset, MusicRankedDataset
from mmalign.data.schemas import SampleError


class MusicCodesError(ValueError):
    """Codes the model cannot score; the message names the sample and what would be valid."""


def code_problem(codes: Tensor, num_codebooks: int, vocab_size: int, frames: Optional[Tensor] = None) -> str | None:
    """What makes one sample's codes (K, T) unscorable by a model with `num_codebooks` codebooks of `vocab_size`
    codes, or None. `frames` (T,) bool marks the real frames of a padded row (default: all)."""
    if codes.ndim != 2:
        return f"codes must be a (K codebooks, T frames) array, got shape {tuple(codes.shape)}"
    if codes.shape[0] != num_codebooks:
        return (f"codes have {codes.shape[0]} codebooks, the model generates {num_codebooks} (an EnCodec code "
                f"array [K, T] with K = {num_codebooks})")
    real = codes if frames is None else codes[:, frames.bool()]
    if real.shape[1] == 0:
        return "codes have no frames (T = 0)"
    bad = (real < 0) | (real >= vocab_size)
    if bad.any():
        k, t = (int(i) for i in bad.nonzero()[0])
        return (f"codebook {k} frame {t} holds code {int(real[k, t])}, outside the codebook vocabulary "
                f"0..{vocab_size - 1} ({int(bad.sum())} such codes; {vocab_size} is the pad / start token, never "
                "a code)")
    return None


class _ModelCodes:
    """Reader mixin: the codebook count and vocabulary of the model the codes are read for, and the check that
    turns a code array it cannot score (`code_problem`) into a corrupt sample (skipped and counted, stage `decode`;
    `strict=True`: an error naming the shard and key)."""

    def __init__(self, source, *, num_codebooks: int, vocab_size: int, **kwargs: Any):
        super().__init__(source, **kwargs)
        self.num_codebooks, self.vocab_size = int(num_codebooks), int(vocab_size)

    def _check_codes(self, named: dict[str, Tensor]) -> None:
        for name, codes in named.items():
            problem = code_problem(codes, self.num_codebooks, self.vocab_size)
            if problem is not None:
                raise SampleError(f"{name} codes: {problem}")


class CheckedMusicPairDataset(_ModelCodes, MusicPairDataset):
    """`MusicPairDataset` for one model: a sample whose chosen or rejected codes the model cannot score is skipped
    and counted like a corrupt one (`_ModelCodes`)."""

    def _decode(self, raw, lay, meta, epoch):
        out = super()._decode(raw, lay, meta, epoch)
        self._check_codes({side: out[f"{side}_codes"] for side in ("chosen", "rejected")})
        return out


class CheckedMusicRankedDataset(_ModelCodes, MusicRankedDataset):
    """`MusicRankedDataset` for one model: a list with any code array the model cannot score is skipped and counted
    like a corrupt sample (`_ModelCodes`)."""

    def _decode(self, raw, lay, meta, epoch):
        out = super()._decode(raw, lay, meta, epoch)
        self._check_codes({f"item {j}": codes for j, codes in enumerate(out["codes"])})
        return out
