"""HPS (Human Preference Score v2 / v2.1, Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on HPDv2.

The released checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt` in the hub repo `xswu/HPSv2`) are
open_clip state dicts. open_clip's ViT is the original CLIP architecture, which transformers' `CLIPModel`
implements exactly, so we convert the state dict (the key mapping of transformers'
`convert_clip_original_pytorch_to_hf.py`: `in_proj` split into q/k/v, projections transposed) and score with the
same `CLIPScorer` as PickScore. This avoids open_clip's torchvision dependency at scoring time (see
docs/rewards.md) and keeps one code path for every CLIP-style scorer.

Loading is safe: `.safetensors`, or `torch.load(weights_only=True)` for `.pt` files (tensors and plain containers
only; no arbitrary objects are unpickled).

Model configs use open_clip's JSON format (`open_clip/model_configs/ViT-H-14.json`), so a tiny test config can be
registered with open_clip as well. HPS scores are the raw cosine with letterbox preprocessing to 224, as
`hpsv2.score` computes them (`image_features @ text_features.T`, no logit scale). The preprocessing is HPSv2's
`preprocess_val` op for op (float resize, no clamp, no uint8 step; `preprocess.py`): its pixels equal HPSv2's on
sharp images to 0 (torchvision >= 0.17, whose tensor resize antialiases), and the image / text features equal
HPSv2's open_clip to 1.8e-7.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmalign.rewards.base import ScorerError, fingerprint_files
from mmalign.rewards.clip import CLIPScorer, read_scorer_card, write_scorer_card
from mmalign.rewards.preprocess import ImagePreprocess

VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
_IGNORED = {"attn_mask"}  # open_clip's causal-mask buffer (rebuilt by transformers)


def open_clip_config_to_hf(cfg: dict[str, Any], eos_token_id: int = 49407, bos_token_id: int = 49406,
                           pad_token_id: int = 49407):
    """An open_clip model config (ViT only, standard text tower) -> `transformers.CLIPConfig`."""
    from transformers import CLIPConfig

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    unsupported = {k for k in v if k not in ("image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio")}
    unsupported |= {k for k in t if k not in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
    if unsupported or "timm_model_name" in v or "hf_model_name" in t:
        raise ScorerError(f"open_clip config has options this converter does not map: {sorted(unsupported)}; "
                          "only the original CLIP ViT architecture (e.g. ViT-H-14) is supported")
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vw = int(v["width"])
    return CLIPConfig(
        projection_dim=int(cfg["embed_dim"]),
        text_config={"vocab_size": int(t["vocab_size"]), "hidden_size": int(t["width"]),
                     "intermediate_size": int(t["width"] * t.get("mlp_ratio", 4.0)),
                     "num_hidden_layers": int(t["layers"]), "num_attention_heads": int(t["heads"]),
                     "max_position_embeddings": int(t["context_length"]), "hidden_act": act,
                     "layer_norm_eps": 1e-5, "eos_token_id": eos_token_id, "bos_token_id": bos_token_id,
                     "pad_token_id": pad_token_id},
        vision_config={"hidden_size": vw, "intermediate_size": int(vw * v.get("mlp_ratio", 4.0)),
                       "num_hidden_layers": int(v["layers"]), "num_attention_heads": vw // int(v.get("head_width", 64)),
                       "image_size": int(v["image_size"]), "patch_size": int(v["patch_size"]), "hidden_act": act,
                       "layer_norm_eps": 1e-5},
    )


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def open_clip_to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP keys -> transformers CLIPModel keys. Unknown keys are an error (no silent partial load)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif ".resblocks." in key:
            prefix, rest = key.split(".resblocks.", 1)
            tower = {"transformer": "text_model", "visual.transformer": "vision_model"}.get(prefix)
            idx, name = rest.split(".", 1)
            base = f"{tower}.encoder.layers.{idx}"
            if tower is None:
                unknown.append(key)
            elif name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[-1]
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}.self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            else:
                module, _, leaf = name.rpartition(".")
                if module not in _BLOCK:
                    unknown.append(key)
                else:
                    out[f"{base}.{_BLOCK[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ScorerError(f"open_clip state dict has keys this converter does not know: {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''}; only the original CLIP ViT layout is supported")
    return out


def hf_to_open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """The inverse of `open_clip_to_hf_state_dict`: export a (fine-tuned) CLIPModel as an open_clip state dict."""
    sd = model.state_dict()
    top = {v: k for k, v in _TOP.items()}
    trans = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        elif key in trans:
            out[trans[key]] = value.t().contiguous()
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.", 1)
            prefix = {"text_model": "transformer", "vision_model": "visual.transformer"}[tower]
            idx, name = rest.split(".", 1)
            module, _, leaf = name.rpartition(".")
            base = f"{prefix}.resblocks.{idx}"
            if module.startswith("self_attn.") and module[len("self_attn."):] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(f"{base}.attn.in_proj_{leaf}", {})[module[len("self_attn.")]] = value
            else:
                out[f"{base}.{block[module]}.{leaf}"] = value
        elif key.endswith("position_ids"):
            continue
        else:
            raise ScorerError(f"CLIPModel key {key!r} has no open_clip counterpart")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0).contiguous()
    return out


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, or from a torch file with `weights_only=True` (a `{"state_dict": ...}` wrapper
    and a DDP `module.` prefix are unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ScorerError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the unpickler raises UnpicklingError, RuntimeError, ... for refused content
            raise ScorerError(f"{path}: not loadable with torch.load(weights_only=True) (only tensors and plain "
                              f"containers are read, never arbitrary objects): {err}") from None
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ScorerError(f"{path}: expected a state dict of tensors (optionally under 'state_dict')")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def clip_model_from_open_clip(sd: dict[str, torch.Tensor], cfg: dict[str, Any], tokenizer):
    """A transformers CLIPModel holding an open_clip checkpoint (weights assigned, no random init pass)."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    config = open_clip_config_to_hf(cfg, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    with init_empty_weights():
        model = CLIPModel(config)
    converted = open_clip_to_hf_state_dict(sd)
    result = model.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ScorerError(f"checkpoint does not match the model config: missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    return model.float().eval()


def hps(source: str | None = None, *, version: str = "v2.1", tokenizer: str | None = None,
        model_config: dict[str, Any] | str | None = None) -> CLIPScorer:
    """The HPS scorer.

    source: a checkpoint file (`.pt` / `.safetensors`), a folder exported by `save_hps_folder`, or None to take
    `HPS_FILES[version]` from the hub repo `xswu/HPSv2` (cached; offline runs need it downloaded beforehand).
    tokenizer: a CLIP tokenizer folder or hub id (default: the folder's own, else the LAION ViT-H-14 one).
    model_config: an open_clip model config (dict or JSON path); default the folder's, else ViT-H-14.
    """
    from transformers import AutoTokenizer

    if source is None:
        if version not in HPS_FILES:
            raise ScorerError(f"HPS version must be one of {sorted(HPS_FILES)}, got {version!r}")
        from huggingface_hub import hf_hub_download

        source = hf_hub_download(HPS_REPO, HPS_FILES[version])
    path = Path(source)
    if path.is_dir():
        card = read_scorer_card(path) or {}
        weights = path / OPEN_CLIP_WEIGHTS
        model_config = model_config or str(path / OPEN_CLIP_CONFIG)
        tokenizer = tokenizer or str(path)
        preprocess = ImagePreprocess(**card["preprocess"]) if "preprocess" in card else None
    else:
        weights, preprocess = path, None
    if isinstance(model_config, str):
        model_config = json.loads(Path(model_config).read_text())
    cfg = model_config or VIT_H_14
    tok = AutoTokenizer.from_pretrained(tokenizer or HPS_TOKENIZER)
    model = clip_model_from_open_clip(load_state_dict_file(weights), cfg, tok)
    if preprocess is None:
        preprocess = ImagePreprocess(mode="letterbox", size=int(cfg["vision_cfg"]["image_size"]))
    files = [weights] + ([path / OPEN_CLIP_CONFIG] if path.is_dir() else [])
    return CLIPScorer(model, tok, preprocess, "cosine", name="hps", version=f"hps-{fingerprint_files(files)}",
                      max_length=int(cfg["text_cfg"]["context_length"]))


def save_hps_folder(scorer: CLIPScorer, cfg: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Export an HPS-style CLIPScorer as an open_clip checkpoint folder that `hps(folder)` loads back (and
    open_clip users load with `model.load_state_dict(safetensors.torch.load_file(...))`)."""
    from safetensors.torch import save_file

    from mmalign.config import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_to_open_clip_state_dict(scorer.model), str(out / OPEN_CLIP_WEIGHTS))
    atomic_write_text(out / OPEN_CLIP_CONFIG, json.dumps(cfg, indent=1))
    scorer.tokenizer.save_pretrained(out)
    write_scorer_card(out, {"kind": "hps", "name": scorer.name, "scale": scorer.scale,
                            "preprocess": scorer.preprocess.to_dict()})
    return out
