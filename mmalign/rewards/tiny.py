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


# Words of the tiny CLAP tokenizer's vocabulary (music and sound captions); other words map to <unk>.
CLAP_WORDS = ("a", "an", "the", "with", "and", "of", "in", "on", "melody", "tune", "song", "music", "track", "beat",
              "piano", "guitar", "violin", "flute", "cello", "drums", "synth", "organ", "ascending", "descending",
              "repeating", "alternating", "calm", "bright", "dark", "loud", "soft", "slow", "fast", "low", "high",
              "sound", "dog", "barking", "rain", "speech", "silence", "noise")


def tiny_clap_tokenizer(words=CLAP_WORDS, model_max_length: int = 32):
    """A RoBERTa-style word-level `PreTrainedTokenizerFast` (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3 as CLAP's
    RoBERTa tokenizer; `<s> words </s>`, lower-cased). Built in memory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(("<s>", "<pad>", "</s>", "<unk>"))}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length, padding_side="right")


def build_tiny_clap_model(seed: int = 0, fusion: bool = False, projection_dim: int = 16):
    """(model, tokenizer): a randomly initialised tiny `ClapModel` (HTSAT audio tower of 2 stages on 16 mel bins,
    one-layer RoBERTa text tower) in eval mode, and its tokenizer."""
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    tok = tiny_clap_tokenizer()
    audio = ClapAudioConfig(window_size=4, num_mel_bins=16, spec_size=64, freq_ratio=2, patch_size=2, patch_stride=2,
                            patch_embeds_hidden_size=16, hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2],
                            num_hidden_layers=2, projection_dim=projection_dim, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, enable_fusion=fusion,
                            fusion_type="aff_2d" if fusion else None)
    text = ClapTextConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=tok.model_max_length + 2,
                          projection_dim=projection_dim, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    return ClapModel(config).eval(), tok


def build_tiny_clap(out_dir: str | os.PathLike, seed: int = 0, fusion: bool = False, max_length_s: int = 1) -> Path:
    """A `ClapModel` folder as on the hub (`laion/clap-htsat-unfused`'s files): weights, config, tokenizer and a
    `ClapFeatureExtractor` at LAION's 48 kHz (hop 480, FFT 1024, 50 Hz - 14 kHz) with 16 mel bins and windows of
    `max_length_s` seconds (LAION: 10)."""
    from transformers import ClapFeatureExtractor

    out = Path(out_dir)
    model, tok = build_tiny_clap_model(seed, fusion=fusion)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=480, fft_window_size=1024,
                         max_length_s=max_length_s, frequency_min=50, frequency_max=14000, padding="repeatpad",
                         truncation="fusion" if fusion else "rand_trunc").save_pretrained(out)
    return out
