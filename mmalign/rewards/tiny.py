"""Tiny reward models built from configs, for tests, toy recipes and CPU benchmarks (nothing is downloaded).

Each builder writes the files a real checkpoint has, so the scorers load them through the same code path:
a CLIPModel folder (`save_pretrained` + tokenizer + `preprocessor_config.json`) for clip_score / PickScore, an
open_clip-format `.pt` (`{"state_dict": ...}`) + open_clip model config for HPS, the released MLP layout for the
aesthetic predictor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmalign.models.tiny import TOY_WORDS, word_clip_tokenizer


def tiny_clip_tokenizer(words=TOY_WORDS, model_max_length: int = 16):
    """The toy-word CLIP tokenizer with `<|endoftext|>` the largest id (open_clip pools the text at the argmax id)."""
    return word_clip_tokenizer(words, model_max_length=model_max_length, special_last=True)


def tiny_open_clip_config(image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 2,
                          embed_dim: int = 16, context_length: int = 16, vocab_size: int | None = None) -> dict[str, Any]:
    """An open_clip model config (the format of open_clip's `model_configs/ViT-H-14.json`) of a tiny ViT CLIP."""
    if vocab_size is None:
        vocab_size = len(tiny_clip_tokenizer())
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": width // 2,
                           "patch_size": patch_size},
            "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": width, "heads": 2,
                         "layers": layers}}


def build_tiny_clip_model(seed: int = 0, **config: Any):
    """A randomly initialised tiny `CLIPModel` (the architecture of `tiny_open_clip_config(**config)`)."""
    from transformers import CLIPModel

    from mmalign.rewards.hpsv2 import open_clip_config_to_hf

    tok = tiny_clip_tokenizer()
    cfg = tiny_open_clip_config(**config)
    torch.manual_seed(seed)
    return CLIPModel(open_clip_config_to_hf(cfg, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                            pad_token_id=tok.pad_token_id)), tok, cfg


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0, resize_to: int | None = None, **config: Any) -> Path:
    """A CLIPModel folder as on the hub: weights, config, tokenizer, `preprocessor_config.json` (center crop)."""
    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    model, tok, cfg = build_tiny_clip_model(seed, **config)
    size = cfg["vision_cfg"]["image_size"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": resize_to or size},
                       crop_size={"height": size, "width": size}).save_pretrained(out)
    return out


def build_tiny_hps(out_dir: str | os.PathLike, seed: int = 0, **config: Any) -> tuple[Path, Path, Path]:
    """An HPS-style release: `hps.pt` (`{"state_dict": open_clip keys}`, as HPS_v2.1_compressed.pt), the open_clip
    model config `open_clip_config.json` and a tokenizer folder. Returns (checkpoint, config, tokenizer dir)."""
    from mmalign.rewards.hpsv2 import hf_to_open_clip_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, cfg = build_tiny_clip_model(seed, **config)
    sd = hf_to_open_clip_state_dict(model)
    # open_clip keeps the causal mask as a buffer in its state dict; real checkpoints carry it.
    n = cfg["text_cfg"]["context_length"]
    sd["attn_mask"] = torch.full((n, n), float("-inf")).triu_(1)
    torch.save({"epoch": 1, "name": "tiny-hps", "state_dict": sd}, out / "hps.pt")
    (out / "open_clip_config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(out / "tokenizer")
    return out / "hps.pt", out / "open_clip_config.json", out / "tokenizer"


def build_tiny_aesthetic(out_dir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """An aesthetic-predictor release: `mlp.pth` (a plain state dict, the layout of
    sac+logos+ava1-l14-linearMSE.pth) and a CLIP image-tower folder. Returns (mlp file, clip folder)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from mmalign.rewards.laion_aesthetic import AestheticMLP

    out = Path(out_dir)
    model, _, cfg = build_tiny_clip_model(seed)
    vision_config = model.config.vision_config
    vision_config.projection_dim = cfg["embed_dim"]
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    vision.save_pretrained(out / "clip", safe_serialization=True)
    size = cfg["vision_cfg"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        out / "clip")
    torch.manual_seed(seed + 1)
    mlp = AestheticMLP(cfg["embed_dim"], hidden=(1024, 128, 64, 16))
    torch.save(mlp.state_dict(), out / "mlp.pth")
    return out / "mlp.pth", out / "clip"
