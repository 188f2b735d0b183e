"""Bradley-Terry reward model on music codes (MusicRL's user-preference reward U, on MusicGen-class tokens).

    codes (B, K, T) --embeddings of the read codebooks (`codebooks`, default all), summed per frame, + frame
        positions--> (B, T, W) frame tokens
    prompt --hashed word embeddings + word positions--> (B, L, W) word tokens
    [word tokens; frame tokens] --pre-norm transformer (padding masked)--> masked mean of the frame tokens (B, W)
    --one linear head per dimension--> rewards (B, D)

The score is of the codes themselves (the generator's own tokens, never re-encoded audio), so it ranks
self-generated samples exactly as they are trained on. Text conditioning is a small learned embedding of the
prompt's words, each word hashed (crc32 of the lower-cased word) into `text_buckets` rows: it works offline with
any vocabulary (the toy's caption words, real prompts), needs no tokenizer file, and keeps the reward model
independent of any one generator; the MusicGen T5 of a pipeline would tie it to that pipeline and be many times
larger than the toy world needs. Words and frames attend to each other, so the reward can depend on how the
melody matches the caption (the toy's pattern word), not only on either alone.

Trained with the reward task (`model.kind: music`, `mmalign.rewards.task`) on `music_pair` shards;
`save_pretrained` writes `music_reward.safetensors` + `mmalign_scorer.json` (kind `music`), which
`MusicCodeScorer.from_pretrained` / `load_scorer(folder)` load back: `score(codes (N, K, T) int, prompts) -> (N,)`
((N, D) with several `dims`).
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from mmalign.config import StrictModel
from mmalign.rewards.base import Scorer, ScorerError, as_prompt_list, fingerprint_folder

WEIGHTS_FILE = "music_reward.safetensors"
_WORD = re.compile(r"[a-z0-9]+")
_DIM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class MusicRewardConfig(StrictModel):
    """Architecture of a `MusicRewardModel` (`model.music` of the reward task; saved in its scorer card)."""

    vocab_size: int = Field(64, gt=0, description="Codes per codebook (the generator's codebook size; codes are "
                                                  "0 .. vocab_size - 1).")
    num_codebooks: int = Field(4, gt=0, description="K, the codebooks of every code array (K, T).")
    codebooks: Optional[list[int]] = Field(
        None, min_length=1, description="The codebooks the model reads (indices into the K; null = all). Codes of "
        "the others are still checked but ignored. MusicGen-class RVQ codebooks go from coarse (0: most of the "
        "content) to fine acoustic detail: a reward of melody or structure reads the first ones, and does not "
        "learn to tell its training samples apart by fine-codebook detail (the toy world's timbre tokens, drawn "
        "at random per frame, made a model reading all 4 memorise its pairs: held-out accuracy 0.50, against "
        "0.87 reading codebook 0; docs/music.md).")
    width: int = Field(64, gt=0, description="Token width W (code and word embeddings, transformer).")
    layers: int = Field(2, ge=0, description="Transformer layers (0: no attention, the mean of the frames only; "
                                             "the text is then ignored).")
    heads: int = Field(4, gt=0, description="Attention heads (must divide width).")
    max_frames: int = Field(512, gt=0, description="Learned frame positions: the longest code array it scores.")
    max_words: int = Field(32, gt=0, description="Words of a prompt kept (the first ones).")
    text_buckets: int = Field(1024, gt=0, description="Rows of the hashed word embedding (crc32 of the word mod "
                                                      "this).")
    dims: list[str] = Field(default_factory=lambda: ["reward"], min_length=1,
                            description="One head per reward dimension; one: scores (N,), several: (N, D).")
    name: str = Field("music_reward", description="Scorer name (its `mmalign score` sub-folder).")

    @model_validator(mode="after")
    def _check(self) -> "MusicRewardConfig":
        if self.codebooks is not None and (len(set(self.codebooks)) != len(self.codebooks)
                                           or not all(0 <= k < self.num_codebooks for k in self.codebooks)):
            raise ValueError(f"codebooks {self.codebooks}: distinct indices in 0 .. {self.num_codebooks - 1} "
                             f"(num_codebooks {self.num_codebooks})")
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")
        bad = [d for d in self.dims if not _DIM_NAME.match(d)]
        if bad or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims {self.dims}: distinct names matching {_DIM_NAME.pattern}")
        return self


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as the model reads them: lower-cased runs of letters and digits."""
    return _WORD.findall(prompt.lower())


