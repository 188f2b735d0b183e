"""CLAP text–audio scorer: how well a clip matches its prompt (LAION-CLAP, Wu et al. 2023), for music and audio.

    scorer = load_scorer("clap")                              # laion/clap-htsat-unfused, or clap=FOLDER
    scores = scorer.score(waveforms, prompts, sample_rate=32000)   # (N,) cosines in [-1, 1]

A transformers `ClapModel` with its tokenizer and `ClapFeatureExtractor` (the two halves of `ClapProcessor`):

    a = normalize(audio_projection(HTSAT(log-mel(clip at the extractor's rate))))
    t = normalize(text_projection(RoBERTa(prompt)))
    cos = a · t

`scale` picks what is reported: `"cosine"` (default) is `cos`, the "CLAP score" text-to-audio evaluations report;
`"logit_scale"` is `exp(logit_scale_a) · cos`, the diagonal of transformers' `ClapModel(...).logits_per_audio`
(LAION-CLAP learns one temperature per direction, `logit_scale_a` for audio-to-text logits and `logit_scale_t` for
text-to-audio; the CLAP paper's single learned temperature 1/τ plays that part).

Audio: see `mmalign.rewards.audio` for the accepted forms. Each clip is mixed to mono and resampled to the feature
extractor's `sampling_rate` (48 kHz for LAION's checkpoints) with libswresample (`mmalign.rewards.audio.resample`).
The model sees windows of the extractor's `max_length_s` (10 s for LAION's); a shorter clip is repeated and
zero-padded to one window by the extractor (`padding="repeatpad"`), as LAION-CLAP does. A longer clip
(`long_audio`): `"windows"` (default) embeds consecutive windows (the last one shorter) and averages their unit
embeddings weighted by their duration, then renormalises; `"first"` keeps the first window only.

Scores are deterministic and do not depend on the batch: the extractor's random crops (`rand_trunc`) and random
fusion crops never run, since no window is longer than `max_length_s`; and `is_longer` is False for every window
(the extractor marks one random clip of a batch without long clips as longer, a training-time device), so a fused
checkpoint (`laion/clap-htsat-fused`) embeds every window with its global branch, as LAION-CLAP does at inference
for clips of at most 10 s. Not differentiable (the log-mel features are computed in NumPy).

`save_pretrained` exports the model, tokenizer and `preprocessor_config.json` (they load back in transformers with
`ClapModel` / `ClapProcessor.from_pretrained`) and `mmalign_scorer.json` (kind `clap`, name, scale, long_audio);
`load_scorer(FOLDER)` loads it back. The version is a fingerprint of the model's files plus the scale and
long-audio policy, so stored scores of different settings never mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from mmalign.rewards.audio import check_sample_rate, resample, split_audio
from mmalign.rewards.base import Scorer, ScorerError, as_prompt_list, fingerprint_folder, unique_prompts

CLAP_DEFAULT = "laion/clap-htsat-unfused"
SCALES = ("cosine", "logit_scale")
LONG_AUDIO = ("windows", "first")


class ClapScorer(Scorer):
    """A transformers `ClapModel` + tokenizer + `ClapFeatureExtractor` + a scale and a long-audio policy; see the
    module docstring."""

    modality = "audio"
    differentiable = False

    def __init__(self, model, tokenizer, feature_extractor, *, scale: Literal["cosine", "logit_scale"] = "cosine",
                 long_audio: Literal["windows", "first"] = "windows", name: str = "clap",
                 version: str = "unversioned"):
        super().__init__()
        if scale not in SCALES:
            raise ScorerError(f"scale must be one of {SCALES}, got {scale!r}")
        if long_audio not in LONG_AUDIO:
            raise ScorerError(f"long_audio must be one of {LONG_AUDIO}, got {long_audio!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.scale, self.long_audio = scale, long_audio
        self.name, self.version = name, version
        text = model.config.text_config
        # RoBERTa positions start after the pad id: a sequence of L tokens reads positions pad + 1 .. pad + L.
        limit = text.max_position_embeddings - (text.pad_token_id if text.pad_token_id is not None else 0) - 1
        self.max_length = min(limit, getattr(tokenizer, "model_max_length", limit) or limit)
        self.truncation = "fusion" if model.config.audio_config.enable_fusion else "rand_trunc"

    @property
    def sampling_rate(self) -> int:
        """The rate (Hz) the model's features are computed at; audio is resampled to it."""
        return int(self.feature_extractor.sampling_rate)

    @property
    def window(self) -> int:
        """Samples (at `sampling_rate`) of one model window: the extractor's max_length_s seconds."""
        return int(self.feature_extractor.nb_max_samples)

    # -- embeddings --------------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm text embeddings (len(prompts), D)."""
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        feats = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                             attention_mask=tok["attention_mask"].to(self.device)).pooler_output
        return feats / feats.norm(dim=-1, keepdim=True)

    def windows(self, clip: np.ndarray) -> list[np.ndarray]:
        """The model windows of one clip at `sampling_rate` (see `long_audio`)."""
        w = self.window
        if clip.size <= w or self.long_audio == "first":
            return [clip[:w]]
        return [clip[i:i + w] for i in range(0, clip.size, w)]

    def encode_audio(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """Mono clips (samples,) at `sampling_rate` -> unit-norm audio embeddings (N, D): a clip of at most one
        window is embedded as is; a longer one as the duration-weighted mean of its windows' unit embeddings,
        renormalised."""
        windows, owner, weight = [], [], []
        for i, clip in enumerate(clips):
            for w in self.windows(np.asarray(clip, dtype=np.float64)):
                windows.append(w)
                owner.append(i)
                weight.append(w.size)
        feats = self.feature_extractor(windows, sampling_rate=self.sampling_rate, truncation=self.truncation,
                                       return_tensors="pt")
        is_longer = torch.zeros((len(windows), 1), dtype=torch.bool, device=self.device)
        emb = self.model.get_audio_features(input_features=feats["input_features"].to(self.device, self.dtype),
                                            is_longer=is_longer).pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        if len(windows) == len(clips):
            return emb
        w = torch.tensor(weight, dtype=emb.dtype, device=emb.device).unsqueeze(-1)
        index = torch.tensor(owner, device=emb.device)
        pooled = torch.zeros((len(clips), emb.shape[-1]), dtype=emb.dtype, device=emb.device)
        pooled.index_add_(0, index, emb * w)
        return pooled / pooled.norm(dim=-1, keepdim=True)

    def cosines(self, clips: Sequence[np.ndarray], prompts: list[str]) -> torch.Tensor:
        """cos(audio, prompt) per clip (mono, at `sampling_rate`); each distinct prompt is encoded once."""
        distinct, index = unique_prompts(prompts)
        text = self.encode_text(distinct)[index.to(self.device)]
        return (self.encode_audio(clips) * text).sum(-1)

    def scale_scores(self, cos: torch.Tensor) -> torch.Tensor:
        cos = cos.float()
        if self.scale == "logit_scale":
            return self.model.logit_scale_a.float().exp() * cos
        return cos

    def score(self, audio: Any, prompts: str | Sequence[str], *, sample_rate: Any = None) -> torch.Tensor:
        """(N,) float32 scores of N clips at `sample_rate` Hz (required) against their prompts."""
        if sample_rate is None:
            raise ScorerError(f"scorer {self.name!r}: sample_rate is required (the rate, in Hz, of the audio "
                              f"given; it is resampled to {self.sampling_rate} Hz)")
        rate = check_sample_rate(sample_rate)
        clips = split_audio(audio)
        prompts = as_prompt_list(prompts, len(clips), what="clip")
        if not clips:
            return torch.zeros((0,), device=self.device)
        clips = [resample(c, rate, self.sampling_rate) for c in clips]
        return self.scale_scores(self.cosines(clips, prompts))

    # -- export ------------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Export a folder `load_scorer(folder)` and transformers (`ClapModel`, `ClapProcessor`) load back."""
        from mmalign.rewards.clip import write_scorer_card

        out = Path(out_dir)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        self.feature_extractor.save_pretrained(out)
        write_scorer_card(out, {"kind": "clap", "name": self.name, "scale": self.scale,
                                "long_audio": self.long_audio})
        return out


def load_clap_scorer(source: str, *, name: str = "clap", scale: str = "cosine", long_audio: str = "windows",
                     revision: str | None = None) -> ClapScorer:
    """A `ClapScorer` from a `ClapModel` folder or hub id holding the model, its tokenizer and
    `preprocessor_config.json` (a `ClapFeatureExtractor`)."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    from mmalign.rewards.clip import _resolve

    config_path = _resolve(source, "config.json")
    model_type = json.loads(Path(config_path).read_text()).get("model_type")
    if model_type != "clap":
        raise ScorerError(f"scorer {name!r}: {source} holds a {model_type!r} model, not a CLAP model (model_type "
                          "'clap', e.g. laion/clap-htsat-unfused)")
    try:
        model = ClapModel.from_pretrained(source, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        feature_extractor = ClapFeatureExtractor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise ScorerError(f"scorer {name!r}: cannot load a ClapModel with its tokenizer and feature extractor "
                          f"(preprocessor_config.json) from {source!r}: {err}") from None
    version = f"{name}-{fingerprint_folder(Path(config_path).parent)}-{scale}-{long_audio}"
    return ClapScorer(model, tokenizer, feature_extractor, scale=scale, long_audio=long_audio, name=name,
                      version=version)


def clap(source: str = CLAP_DEFAULT, **kwargs) -> ClapScorer:
    """The CLAP score (cosine of LAION-CLAP's audio and text embeddings) with `laion/clap-htsat-unfused` by
    default; `kwargs`: scale, long_audio, name, revision (`load_clap_scorer`)."""
    return load_clap_scorer(source, **kwargs)
