"""Scorers by name: `load_scorer("pickscore")`, `load_scorer("hps=/ckpt/HPS_v2.1_compressed.pt")`,
`load_scorer("runs/rm/export")` (a folder with `mmalign_scorer.json`), `load_scorer("my_pkg.rewards:fn")`,
`load_scorer("clap")` (audio: `laion/clap-htsat-unfused`, or `clap=FOLDER`), `load_scorer("runs/rm/reward_model")`
of a music reward model (card kind `music`, or `music=FOLDER`: a `MusicCodeScorer`, modality "music_codes",
`score(codes (N, K, T), prompts)`).

Spec grammar: `NAME`, `NAME=SOURCE` (a local folder / file or a hub id), `FOLDER` (an exported reward model), or
`package.module:function`. Folders of models that do not score plain images (kind `latent`: noisy latents;
`step_aware`: one-step estimates at a noise level t) are refused, naming the class that loads them.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import torch

from mmalign.rewards.base import Scorer, ScorerError, check_scorer_name


def _clip_score(source):
    from mmalign.rewards.clip import clip_score

    return clip_score(source) if source else clip_score()


def _pickscore(source):
    from mmalign.rewards.clip import pickscore

    return pickscore(source) if source else pickscore()


def _hps(source):
    from mmalign.rewards.hpsv2 import hps

    if source in ("v2.0", "v2.1"):
        return hps(version=source)
    return hps(source)


def _aesthetic(source):
    from mmalign.rewards.laion_aesthetic import aesthetic

    if source is None:
        raise ScorerError("aesthetic needs a source: aesthetic=FOLDER (exported) or use "
                          "mmalign.rewards.laion_aesthetic.aesthetic(mlp=..., clip=...) from Python")
    return aesthetic(source)


def _video(source):
    from mmalign.rewards.video import VideoScorer

    if source is None:
        raise ScorerError("video needs a source: video=FOLDER (a folder written by VideoRewardModel.save_pretrained)")
    return VideoScorer.from_pretrained(source)


def _music(source):
    from mmalign.rewards.music import MusicCodeScorer

    if source is None:
        raise ScorerError("music needs a source: music=FOLDER (a folder written by MusicRewardModel.save_pretrained, "
                          "e.g. the reward task's RUN/reward_model of model.kind music)")
    return MusicCodeScorer.from_pretrained(source)


def _clap(source):
    from mmalign.rewards.clap import clap

    return clap(source) if source else clap()


def _toy(component: str) -> Callable:
    def build(source):
        from mmalign.rewards.toy import ToyScorer

        if source:
            raise ScorerError(f"toy scorers take no source, got {source!r}")
        return ToyScorer(component)

    return build


def _toy_video(source):
    from mmalign.rewards.toy import ToyVideoScorer

    if source:
        raise ScorerError(f"toy_video takes no source, got {source!r}")
    return ToyVideoScorer()


SCORERS: dict[str, Callable[[str | None], Scorer]] = {
    "clip_score": _clip_score, "pickscore": _pickscore, "hps": _hps, "aesthetic": _aesthetic, "video": _video,
    "clap": _clap, "music": _music,
    "toy": _toy("all"), "toy_color": _toy("color"), "toy_color_soft": _toy("color_soft"),
    "toy_shape": _toy("shape"), "toy_position": _toy("position"), "toy_total": _toy("total"),
    "toy_brightness": _toy("brightness"), "toy_video": lambda source: _toy_video(source),
}
# Scorers whose score is differentiable in the image tensor (CLIP towers on the tensor path, the soft toy rewards):
# what gradient guidance can use. Known by name, so a wrong choice is refused before any weights load.
DIFFERENTIABLE = frozenset({"clip_score", "pickscore", "hps", "aesthetic", "toy_color_soft", "toy_brightness"})
_DIFFERENTIABLE_KINDS = {"clip": True, "hps": True, "aesthetic": True, "video": False, "clap": False,
                         "latent": True, "step_aware": True, "music": False}
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _from_folder(folder: str) -> Scorer:
    from mmalign.rewards.clip import CLIPScorer, read_scorer_card

    card = read_scorer_card(folder)
    if card is None:
        raise ScorerError(f"{folder}: not an exported reward model (no mmalign_scorer.json); use NAME=FOLDER with "
                          f"NAME one of {sorted(SCORERS)}")
    if "name" in card:  # checked before any weights load: the name becomes the output sub-folder of `mmalign score`
        check_scorer_name(card["name"], where=_card_path(folder))
    kind = card.get("kind")
    if kind == "clip":
        from mmalign.rewards.clip import load_clip_scorer
        from mmalign.rewards.preprocess import ImagePreprocess

        scorer = load_clip_scorer(folder, name=card.get("name", "clip"), scale=card["scale"],
                                  preprocess_mode=card["preprocess"]["mode"])
        scorer.preprocess = ImagePreprocess(**card["preprocess"])
        return scorer
    if kind == "hps":
        from mmalign.rewards.hpsv2 import hps

        scorer: CLIPScorer = hps(folder)
        scorer.name = card.get("name", "hps")
        return scorer
    if kind in ("aesthetic", "video", "music"):
        return SCORERS[kind](folder)
    if kind == "clap":
        from mmalign.rewards.clap import load_clap_scorer

        return load_clap_scorer(folder, name=card.get("name", "clap"), scale=card.get("scale", "cosine"),
                                long_audio=card.get("long_audio", "windows"))
    if kind == "latent":
        raise ScorerError(f"{folder}: a noisy-latent reward model scores latents x_t at a noise level, not images; "
                          "use it for guidance (`mmalign guide`, rewards: latent=FOLDER) or load it with "
                          "mmalign.rewards.latent.LatentRewardModel.from_pretrained")
    if kind == "step_aware":
        raise ScorerError(f"{folder}: a step-aware preference model scores a generator's one-step x0 estimates at a "
                          "noise level t, score(images, prompts, t), not plain images; load it with "
                          "mmalign.rewards.step_aware.StepAwareScorer.from_pretrained (SPO's step-wise sampling "
                          "and training use it that way)")
    raise ScorerError(f"{folder}: unknown scorer kind {kind!r} in mmalign_scorer.json")


def scorer_kind(spec: str) -> str:
    """What a spec names, read without loading weights: "latent" for a noisy-latent reward model folder
    (`mmalign.rewards.latent`, used by guidance on noisy latents), "step_aware" for a step-aware preference model
    folder (`mmalign.rewards.step_aware`, scores at a noise level t; `load_scorer` refuses it), else "image" (or
    "video" for video scorers, "audio" for audio scorers: clap, a user function with `fn.modality = "audio"`;
    "music_codes" for a music reward model, which scores MusicGen codes)."""
    from mmalign.rewards.clip import read_scorer_card

    name, eq, source = spec.strip().partition("=")
    folder = source if eq else spec.strip()
    card_kind = (read_scorer_card(folder) or {}).get("kind") if os.path.isdir(folder) else None
    if (eq and name == "latent") or card_kind == "latent":
        return "latent"
    if card_kind == "step_aware":
        return "step_aware"
    if name in ("video", "toy_video") or card_kind == "video":
        return "video"
    if name == "clap" or card_kind == "clap":
        return "audio"
    if name == "music" or card_kind == "music":
        return "music_codes"
    if not eq and _FUNCTION.match(spec.strip()):  # a user function says `fn.modality = "video"` (or "audio")
        from mmalign.rewards.toy import load_function

        return load_function(spec.strip()).modality
    return "image"


def is_differentiable(spec: str) -> bool:
    """Whether the scorer a spec names is differentiable in its input, decided without loading weights (a user
    function is imported and says so with `fn.differentiable = True`). Unknown specs raise ScorerError."""
    from mmalign.rewards.clip import read_scorer_card

    spec = spec.strip()
    name, eq, source = spec.partition("=")
    if eq and name == "latent":
        return True
    folder = source if eq else spec
    if os.path.isdir(folder):
        card = read_scorer_card(folder)
        if card is not None:
            return _DIFFERENTIABLE_KINDS.get(card.get("kind"), False)
    if not eq and _FUNCTION.match(spec):
        from mmalign.rewards.toy import load_function

        return load_function(spec).differentiable
    if name in SCORERS:
        return name in DIFFERENTIABLE
    raise ScorerError(f"unknown scorer {spec!r}: use one of {sorted(SCORERS)} (optionally NAME=SOURCE), an "
                      "exported reward-model folder, latent=FOLDER (a noisy-latent reward model), or "
                      "package.module:function")


def _card_path(folder: str) -> str:
    from mmalign.rewards.clip import SCORER_CARD

    return os.path.join(folder, SCORER_CARD)


def _checked(scorer: Scorer, source: str | None) -> Scorer:
    """The built scorer, if its name (possibly read from a scorer card) is a safe folder name."""
    card = _card_path(source) if source and os.path.isfile(_card_path(source)) else None
    check_scorer_name(scorer.name, where=card or f"scorer {source or ''}".strip())
    return scorer


def load_scorer(spec: str, *, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> Scorer:
    """Build a scorer from a spec (see the module docstring), on `device` in `dtype` (default: CPU, float32)."""
    spec = spec.strip()
    if not spec:
        raise ScorerError("empty scorer spec")
    name, eq, source = spec.partition("=")
    if not eq and os.path.isdir(spec):
        scorer = _from_folder(spec)
    elif not eq and _FUNCTION.match(spec):
        from mmalign.rewards.toy import load_function

        scorer = load_function(spec)
    elif name in SCORERS:
        if source and os.path.isdir(source) and name not in ("aesthetic", "video", "music"):
            from mmalign.rewards.clip import read_scorer_card

            if read_scorer_card(source) is not None:
                scorer = _checked(_from_folder(source), source)
                return scorer.to(device=device, dtype=dtype) if (device or dtype) else scorer
        scorer = SCORERS[name](source or None)
    else:
        raise ScorerError(f"unknown scorer {spec!r}: use one of {sorted(SCORERS)} (optionally NAME=SOURCE), an "
                          "exported reward-model folder, or package.module:function")
    scorer = _checked(scorer, spec if not eq else source)
    if device is not None or dtype is not None:
        scorer = scorer.to(device=device, dtype=dtype)
    return scorer
