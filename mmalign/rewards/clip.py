"""CLIP-style scorers: one class, three scale conventions, two preprocessings.

| scorer | weights | preprocessing | score |
|---|---|---|---|
| `clip_score` | transformers CLIPModel (default `openai/clip-vit-large-patch14`, torchmetrics' default) | center_crop | `100 * max(cos, 0)` (torchmetrics' CLIPScore, per image) |
| `pickscore` | transformers CLIPModel (`yuvalkirstain/PickScore_v1`, processor from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) | center_crop | `logit_scale.exp() * cos` |
| `hps` | an HPSv2 / v2.1 open_clip ViT-H-14 checkpoint, converted to a CLIPModel (`hpsv2.py`) | letterbox 224 | `cos` (raw) |

`cos` is the cosine between the projected image and text embeddings. Text embeddings are computed once per
distinct prompt of a call. Real checkpoints load from a local folder or a hub id through `from_pretrained`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

import torch

from mmalign.rewards.base import (Scorer, ScorerError, as_prompt_list, fingerprint_folder, split_images,
                                   unique_prompts)
from mmalign.rewards.preprocess import ImagePreprocess

SCALES = ("clip_score", "logit_scale", "cosine")
CLIP_SCORE_DEFAULT = "openai/clip-vit-large-patch14"
PICKSCORE_DEFAULT = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class CLIPScorer(Scorer):
    """A transformers `CLIPModel` + tokenizer + preprocessing + a scale convention (`SCALES`).

    The model stays a plain `CLIPModel` (export with `save_pretrained`), so a fine-tuned reward model loads back in
    transformers without mmalign.
    """

    differentiable = True  # the float-tensor path (resize, crop, normalise, towers) is differentiable

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess,
                 scale: Literal["clip_score", "logit_scale", "cosine"], name: str, version: str = "unversioned",
                 max_length: int | None = None):
        super().__init__()
        if scale not in SCALES:
            raise ScorerError(f"scale must be one of {SCALES}, got {scale!r}")
        if len(tokenizer) <= 2:
            raise ScorerError(f"scorer {name!r}: the tokenizer has {len(tokenizer)} tokens; an offline hub lookup "
                              "returns such an empty tokenizer: point the scorer at a folder that has the "
                              "tokenizer files (vocab.json, merges.txt)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.scale = scale
        self.name = name
        self.version = version
        self.max_length = max_length or model.config.text_config.max_position_embeddings

    # -- embeddings --------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixel values (N, 3, S, S) -> unit-norm image embeddings (N, D)."""
        feats = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return feats / feats.norm(dim=-1, keepdim=True)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"].to(self.device), "attention_mask": tok["attention_mask"].to(self.device)}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm text embeddings (len(prompts), D)."""
        feats = self.model.get_text_features(**self.tokenize(prompts)).pooler_output
        return feats / feats.norm(dim=-1, keepdim=True)

    def scale_scores(self, cos: torch.Tensor) -> torch.Tensor:
        """Cosine similarities -> scores in this scorer's convention."""
        cos = cos.float()
        if self.scale == "clip_score":
            return 100.0 * cos.clamp(min=0)
        if self.scale == "logit_scale":
            return self.model.logit_scale.float().exp() * cos
        return cos

    def cosines(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image, prompt) per row of preprocessed pixel values; each distinct prompt is encoded once."""
        distinct, index = unique_prompts(prompts)
        text = self.encode_text(distinct)[index.to(self.device)]
        return (self.encode_images(pixel_values) * text).sum(-1)

    def _score(self, kind, images, prompts):
        return self.scale_scores(self.cosines(self.preprocess(kind, images, device=self.device, dtype=self.dtype),
                                              prompts))

    @property
    def raw_name(self) -> str | None:
        """The per-image value `mmalign score` stores beside the scores: `"cos"` for clip_score (its clamped scores
        cannot give torchmetrics' set-level CLIP score, `max(100 * mean(cos), 0)`), else None."""
        return "cos" if self.scale == "clip_score" else None

    def score_with_raw(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """`(score(images, prompts), cosines)` from one forward pass (float32, (N,) each)."""
        kind, batch = split_images(images)
        n = batch.shape[0] if kind == "tensor" else len(batch)
        prompts = as_prompt_list(prompts, n)
        if n == 0:
            empty = torch.zeros((0,), device=self.device)
            return empty, empty
        cos = self.cosines(self.preprocess(kind, batch, device=self.device, dtype=self.dtype), prompts).float()
        return self.scale_scores(cos), cos

    # -- fine-tuning ----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Training reward of float images (N, 3, H, W) in [0, 1]: `logit_scale.exp() * cos` (the scale PickScore
        and HPSv2 are trained with), whatever `scale` the scorer reports."""
        pixels = self.preprocess.from_tensor(images.to(self.device, self.dtype))
        return self.model.logit_scale.exp() * self.cosines(pixels, prompts)

    def set_trainable(self, vision_blocks: int = -1, text_blocks: int = -1, logit_scale: bool = True) -> int:
        """See `set_trainable`."""
        return set_trainable(self.model, vision_blocks, text_blocks, logit_scale)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keep `logit_scale.exp() <= max_scale` (CLIP's clamp at 100), in place; call after optimizer steps."""
        self.model.logit_scale.clamp_(max=math.log(max_scale))

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Export a folder `load_scorer(folder)` (and transformers) loads back: the CLIPModel, its tokenizer, a
        `preprocessor_config.json` and `mmalign_scorer.json` naming the scale and preprocessing."""
        from mmalign.config import atomic_write_text

        out = Path(out_dir)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        p = self.preprocess
        atomic_write_text(out / "preprocessor_config.json", json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": True,
            "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": p.resize_to or p.size},
            "crop_size": {"height": p.size, "width": p.size}, "image_mean": list(p.mean),
            "image_std": list(p.std)}, indent=1))
        write_scorer_card(out, {"kind": "clip", "name": self.name, "scale": self.scale,
                                "preprocess": self.preprocess.to_dict(), "max_length": self.max_length})
        return out


def set_trainable(model, vision_blocks: int = -1, text_blocks: int = -1, logit_scale: bool = True) -> int:
    """Freeze a CLIPModel, then unfreeze the last `vision_blocks` / `text_blocks` transformer blocks (-1: the whole
    tower, 0: none) with the layers after them (final norms, projections); returns the trainable parameter count."""
    model.requires_grad_(False)
    for blocks, tower, tail in ((vision_blocks, model.vision_model, [model.vision_model.post_layernorm,
                                                                    model.visual_projection]),
                                (text_blocks, model.text_model, [model.text_model.final_layer_norm,
                                                                 model.text_projection])):
        layers = tower.encoder.layers
        if blocks > len(layers):
            raise ScorerError(f"asked to unfreeze {blocks} blocks, the tower has {len(layers)}")
        if blocks < 0:
            tower.requires_grad_(True)
        for layer in layers[len(layers) - blocks:] if blocks > 0 else []:
            layer.requires_grad_(True)
        if blocks != 0:
            for module in tail:
                module.requires_grad_(True)
    model.logit_scale.requires_grad_(logit_scale)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


SCORER_CARD = "mmalign_scorer.json"


def write_scorer_card(folder: str | os.PathLike, card: dict) -> None:
    from mmalign import __version__
    from mmalign.config import atomic_write_text

    atomic_write_text(Path(folder) / SCORER_CARD, json.dumps({**card, "created_by": f"mmalign {__version__}"},
                                                             indent=1))


def read_scorer_card(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / SCORER_CARD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ScorerError(f"{path}: not valid JSON: {err}") from None


def _resolve(source: str, filename: str, required: bool = True) -> str | None:
    """Local path or hub file (from the local cache when offline)."""
    from transformers.utils import cached_file

    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            if required:
                raise ScorerError(f"{source}: no {filename}")
            return None
        return path
    try:
        return cached_file(source, filename, _raise_exceptions_for_missing_entries=required)
    except OSError as err:
        if required:
            raise ScorerError(f"cannot load {filename} from {source!r}: {err}") from None
        return None


def load_clip_scorer(source: str, *, name: str, scale: str, preprocess_mode: str = "center_crop",
                     processor: str | None = None, revision: str | None = None) -> CLIPScorer:
    """A `CLIPScorer` from a CLIPModel folder or hub id. Tokenizer and `preprocessor_config.json` come from
    `processor` when given, else from `source`."""
    from transformers import AutoTokenizer, CLIPModel

    config_path = _resolve(source, "config.json")
    try:
        model = CLIPModel.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise ScorerError(f"scorer {name!r}: cannot load a CLIPModel from {source!r}: {err}") from None
    proc_source = processor or source
    tokenizer = AutoTokenizer.from_pretrained(proc_source)
    proc_path = _resolve(proc_source, "preprocessor_config.json", required=False)
    proc_cfg = json.loads(Path(proc_path).read_text()) if proc_path else {}
    preprocess = ImagePreprocess.from_processor_config(proc_cfg, mode=preprocess_mode)
    version = f"{name}-{fingerprint_folder(Path(config_path).parent)}"
    return CLIPScorer(model, tokenizer, preprocess, scale, name=name, version=version)


def clip_score(source: str = CLIP_SCORE_DEFAULT, **kwargs) -> CLIPScorer:
    """torchmetrics' CLIPScore per image: `100 * max(cos(E_image, E_text), 0)`."""
    return load_clip_scorer(source, name="clip_score", scale="clip_score", **kwargs)


def pickscore(source: str = PICKSCORE_DEFAULT, processor: str | None = None, **kwargs) -> CLIPScorer:
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos`, center-crop preprocessing. The released model
    has no tokenizer files; they come from `processor` (default: the LAION ViT-H-14 processor it was trained with)
    unless `source` has its own."""
    if processor is None and _resolve(source, "tokenizer_config.json", required=False) is None:
        processor = PICKSCORE_PROCESSOR
    return load_clip_scorer(source, name="pickscore", scale="logit_scale", processor=processor, **kwargs)
