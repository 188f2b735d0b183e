"""Tiny SD-1.x- and SDXL-style pipelines built from configs (tests, tiny recipes, CPU benchmarks).

Real diffusers / transformers classes with small widths and random weights, saved with `save_pretrained` and
loaded back through the same `from_pretrained` code a real checkpoint uses (`assets/tiny/sd15`, `assets/tiny/sdxl`
are rebuilt by `scripts/make_tiny_assets.py`). Nothing here downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from mmalign.models.tiny import word_clip_tokenizer


def _tiny_clip_text_config(vocab_size: int, hidden: int, max_len: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=max_len, bos_token_id=0, eos_token_id=1,
                  pad_token_id=1)
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def build_tiny_sd(out_dir: str | os.PathLike, kind: Literal["sd15", "sdxl"] = "sd15", seed: int = 0,
                  prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
                  block_out_channels: tuple[int, ...] = (32, 64), cross_attention_dim: int = 32) -> Path:
    """Save a randomly initialised tiny SD-1.x-style or SDXL-style pipeline folder and return its path.

    The VAE downsamples by 2 (one down block) so 32 px images give 16x16 latents; the UNet has attention in
    its last block only. SDXL: two text encoders (the second with projection, giving pooled embeddings),
    `addition_embed_type="text_time"`, the UNet's cross-attention width the sum of both encoders' widths.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer()
    vocab_size = len(tokenizer)
    max_len = tokenizer.model_max_length
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    n = len(block_out_channels)
    down = ("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=block_out_channels, down_block_types=down, up_block_types=up,
                  norm_num_groups=8, attention_head_dim=8)
    if kind == "sd15":
        text_encoder = CLIPTextModel(_tiny_clip_text_config(vocab_size, cross_attention_dim, max_len))
        unet = UNet2DConditionModel(cross_attention_dim=cross_attention_dim, **common)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        d1, d2 = 16, 32
        text_encoder = CLIPTextModel(_tiny_clip_text_config(vocab_size, d1, max_len))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(vocab_size, d2, max_len,
                                                                            projection_dim=d2))
        unet = UNet2DConditionModel(cross_attention_dim=d1 + d2, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=d2 + 6 * 8,
                                    **common)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=word_clip_tokenizer(), unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True)
    else:
        raise ValueError(f"kind must be 'sd15' or 'sdxl', got {kind!r}")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
