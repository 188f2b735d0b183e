"""The toy world's text-to-image model: a pixel-space diffusers pipeline small enough to train on a CPU.

`ToyT2IPipeline` is a `DiffusionPipeline` with the components of a Stable Diffusion pipeline minus the VAE: a
`UNet2DConditionModel` that denoises 3x32x32 images in [-1, 1] directly, a CLIP text encoder and tokenizer
(one token per toy word), and a DDIM scheduler. It saves and loads with `save_pretrained` / `from_pretrained`
like any diffusers pipeline, and takes LoRA weights with `load_lora_weights` (the same files the trainer writes
for SD 1.5). The mmalign text-to-image adapter treats a pipeline without a VAE as pixel space (identity encoder).

Why pixel space and `prediction_type="sample"`: on 2 CPU cores a latent model needs its own VAE pretraining, and
an epsilon-prediction model of this size still samples noisy images after 10+ minutes, which the foreground-based
rewards read as colour; clean-image prediction gives clean samples in minutes (see shared TOY-NOTES).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from mmalign.toy.scenes import IMAGE_SIZE


class ToyT2IPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Pixel-space text-to-image pipeline: `pipe(prompt, num_inference_steps=20, generator=...)`.

    `generator` may be a list with one generator per image, so an image depends only on its own seed (what
    side-by-side comparisons at equal seeds need). `guidance_scale > 1` runs classifier-free guidance against the
    empty prompt.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], num_inference_steps: int = 20, guidance_scale: float = 1.0,
                 generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, height: Optional[int] = None,
                 width: Optional[int] = None, output_type: str = "pil", return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.unet.config.sample_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise ValueError(f"{name} {value}: this pixel-space model generates {size}x{size} images only")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type {output_type!r}: use 'pil', 'np' or 'pt'")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} generators for {len(prompts)} images; pass one per image")
        device, dtype = self.unet.device, self.unet.dtype
        cond = self.encode_prompt(prompts).to(dtype)
        cfg = guidance_scale > 1.0
        if cfg:
            cond = torch.cat([self.encode_prompt([""] * len(prompts)).to(dtype), cond])
        shape = (len(prompts), self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if cfg else x
            pred = self.unet(model_in, t, cond).sample
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(pred, t, x, eta=eta, generator=generator).prev_sample
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def toy_scheduler_config() -> dict:
    """Noise schedule of the toy model: cosine betas, clean-image prediction, trailing timesteps at sampling."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")


def build_toy_t2i(seed: int = 0, text_width: int = 64) -> ToyT2IPipeline:
    """A freshly initialised toy pipeline (about 1 M parameters): UNet (16, 32, 64) with cross-attention only at
    8x8 and in the mid block, GroupNorm 8; a 1-layer CLIP text encoder over the toy-word tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmalign.models.tiny import word_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer(model_max_length=8)  # "a {color} {shape} on the {position}" + BOS/EOS = 8
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=text_width,
        norm_num_groups=8, attention_head_dim=8)
    scheduler = DDIMScheduler(**toy_scheduler_config())
    return ToyT2IPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
