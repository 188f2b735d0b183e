"""The toy world's text-to-video model: a pixel-space rectified-flow pipeline small enough to train on a CPU.

`ToyVideoPipeline` is a `DiffusionPipeline` with the components of a Wan pipeline minus the VAE: a
`WanTransformer3DModel` that works on RGB clips directly (`in_channels = out_channels = 3`, patches of 1 frame x 4 x
4 pixels), a 1-layer CLIP text encoder over the toy-word tokenizer, and a `FlowMatchEulerDiscreteScheduler`. It
saves and loads with `save_pretrained` / `from_pretrained` and takes Wan LoRA files with `load_lora_weights`.

Convention (the Flow-DPO losses and samplers rely on it):

- clips ``x0`` are float (B, C=3, F, H, W) in [-1, 1] (Wan's layout), F = 9, H = W = 32 in the toy contract;
- rectified flow: ``x_t = (1 - t) x0 + t noise``, t in [0, 1], noise ~ N(0, I);
- the transformer is called as ``transformer(x_t, timestep=1000 * t, encoder_hidden_states=e).sample`` with t a
  float (B,) tensor and ``e = text_encoder(ids).last_hidden_state`` (B, L, D) (`encode_prompt`), and predicts the
  velocity ``v = noise - x0`` (not x0);
- sampling integrates ``dx/dt = v`` from t = 1 (pure noise) to t = 0 with the scheduler's Euler steps
  (``x <- x + (t_next - t) v``); the scheduler's timesteps are exactly ``1000 * t``.

Why pixel space and patches of 4 x 4: a latent model would need its own VAE pretraining on 2 CPU cores, and 2 x 2
patches (2,304 tokens per clip) train 1.5-3x slower than 4 x 4 (576 tokens); see shared TOY-NOTES.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from mmalign.toy.scenes import IMAGE_SIZE
from mmalign.toy.video import NUM_FRAMES, VIDEO_WORDS

PATCH_SIZE = (1, 4, 4)
TIMESTEP_SCALE = 1000.0  # the transformer's timestep is 1000 * t


class ToyVideoPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    """Pixel-space text-to-video pipeline: ``pipe(prompt, num_inference_steps=20, generator=...).frames``.

    `generator` may be a list with one generator per clip, so a clip depends only on its own seed (what
    side-by-side comparisons at equal seeds need). `guidance_scale > 1` runs classifier-free guidance against the
    empty prompt. Output frames are in [0, 1]: ``output_type="np"`` gives a float32 array (B, F, H, W, 3),
    ``"pt"`` a tensor (B, F, 3, H, W) (the layouts of diffusers' `WanPipeline`).
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: WanTransformer3DModel, text_encoder, tokenizer,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) input ids, padded to the tokenizer's `model_max_length`."""
        tok = self.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text states: ``text_encoder(ids).last_hidden_state`` (gradients flow when enabled)."""
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity prediction for clips ``x_t`` (B, 3, F, H, W) at times `t` (B,) in [0, 1]."""
        return self.transformer(x_t, timestep=t * TIMESTEP_SCALE, encoder_hidden_states=prompt_embeds).sample

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], num_inference_steps: int = 20, guidance_scale: float = 1.0,
                 generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
                 num_videos_per_prompt: int = 1, latents: Optional[torch.Tensor] = None,
                 num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 output_type: str = "np", return_dict: bool = True):
        """Sample clips; `latents` (B, 3, F, H, W) replaces the initial noise (pixel space: it is the noise)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        num_frames = NUM_FRAMES if num_frames is None else num_frames
        height = IMAGE_SIZE if height is None else height
        width = IMAGE_SIZE if width is None else width
        p_t, p_h, p_w = self.transformer.config.patch_size
        if num_frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"num_frames={num_frames}, height={height}, width={width} must be multiples of the "
                             f"patch size {tuple(self.transformer.config.patch_size)}")
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type {output_type!r}: use 'np' or 'pt'")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} generators for {len(prompts)} clips; pass one per clip")
        device, dtype = self.transformer.device, self.transformer.dtype
        shape = (len(prompts), self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            x = latents.to(device=device, dtype=dtype)
        cond = self.encode_prompt(prompts).to(dtype)
        cfg = guidance_scale > 1.0
        if cfg:
            cond = torch.cat([self.encode_prompt([""] * len(prompts)).to(dtype), cond])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if cfg else x
            v = self.transformer(model_in, timestep=timestep.expand(model_in.shape[0]).to(dtype),
                                 encoder_hidden_states=cond).sample
            if cfg:
                uncond, text = v.chunk(2)
                v = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(v, timestep, x).prev_sample
        frames = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
        self.maybe_free_model_hooks()
        out = frames if output_type == "pt" else frames.permute(0, 1, 3, 4, 2).cpu().numpy()
        return WanPipelineOutput(frames=out) if return_dict else (out,)


def toy_video_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Euler steps on sigmas ``t`` from 1 to 1/1000, then 0; `shift` > 1 spends more steps at high noise."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_toy_video(seed: int = 0, num_heads: int = 4, head_dim: int = 16, num_layers: int = 3, ffn_dim: int = 128,
                    text_width: int = 32, shift: float = 1.0) -> ToyVideoPipeline:
    """A freshly initialised toy video pipeline: a `WanTransformer3DModel` (patch (1, 4, 4), `num_heads` x
    `head_dim` wide, `num_layers` blocks, freq_dim 64, rope_max_seq_len 32; about 200k parameters by default) and a
    1-layer CLIP text encoder `text_width` wide over the toy video words (`VIDEO_WORDS`)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmalign.models.tiny import word_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer(VIDEO_WORDS, model_max_length=8)  # 5 caption words + BOS/EOS, one pad
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))
    transformer = WanTransformer3DModel(
        patch_size=PATCH_SIZE, num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=3,
        out_channels=3, text_dim=text_width, freq_dim=64, ffn_dim=ffn_dim, num_layers=num_layers,
        rope_max_seq_len=32)
    return ToyVideoPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                            scheduler=toy_video_scheduler(shift))
