"""The LAION aesthetic predictor (improved-aesthetic-predictor, Schuhmann 2022): an MLP on the unit-norm CLIP
ViT-L/14 image embedding; the prompt is ignored.

The MLP's layout matches the released `sac+logos+ava1-l14-linearMSE.pth` state dict (`layers.0/2/4/6/7`), so that
file loads as it is (with `torch.load(weights_only=True)`). The CLIP image tower is transformers'
`CLIPVisionModelWithProjection` (default `openai/clip-vit-large-patch14`), center-crop preprocessing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mmalign.rewards.base import Scorer, ScorerError, fingerprint_files
from mmalign.rewards.clip import _resolve, read_scorer_card, write_scorer_card
from mmalign.rewards.hpsv2 import load_state_dict_file
from mmalign.rewards.preprocess import ImagePreprocess

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
MLP_FILE = "aesthetic_mlp.safetensors"


class AestheticMLP(nn.Module):
    """Linear(d, h0) Dropout(.2) Linear(h0, h1) Dropout(.2) Linear(h1, h2) Dropout(.1) Linear(h2, h3) Linear(h3, 1)."""

    def __init__(self, input_size: int = 768, hidden: tuple[int, int, int, int] = (1024, 128, 64, 16)):
        super().__init__()
        h0, h1, h2, h3 = hidden
        self.input_size, self.hidden = input_size, tuple(hidden)
        self.layers = nn.Sequential(nn.Linear(input_size, h0), nn.Dropout(0.2), nn.Linear(h0, h1), nn.Dropout(0.2),
                                    nn.Linear(h1, h2), nn.Dropout(0.1), nn.Linear(h2, h3), nn.Linear(h3, 1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


class AestheticScorer(Scorer):
    name = "aesthetic"
    differentiable = True

    def __init__(self, vision, mlp: AestheticMLP, preprocess: ImagePreprocess, version: str = "unversioned"):
        super().__init__()
        if vision.config.projection_dim != mlp.input_size:
            raise ScorerError(f"aesthetic: the MLP takes {mlp.input_size}-d embeddings, the CLIP image tower gives "
                              f"{vision.config.projection_dim}")
        self.vision = vision.eval()
        self.mlp = mlp.eval()
        self.preprocess = preprocess
        self.version = version

    def _score(self, kind, images, prompts):
        pixels = self.preprocess(kind, images, device=self.device, dtype=self.dtype)
        emb = self.vision(pixel_values=pixels).image_embeds
        return self.mlp(emb / emb.norm(dim=-1, keepdim=True))

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        self.vision.save_pretrained(out / "clip", safe_serialization=True)
        save_file(self.mlp.state_dict(), str(out / MLP_FILE))
        write_scorer_card(out, {"kind": "aesthetic", "name": self.name, "hidden": list(self.mlp.hidden),
                                "preprocess": self.preprocess.to_dict()})
        return out


def aesthetic(source: str | None = None, *, mlp: str | None = None, clip: str = AESTHETIC_CLIP) -> AestheticScorer:
    """source: a folder written by `AestheticScorer.save_pretrained`; or give `mlp` (the released `.pth` or a
    `.safetensors` state dict) and `clip` (a CLIP folder or hub id)."""
    from transformers import CLIPVisionModelWithProjection

    hidden = (1024, 128, 64, 16)
    preprocess = None
    if source is not None:
        card = read_scorer_card(source)
        if card is None or card.get("kind") != "aesthetic":
            raise ScorerError(f"{source}: not an aesthetic scorer folder (no mmalign_scorer.json of kind "
                              "'aesthetic'); pass mlp=FILE and clip=FOLDER_OR_HUB_ID instead")
        hidden = tuple(card["hidden"])
        preprocess = ImagePreprocess(**card["preprocess"])
        mlp, clip = os.path.join(source, MLP_FILE), os.path.join(source, "clip")
    if mlp is None:
        raise ScorerError("aesthetic: give a scorer folder, or mlp=PATH to the predictor weights "
                          "(sac+logos+ava1-l14-linearMSE.pth)")
    vision = CLIPVisionModelWithProjection.from_pretrained(clip)
    head = AestheticMLP(vision.config.projection_dim, hidden)
    head.load_state_dict(load_state_dict_file(mlp))
    if preprocess is None:
        proc = _resolve(clip, "preprocessor_config.json", required=False)
        preprocess = ImagePreprocess.from_processor_config(json.loads(Path(proc).read_text()) if proc else {})
    files = [Path(mlp), Path(_resolve(clip, "config.json"))]
    return AestheticScorer(vision, head, preprocess, version=f"aesthetic-{fingerprint_files(files)}")
