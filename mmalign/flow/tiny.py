"""Tiny rectified-flow pipelines built from configs (tests, CPU benchmarks); nothing downloads.

`build_tiny_sd3` saves a `StableDiffusion3Pipeline` folder with the real diffusers / transformers classes at tiny
widths: an `SD3Transformer2DModel`, a `FlowMatchEulerDiscreteScheduler` (shift 3, as SD3), an `AutoencoderKL` with
SD3's scaling and shift factors, and two CLIP text encoders with projection over the toy-word tokenizer; the T5
encoder is left out (`text_encoder_3: None`, which the SD3 pipeline supports by feeding zeros in its place). It
loads back with `DiffusionPipeline.from_pretrained`, the code a real SD3 checkpoint uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmalign.models.tiny import word_clip_tokenizer


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0, width: int = 16) -> Path:
    """Save a randomly initialised tiny SD3-style pipeline (32 px images, 16x16 latents) and return its path."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
            eos_token_id=1, pad_token_id=1, projection_dim=width))

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * width,
                                        caption_projection_dim=16, pooled_projection_dim=2 * width,
                                        pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
                                    tokenizer_2=word_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained drops None components; a null entry is how a model_index says "this one is absent", so
    # from_pretrained builds the pipeline without T5 instead of refusing the folder.
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_tiny_wan(out_dir: str | os.PathLike, seed: int = 0, scheduler: str = "flow_match") -> Path:
    """Save a randomly initialised tiny Wan-2.1-style text-to-video pipeline and return its path: a
    `WanTransformer3DModel` (patch (1, 2, 2), 2 layers), an `AutoencoderKLWan` (z_dim 16, 8x spatial and 4x temporal
    compression: 9 frames at 32x32 -> 3 x 4 x 4 latents), a 1-layer UMT5 encoder over the toy-word tokenizer, and
    `FlowMatchEulerDiscreteScheduler(shift=3)` (`scheduler="unipc"`: the UniPC flow scheduler Wan checkpoints ship)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer(model_max_length=32)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8, pad_token_id=1,
                                               eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32)
    sched = (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
             if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched,
                       transformer=transformer)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_ltx(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a randomly initialised tiny LTX-Video-style text-to-video pipeline (`LTXPipeline`) and return its path:
    an `LTXVideoTransformer3DModel` (patch 1, 2 layers, 8 latent channels), an `AutoencoderKLLTXVideo` at LTX's 8x
    temporal compression (9 frames -> 2 latent frames, 8k + 1 frames as the real VAE) and 8x spatial (32x32 ->
    4x4; the real VAE is 32x), a 1-layer T5 encoder over the toy-word tokenizer, and LTX-Video's own
    `FlowMatchEulerDiscreteScheduler` config (dynamic shifting, base/max shift 0.95/2.05, shift_terminal 0.1).

    The VAE's per-channel `latents_mean` / `latents_std` buffers are random and its `scaling_factor` is 1.5 (the
    real VAE's is 1.0), so a test sees where each enters `LTXPipeline._normalize_latents`."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer(model_max_length=128)  # LTXPipeline pads prompts to 128 tokens
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8, pad_token_id=1,
                                           eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, True, False),
                                decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=1,
                                patch_size_t=1, scaling_factor=1.5)
    with torch.no_grad():
        vae.latents_mean.copy_(0.1 * torch.randn(8))
        vae.latents_std.copy_(0.5 + torch.rand(8))
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=2, caption_channels=16)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