class MusicRewardModel(nn.Module):
    """See the module docstring. `forward(codes (B, K, T) long, prompts, mask (B, T) bool | None) -> (B, D)`."""

    def __init__(self, config: MusicRewardConfig | dict | None = None):
        super().__init__()
        self.config = c = MusicRewardConfig.model_validate(config or {})
        self.codes = nn.Embedding(c.num_codebooks * c.vocab_size, c.width)
        self.frame_pos = nn.Embedding(c.max_frames, c.width)
        self.words = nn.Embedding(c.text_buckets + 1, c.width, padding_idx=c.text_buckets)  # last row: padding
        self.word_pos = nn.Embedding(c.max_words, c.width)
        self.kind = nn.Embedding(2, c.width)  # 0: word token, 1: frame token
        layer = nn.TransformerEncoderLayer(c.width, c.heads, 2 * c.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False) if c.layers else None
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, len(c.dims))
        self.register_buffer("offsets", torch.arange(c.num_codebooks) * c.vocab_size, persistent=False)
        read = list(range(c.num_codebooks)) if c.codebooks is None else sorted(c.codebooks)
        self.register_buffer("read", torch.tensor(read, dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def check_codes(self, codes: Any, name: str = "codes") -> torch.Tensor:
        """`codes` as a long (N, K, T) tensor on the model's device, or a `ScorerError` naming `name` and what
        would be valid (an integer array, K = num_codebooks, 1 <= T <= max_frames, codes in 0 .. vocab_size - 1)."""
        c = self.config
        if not isinstance(codes, torch.Tensor):
            try:
                codes = torch.as_tensor(codes)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ScorerError(f"{name} must be an integer (N, K, T) tensor of codes, got "
                                  f"{type(codes).__name__}: {err}") from None
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ScorerError(f"{name} must hold integer codes, got dtype {codes.dtype}")
        if codes.ndim != 3:
            raise ScorerError(f"{name} must be (N, K, T) = (samples, codebooks, frames), got shape "
                              f"{tuple(codes.shape)}")
        if codes.shape[1] != c.num_codebooks:
            raise ScorerError(f"{name} has {codes.shape[1]} codebooks (shape {tuple(codes.shape)}); this model scores "
                              f"K = {c.num_codebooks}")
        if not 1 <= codes.shape[2] <= c.max_frames:
            raise ScorerError(f"{name} has {codes.shape[2]} frames; this model scores 1 .. {c.max_frames}")
        bad = (codes < 0) | (codes >= c.vocab_size)
        if bad.any():
            n, k, t = (int(i) for i in bad.nonzero()[0])
            raise ScorerError(f"{name}[{n}, {k}, {t}] = {int(codes[n, k, t])}: outside the codebook vocabulary "
                              f"0 .. {c.vocab_size - 1} ({int(bad.sum())} such codes)")
        return codes.long().to(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (B, L) (padding = text_buckets) and their mask (B, L), L >= 1 (an empty prompt: no words)."""
        c = self.config
        ids = [[zlib.crc32(w.encode()) % c.text_buckets for w in prompt_words(p)][: c.max_words] for p in prompts]
        length = max([len(i) for i in ids] + [1])
        out = torch.full((len(ids), length), c.text_buckets, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        out = out.to(self.device)
        return out, out != c.text_buckets

    def forward(self, codes: torch.Tensor, prompts: Sequence[str], mask: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, K, T) long, checked by the caller (`check_codes`); `mask` (B, T) True = a real frame (padded
        frames may hold any code in range) -> raw rewards (B, D)."""
        b, _, t = codes.shape
        mask = torch.ones((b, t), dtype=torch.bool, device=codes.device) if mask is None else mask.to(codes.device)
        read = self.read.to(codes.device)
        frames = self.codes(codes[:, read] + self.offsets[read, None]).sum(1)  # (B, T, W): read codebooks summed
        frames = frames + self.frame_pos(torch.arange(t, device=codes.device)) + self.kind.weight[1]
        if self.encoder is not None:
            words, word_mask = self.encode_prompts(prompts)
            words = self.words(words) + self.word_pos(torch.arange(words.shape[1], device=codes.device)) \
                + self.kind.weight[0]
            h = self.encoder(torch.cat([words, frames], 1), src_key_padding_mask=~torch.cat([word_mask, mask], 1))
            frames = h[:, words.shape[1]:]
        m = mask.unsqueeze(-1).to(frames.dtype)
        pooled = (self.norm(frames) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """`music_reward.safetensors` and `mmalign_scorer.json` (kind `music`, the config) in `out_dir`."""
        from safetensors.torch import save_file

        from mmalign.rewards.clip import write_scorer_card

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS_FILE))
        write_scorer_card(out, {"kind": "music", "name": self.config.name, "config": self.config.model_dump(),
                                "dims": list(self.config.dims)})
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "MusicRewardModel":
        from safetensors.torch import load_file

        from mmalign.rewards.clip import read_scorer_card

        card = read_scorer_card(folder) if Path(folder).is_dir() else None
        if card is None or card.get("kind") != "music":
            raise ScorerError(f"{folder}: not a music reward model folder (mmalign_scorer.json of kind 'music', "
                              "written by MusicRewardModel.save_pretrained)")
        model = cls(card["config"])
        missing, unexpected = model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), strict=False)
        if missing or unexpected:
            raise ScorerError(f"{folder}/{WEIGHTS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()


@torch.no_grad()
def music_pair_accuracy(model: MusicRewardModel, shards: str, max_pairs: int = 256,
                        batch_size: int = 16) -> dict[str, Any]:
    """Held-out pairwise accuracy on `music_pair` shards (read in order, at most `max_pairs`): the fraction of
    pairs whose chosen codes get the higher reward (equal rewards count 1/2), per dimension and overall (the mean
    of the dimensions' sums, one value with one dimension). Returns {"accuracy", "per_dim", "num_pairs"}."""
    from mmalign.data.collate import collate_music_pairs
    from mmalign.data.dataset import MusicPairDataset

    was_training = model.training
    model.eval()
    wins = torch.zeros(len(model.config.dims), dtype=torch.float64)
    n, chunk = 0, []
    samples = iter(MusicPairDataset(shards, shuffle=False, rank=0, world_size=1))
    while n < max_pairs:
        chunk = [s for _, s in zip(range(min(batch_size, max_pairs - n)), samples)]
        if not chunk:
            break
        batch = collate_music_pairs(chunk)
        codes = model.check_codes(batch["codes"], f"{shards}: codes of pairs {batch['keys']}")
        r = model(codes, batch["prompts"] * 2, batch["codes_mask"]).double().cpu()
        r_w, r_l = r[: len(chunk)], r[len(chunk):]
        wins += ((r_w > r_l).double() + 0.5 * (r_w == r_l).double()).sum(0)
        n += len(chunk)
    model.train(was_training)
    per_dim = {d: float(wins[j] / n) if n else None for j, d in enumerate(model.config.dims)}
    return {"accuracy": float(wins.mean() / n) if n else None, "per_dim": per_dim, "num_pairs": n}


class MusicCodeScorer(Scorer):
    """A `MusicRewardModel` behind the scorer interface: `score(codes (N, K, T) int, prompts) -> (N,)` float32
    ((N, D) with several dims). Codes are checked first (`MusicRewardModel.check_codes`)."""

    modality = "music_codes"

    def __init__(self, model: MusicRewardModel, version: str = "unversioned"):
        super().__init__()
        self.model = model.eval()
        self.name = model.config.name
        self.dims = None if len(model.config.dims) == 1 else tuple(model.config.dims)
        self.version = version

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "MusicCodeScorer":
        model = MusicRewardModel.from_pretrained(folder)
        return cls(model, version=f"{model.config.name}-{fingerprint_folder(folder)}")

    def score(self, codes: Any, prompts: str | Sequence[str]) -> torch.Tensor:
        codes = self.model.check_codes(codes)
        prompts = as_prompt_list(prompts, codes.shape[0], what="code array")
        out = self.model(codes, prompts).float()
        return out[:, 0] if self.dims is None else out
