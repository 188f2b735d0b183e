"""The pipelines guidance samples from, and the few things that differ between their families.

A pipeline is a loaded diffusers pipeline object; guidance uses its own components (UNet or transformer,
scheduler, VAE, text encoders and its `encode_prompt`), so prompts are encoded exactly as the pipeline's own
`__call__` encodes them. Supported, by class:

| pipeline | sampler family | denoiser call |
|---|---|---|
| `StableDiffusionPipeline` (SD 1.x / 2.x) | diffusion | `unet(x, t, encoder_hidden_states)` |
| `StableDiffusionXLPipeline` | diffusion | `unet(..., added_cond_kwargs={text_embeds, time_ids})` |
| `ToyT2IPipeline` (the toy world's, pixel space) | diffusion | `unet(x, t, encoder_hidden_states)` |
| `StableDiffusion3Pipeline` (rectified flow) | flow | `transformer(x, 1000·sigma, text, pooled_projections)` |

Classifier-free guidance runs on the batch `[negative; prompt]` as those pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.models.loading import ModelLoadError, read_model_index

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "ToyT2IPipeline", "StableDiffusion3Pipeline")
FLOW_PIPELINES = ("StableDiffusion3Pipeline",)


@dataclass
class Conditioning:
    """Keyword arguments of the denoiser for a batch of B prompts, `[negative; prompt]` (2B rows) when `cfg`."""

    kwargs: dict[str, Any]
    cfg: bool


def pipeline_class(pipe) -> str:
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise ValueError(f"guidance does not know pipeline class {name!r}; supported: {', '.join(SUPPORTED)}")
    return name


def family(pipe) -> str:
    """'flow' for rectified-flow pipelines, else 'diffusion'."""
    return "flow" if pipeline_class(pipe) in FLOW_PIPELINES else "diffusion"


def load_pipeline(pretrained: str, *, revision: str | None = None, variant: str | None = None,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", lora: str | None = None):
    """A pipeline folder or hub id -> the loaded pipeline on `device` in `dtype` (VAE kept in float32 in fp16, as
    the SD VAE overflows there), with `lora` (a folder with LoRA weights, e.g. a training run's output) loaded
    through the pipeline's own `load_lora_weights`."""
    index = read_model_index(pretrained, revision)
    name = index.get("_class_name")
    if name not in SUPPORTED:
        raise ModelLoadError(f"{pretrained}: pipeline class {name!r} is not supported by guidance; supported: "
                             f"{', '.join(SUPPORTED)}")
    try:
        if name == "ToyT2IPipeline":
            from mmalign.toy.pipeline import ToyT2IPipeline

            pipe = ToyT2IPipeline.from_pretrained(pretrained, revision=revision, dtype=dtype)
        else:
            from diffusers import DiffusionPipeline

            # A [null, null] entry marks a component left out (an SD3 folder without T5): passed as None.
            absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
            pipe = DiffusionPipeline.from_pretrained(pretrained, revision=revision, variant=variant,
                                                     dtype=dtype, **absent)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{pretrained}: could not load the pipeline: {err}") from err
    if lora:
        if not Path(lora).exists():
            raise ModelLoadError(f"pipeline.lora {lora}: no such file or folder (a folder with "
                                 "pytorch_lora_weights.safetensors, as training writes)")
        pipe.load_lora_weights(lora)
    pipe.to(device)
    vae = getattr(pipe, "vae", None)
    if vae is not None and dtype == torch.float16:
        vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if family(pipe) == "flow" else pipe.unet


def latent_shape(pipe, n: int, height: int | None, width: int | None) -> tuple[int, ...]:
    """(n, C, h, w) of the initial noise; height/width in pixels (default: the model's native size)."""
    name = pipeline_class(pipe)
    model = denoiser(pipe)
    if name == "ToyT2IPipeline":
        size = model.config.sample_size
        for what, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise ValueError(f"sampler.{what} {value}: the toy pixel-space model generates {size}x{size} only")
        return (n, model.config.in_channels, size, size)
    scale = pipe.vae_scale_factor
    default = (model.config.sample_size * scale)
    h, w = height or default, width or default
    if h % scale or w % scale:
        raise ValueError(f"sampler.height/width {h}x{w} must be multiples of the VAE factor {scale}")
    return (n, model.config.in_channels, h // scale, w // scale)


@torch.no_grad()
def encode(pipe, prompts: list[str], negative_prompt: str, cfg: bool, height: int, width: int) -> Conditioning:
    """The denoiser's conditioning for `prompts`, computed by the pipeline's own `encode_prompt`."""
    name = pipeline_class(pipe)
    device = denoiser(pipe).device
    negative = [negative_prompt] * len(prompts) if negative_prompt else None
    if name == "ToyT2IPipeline":
        embeds = pipe.encode_prompt(prompts)
        if cfg:
            embeds = torch.cat([pipe.encode_prompt([negative_prompt] * len(prompts)), embeds])
        return Conditioning({"encoder_hidden_states": embeds.to(pipe.unet.dtype)}, cfg)
    if name == "StableDiffusionPipeline":
        embeds, neg = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=negative)
        return Conditioning({"encoder_hidden_states": torch.cat([neg, embeds]) if cfg else embeds}, cfg)
    if name == "StableDiffusionXLPipeline":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=cfg,
                                                             negative_prompt=negative)
        proj = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                          text_encoder_projection_dim=proj).to(device)
        if cfg:
            embeds, pooled, time_ids = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]), \
                torch.cat([time_ids, time_ids])
        time_ids = time_ids.repeat(len(prompts), 1)
        return Conditioning({"encoder_hidden_states": embeds,
                             "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}, cfg)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                         num_images_per_prompt=1,
                                                         do_classifier_free_guidance=cfg, negative_prompt=negative)
    if cfg:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled}, cfg)


def predict(pipe, x: Tensor, t: Tensor, cond: Conditioning, cfg_scale: float) -> Tensor:
    """The denoiser's prediction at (x, t) for B samples, with classifier-free guidance
    `uncond + cfg_scale·(text - uncond)` when `cond.cfg`. `x` is the model input (already scaled by
    `scheduler.scale_model_input`); `t` is the scheduler's timestep."""
    model = denoiser(pipe)
    x = x.to(model.dtype)  # differentiable: a float32 leaf's gradient flows back through the cast
    x_in = torch.cat([x, x]) if cond.cfg else x
    if family(pipe) == "flow":
        out = model(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), return_dict=False, **cond.kwargs)[0]
    else:
        out = model(x_in, t, return_dict=False, **cond.kwargs)[0]
    if cond.cfg:
        uncond, text = out.chunk(2)
        out = uncond + cfg_scale * (text - uncond)
    return out


def decode(pipe, latents: Tensor) -> Tensor:
    """Latents -> images (N, 3, H, W) in [0, 1], differentiable (no clamp gradient beyond [0, 1]). Pixel-space
    pipelines: the sample is the image in [-1, 1]."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        images = latents
    else:
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def scheduler_from(pipe, name: str):
    """The sampling scheduler: the pipeline's own ("pipeline"), or another of the family built from its config."""
    if name == "pipeline":
        return pipe.scheduler
    from diffusers import (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
               "flow_euler": FlowMatchEulerDiscreteScheduler}
    fam = family(pipe)
    if (name == "flow_euler") != (fam == "flow"):
        raise ValueError(f"sampler.scheduler {name!r} does not fit a {fam} pipeline ({type(pipe).__name__}); "
                         + ("use flow_euler or pipeline" if fam == "flow" else
                            "use ddim, ddpm, euler_ancestral or pipeline"))
    return classes[name].from_config(pipe.scheduler.config)


def preflight(cfg) -> None:
    """What a guide config asks of its pipeline, checked from model_index.json and the reward folders' scorer cards
    before any weights load: a supported pipeline class, a scheduler of its family that guidance can move (when
    guiding), the toy's fixed size, and noisy-latent reward models trained on the pipeline's noising process."""
    from mmalign.rewards.clip import read_scorer_card
    from mmalign.rewards.registry import scorer_kind
    from mmalign.samplers.diffusion import GUIDABLE

    p, smp = cfg.pipeline, cfg.sampler
    index = read_model_index(p.pretrained, p.revision)
    name = index.get("_class_name")
    if name not in SUPPORTED:
        raise ModelLoadError(f"pipeline.pretrained {p.pretrained}: pipeline class {name!r} is not supported by "
                             f"guidance; supported: {', '.join(SUPPORTED)}")
    fam = "flow" if name in FLOW_PIPELINES else "diffusion"
    if smp.scheduler != "pipeline" and (smp.scheduler == "flow_euler") != (fam == "flow"):
        raise ValueError(f"sampler.scheduler {smp.scheduler!r} does not fit {name} ({fam}): use "
                         + ("flow_euler or pipeline" if fam == "flow" else "ddim, ddpm, euler_ancestral or pipeline"))
    own = (index.get("scheduler") or [None, None])[1]
    if cfg.guidance.scale != 0 and fam == "diffusion" and smp.scheduler == "pipeline" and own not in GUIDABLE:
        raise ValueError(f"sampler.scheduler 'pipeline' is {name}'s {own}, which keeps state between steps and "
                         f"would drop or distort the guidance move; guidance samples with {', '.join(GUIDABLE)}: "
                         "set sampler.scheduler to ddim, ddpm or euler_ancestral")
    if name == "ToyT2IPipeline":
        for key in ("height", "width"):
            if getattr(smp, key) not in (None, 32):
                raise ValueError(f"sampler.{key} {getattr(smp, key)}: the toy pixel-space model generates 32x32 only")
    want = "flow" if fam == "flow" else "ddpm"
    for i, r in enumerate(cfg.rewards):
        if scorer_kind(r.scorer) != "latent":
            continue
        folder = r.scorer.partition("=")[2] if r.scorer.startswith("latent=") else r.scorer
        card = read_scorer_card(folder) if Path(folder).is_dir() else None
        if card is None:
            raise ValueError(f"rewards[{i}] {r.scorer!r}: {folder} is not a noisy-latent reward model folder (no "
                             "mmalign_scorer.json)")
        if card.get("process") != want:
            raise ValueError(f"rewards[{i}] {r.scorer!r} was trained on {card.get('process')!r} noisy latents, but "
                             f"{name} samples with a {want!r} process")
