"""Text-to-image diffusion adapter (SD 1.x/2.x and SDXL): a batch -> per-sample denoising errors.

The log-likelihood surrogate of an image under a diffusion model is `-err` with
`err = mean over (C, H, W) of (unet(x_t, t, c) - target)^2` at a sampled timestep `t` and noise; `target` is the
noise (epsilon prediction), the velocity `alpha_t·noise - sigma_t·x0` (v prediction) or `x0` (sample prediction),
as the model's scheduler config says. Items that are compared (a winner and its loser, the K images of a ranked
list) share `t` and the noise, so their errors differ only because the images differ.

Layout convention: grouped tensors are `(K, B, ...)` (K = 2 for pairs: index 0 winners, 1 losers); flattened they
give the `[winners; losers]` batch the losses expect. `T2IAdapter.surrogates` is the adapter contract
(`mmalign.models.contract`): a batch -> `Surrogates` of kind "error" (`-err`). This module holds no loss math.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from mmalign.data.transforms import to_pixel_values
from mmalign.models.contract import Surrogates
from mmalign.models.loading import ModelLoadError, read_model_index
from mmalign.models.reference import adapters_disabled, frozen_copy

CACHE_NAME = "t2i"  # the latent + text cache's name in `mmalign.data.cache` (written by `mmalign.t2i.cache`)


@dataclass
class TextConditioning:
    """prompt_embeds: (B, L, D); pooled: (B, D2) for SDXL, else None."""

    prompt_embeds: Tensor
    pooled: Optional[Tensor] = None

    def repeat(self, k: int) -> "TextConditioning":
        """Repeat K times along the batch, group-major (matches a flattened (K, B) layout)."""
        pooled = self.pooled.repeat(k, 1) if self.pooled is not None else None
        return TextConditioning(self.prompt_embeds.repeat(k, 1, 1), pooled)

    def to(self, device, dtype=None) -> "TextConditioning":
        pooled = self.pooled.to(device, dtype) if self.pooled is not None else None
        return TextConditioning(self.prompt_embeds.to(device, dtype), pooled)


@dataclass
class T2IComponents:
    """The separately trained/swapped parts of an SD-style pipeline, each its own object."""

    pretrained: str
    unet: Optional[torch.nn.Module]  # None when loaded with load_unet=False (encoding only, e.g. the cache)
    vae: Optional[torch.nn.Module]  # None: a pixel-space pipeline (the toy world's); images are the latents
    noise_scheduler: object  # DDPMScheduler built from the pipeline's scheduler config (training noise)
    text_encoders: list
    tokenizers: list
    is_sdxl: bool

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def sdxl_resolution_problem(pretrained: str, is_sdxl: bool, resolution: int | None) -> str | None:
    """The message for a training resolution SDXL cannot take (not a multiple of 16), else None."""
    if is_sdxl and resolution is not None and resolution % 16:
        return f"data.resolution {resolution} is not a multiple of 16, which SDXL ({pretrained}) needs"
    return None


def load_t2i_components(pretrained: str, *, revision: str | None = None, variant: str | None = None,
                        unet_path: str | None = None, load_unet: bool = True,
                        resolution: int | None = None) -> T2IComponents:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the training noise scheduler with `from_pretrained`.

    SD 1.x/2.x pipelines have one text encoder; SDXL (`text_encoder_2` in model_index.json) has two. A pipeline
    without a `vae` entry (the toy world's `ToyT2IPipeline`) is pixel space: its UNet denoises RGB images.
    `unet_path` replaces the pipeline's UNet (a folder with config.json + weights), e.g. a previous run's output.
    `load_unet=False` skips the UNet (`components.unet` is None): what encoding images and captions needs, e.g.
    building the latent cache, without reading the largest part of the pipeline. The UNet's checks against the VAE
    (in_channels) and SDXL (addition_embed_type) are then skipped too; training loads it and runs them.
    `resolution` (the training resolution) is checked against the pipeline before anything loads.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    index = read_model_index(pretrained, revision)
    is_sdxl = "text_encoder_2" in index
    problem = sdxl_resolution_problem(pretrained, is_sdxl, resolution)
    if problem:
        raise ModelLoadError(problem)
    kw = dict(revision=revision)
    try:
        unet = None
        if load_unet and unet_path is not None:
            if not (Path(unet_path) / "config.json").is_file():
                raise ModelLoadError(f"model.unet {unet_path}: not a UNet folder (no config.json)")
            unet = UNet2DConditionModel.from_pretrained(unet_path)
        elif load_unet:
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kw)
        vae = None
        if (index.get("vae") or [None])[0] is not None:
            vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        tokenizers = [AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)]
        text_encoders = [CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kw)]
        if is_sdxl:
            tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                pretrained, subfolder="text_encoder_2", variant=variant, **kw))
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{pretrained}: could not load a component: {err}") from err
    for i, tok in enumerate(tokenizers):
        # Offline, a missing hub tokenizer can come back as an empty 2-token tokenizer instead of an error.
        if len(tok) <= 2:
            raise ModelLoadError(f"{pretrained}: tokenizer{'_2' if i else ''} has only {len(tok)} tokens; the "
                                 "tokenizer files are missing or could not be loaded")
    channels = vae.config.latent_channels if vae is not None else 3
    if unet is not None and unet.config.in_channels != channels:
        raise ModelLoadError(f"{pretrained}: UNet in_channels {unet.config.in_channels} != "
                             + (f"VAE latent_channels {channels}" if vae is not None else
                                "3 (no VAE in model_index.json, so the UNet must denoise RGB pixels)"))
    if is_sdxl and unet is not None and unet.config.addition_embed_type != "text_time":
        raise ModelLoadError(f"{pretrained}: SDXL pipeline but the UNet has addition_embed_type "
                             f"{unet.config.addition_embed_type!r} (expected 'text_time')")
    for module in [vae, *text_encoders]:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return T2IComponents(pretrained, unet, vae, noise_scheduler, text_encoders, tokenizers, is_sdxl)


def encoder_dtype(mixed_precision: str) -> torch.dtype:
    """Dtype of the frozen VAE and text encoders: the mixed-precision dtype ("no", "fp16", "bf16"), except float32
    for fp16 (the SD VAE overflows in fp16)."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


class T2IAdapter:
    """Turns images + captions into per-sample denoising errors for a policy UNet and its reference.

    reference (`mmalign.models.reference`): "copy" (a deep copy of the UNet, frozen, optionally in another dtype /
    offloaded to CPU), "lora" (the same UNet with its peft LoRA adapters switched off: no second copy), or "none"
    (methods without a reference: sft, mapo). Diffusion surrogates depend on the t and noise drawn each step, so
    they cannot be "precomputed".
    resolution: the training resolution (SDXL `time_ids` target size); proportion_empty_prompts: the share of
    captions replaced by the "" conditioning (the batch's `empty_prompt`) to keep classifier-free guidance working.
    """

    def __init__(self, components: T2IComponents, reference: str = "copy",
                 reference_dtype: torch.dtype | None = None, offload_reference: bool = False,
                 resolution: int | None = None, proportion_empty_prompts: float = 0.0):
        if reference not in ("copy", "lora", "none"):
            raise ValueError(f"reference must be 'copy', 'lora' or 'none' for text-to-image diffusion, got "
                             f"{reference!r} (diffusion surrogates depend on the t and noise drawn each step, so "
                             "they cannot be precomputed)")
        if reference != "none" and components.unet is None:
            raise ValueError(f"{components.pretrained}: reference {reference!r} needs the UNet; the components were "
                             "loaded with load_unet=False")
        self.c = components
        self.reference = reference
        self.offload_reference = offload_reference
        self.resolution = resolution
        self.proportion_empty_prompts = proportion_empty_prompts
        self.ref_unet = None
        self.spo = None  # a mmalign.t2i.spo.TransitionScorer when the method is spo (step pairs)
        if reference == "copy":
            self.ref_unet = frozen_copy(components.unet, reference_dtype)
        vae_config = components.vae.config if components.vae is not None else None
        self.vae_scale = float(vae_config.scaling_factor) if vae_config is not None else 1.0
        shift = getattr(vae_config, "shift_factor", None)
        self.vae_shift = float(shift) if shift is not None else 0.0

    # -- encoders (frozen) -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> VAE posterior parameters (N, 2C, h, w) (mean and log-variance).

        Cached as such, so sampling a latent from the cache equals sampling it from a fresh encode. Pixel space
        (no VAE): the images themselves, (N, 3, H, W).
        """
        vae = self.c.vae
        if vae is None:
            return pixel_values.float()
        return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters.float()

    def sample_latents(self, posterior: Tensor, generator: torch.Generator | None) -> Tensor:
        """Posterior parameters (..., 2C, h, w) -> scaled latents (..., C, h, w), one draw per item (pixel space:
        the images as they are, no draw)."""
        if self.c.vae is None:
            return posterior
        mean, logvar = posterior.chunk(2, dim=-3)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
        return (mean + std * eps - self.vae_shift) * self.vae_scale

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextConditioning:
        """Prompt embeddings as the pipelines compute them (SDXL: penultimate hidden states of both encoders
        concatenated, pooled projection of the second)."""
        if not self.c.is_sdxl:
            tok, enc = self.c.tokenizers[0], self.c.text_encoders[0]
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            return TextConditioning(enc(ids)[0].float())
        embeds, pooled = [], None
        for tok, enc in zip(self.c.tokenizers, self.c.text_encoders):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True)
            embeds.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled (projected) output
        return TextConditioning(torch.cat(embeds, dim=-1).float(), pooled.float())

    @staticmethod
    def time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, target_size: tuple[int, int]) -> Tensor:
        """SDXL micro-conditioning (B, 6): original (h, w), crop top-left (y, x), target (h, w).

        For pairs, callers pass the *winner's* original size and crop; the same vector conditions both images.
        """
        b = original_sizes.shape[0]
        target = torch.tensor(target_size, dtype=torch.float32).expand(b, 2)
        return torch.cat([original_sizes.float(), crop_top_lefts.float(), target], dim=1)

    # -- noising -----------------------------------------------------------------------------------------------
    def noisy_inputs(self, latents: Tensor, generator: torch.Generator | None,
                     timesteps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """latents (K, B, C, h, w) -> (noisy, timesteps, target), each flattened to (K*B, ...).

        One timestep and one noise tensor per group b, shared by its K items.
        """
        k, b = latents.shape[:2]
        sched = self.c.noise_scheduler
        noise = torch.randn(latents.shape[1:], generator=generator, dtype=latents.dtype).to(latents.device)
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(latents.device).long()
        x0 = latents.reshape(k * b, *latents.shape[2:])
        noise_k = noise.repeat(k, 1, 1, 1)
        t_k = timesteps.repeat(k)
        noisy = sched.add_noise(x0, noise_k, t_k)
        pred_type = sched.config.prediction_type
        if pred_type == "epsilon":
            target = noise_k
        elif pred_type == "v_prediction":
            target = sched.get_velocity(x0, noise_k, t_k)
        elif pred_type == "sample":
            target = x0
        else:
            raise ValueError(f"{self.c.pretrained}: unsupported prediction_type {pred_type!r} (epsilon, "
                             "v_prediction or sample)")
        return noisy, t_k, target

    # -- errors ------------------------------------------------------------------------------------------------
    def errors(self, unet: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: TextConditioning,
               time_ids: Tensor | None, target: Tensor) -> Tensor:
        """(N,) per-sample MSE, mean over (C, H, W), computed in float32."""
        dtype = next(unet.parameters()).dtype
        kwargs = {}
        if self.c.is_sdxl:
            if time_ids is None or cond.pooled is None:
                raise ValueError("SDXL needs pooled text embeddings and time_ids")
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(noisy.device, dtype),
                                           "time_ids": time_ids.to(noisy.device, dtype)}
        pred = unet(noisy.to(dtype), timesteps, cond.prompt_embeds.to(noisy.device, dtype), **kwargs).sample
        return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))

    @contextlib.contextmanager
    def _reference_unet(self, policy_unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.reference == "copy":
            # Same mode as the policy: some diffusers paths branch on `training`, and at step 0 the reference
            # must reproduce the policy bit for bit (DPO loss exactly ln 2). UNet dropout defaults to 0.
            self.ref_unet.train(policy_unet.training)
            if self.offload_reference:
                self.ref_unet.to(policy_unet.device if hasattr(policy_unet, "device") else "cpu")
            try:
                yield self.ref_unet
            finally:
                if self.offload_reference:
                    self.ref_unet.to("cpu")
        elif self.reference == "lora":
            with adapters_disabled(policy_unet) as unet:
                yield unet
        else:
            raise RuntimeError("this adapter was built without a reference (reference='none')")

    def group_errors(self, policy_unet: torch.nn.Module, latents: Tensor, cond: TextConditioning,
                     time_ids: Tensor | None, generator: torch.Generator | None, with_reference: bool,
                     unwrapped_unet: torch.nn.Module | None = None,
                     timesteps: Tensor | None = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Errors for grouped latents (K, B, C, h, w): (policy (K, B), reference (K, B) or None, timesteps (B,)).

        `policy_unet` may be wrapped (DDP); `unwrapped_unet` is the bare module used for the reference pass
        (adapters toggled on the module itself). Conditioning is (B, ...) and is shared by the K items.
        """
        k, b = latents.shape[:2]
        noisy, t_k, target = self.noisy_inputs(latents, generator, timesteps)
        cond_k = cond.repeat(k)
        tid_k = time_ids.repeat(k, 1) if time_ids is not None else None
        policy = self.errors(policy_unet, noisy, t_k, cond_k, tid_k, target).view(k, b)
        ref = None
        if with_reference:
            with torch.no_grad(), self._reference_unet(unwrapped_unet or policy_unet) as ref_unet:
                ref = self.errors(ref_unet, noisy, t_k, cond_k, tid_k, target).view(k, b)
        return policy, ref, t_k[:b]

    # -- the adapter contract ----------------------------------------------------------------------------------
    def inputs(self, batch: dict, generator: torch.Generator | None,
               device) -> tuple[Tensor, TextConditioning, Tensor | None]:
        """Batch -> grouped latents (K, B, C, h, w), conditioning (B, ...), SDXL time_ids (B, 6) or None.

        Accepts raw batches (`pixels` uint8 as the training reader sends them, or `pixel_values` float in [-1, 1];
        `captions`) and cached ones (`cache["t2i"]`, see `read_cached`). With `proportion_empty_prompts` > 0 the
        batch carries `empty_prompt` (the "" conditioning).
        """
        if "cache" in batch:
            posterior, cond, original_sizes, crop_top_lefts = read_cached(batch)
            posterior, cond = posterior.to(device), cond.to(device)
            b = posterior.shape[1]
        else:
            pixels = batch["pixel_values"] if "pixel_values" in batch else to_pixel_values(batch["pixels"].to(device))
            if pixels.ndim == 5:  # ranked (B, K, 3, H, W) -> (K, B, ...)
                pixels = pixels.transpose(0, 1)
            else:  # pairs [winners; losers] (2B, 3, H, W)
                pixels = pixels.view(2, -1, *pixels.shape[1:])
            k, b = pixels.shape[:2]
            posterior = self.encode_images(pixels.reshape(k * b, *pixels.shape[2:]).to(device))
            posterior = posterior.view(k, b, *posterior.shape[1:])
            cond = self.encode_text(list(batch["captions"]))
            original_sizes, crop_top_lefts = batch.get("original_sizes"), batch.get("crop_top_lefts")
        if self.proportion_empty_prompts > 0:
            drop = torch.rand(b, generator=generator) < self.proportion_empty_prompts
            if drop.any():
                empty = batch.get("empty_prompt")
                if empty is None:
                    raise ValueError("proportion_empty_prompts > 0 but the batch has no 'empty_prompt'")
                cond.prompt_embeds[drop.to(device)] = empty.prompt_embeds.to(device, cond.prompt_embeds.dtype)
                if cond.pooled is not None:
                    cond.pooled[drop.to(device)] = empty.pooled.to(device, cond.pooled.dtype)
        latents = self.sample_latents(posterior, generator)
        time_ids = None
        if self.c.is_sdxl:
            if self.resolution is None:
                raise ValueError("SDXL time_ids need the training resolution (T2IAdapter(resolution=...))")
            res = self.resolution
            time_ids = self.time_ids(original_sizes, crop_top_lefts, (res, res)).to(device)
        return latents, cond, time_ids

    def surrogates(self, policy: torch.nn.Module, batch: dict, generator: torch.Generator | None,
                   with_reference: bool, unwrapped: torch.nn.Module | None = None) -> Surrogates:
        """The adapter contract: a batch of pairs or ranked lists -> `Surrogates` (K, B) of kind "error".

        One timestep and one noise tensor per group, shared by its K items; `policy` may be wrapped (DDP/FSDP),
        `unwrapped` is the bare UNet (its adapters are toggled for the `lora` reference)."""
        device = next((unwrapped or policy).parameters()).device
        latents, cond, time_ids = self.inputs(batch, generator, device)
        err, ref, t = self.group_errors(policy, latents, cond, time_ids, generator, with_reference, unwrapped)
        return Surrogates(-err, None if ref is None else -ref, "error", t=t,
                          num_train_timesteps=self.c.noise_scheduler.config.num_train_timesteps)


def read_cached(batch: dict) -> tuple[Tensor, TextConditioning, Tensor, Tensor]:
    """A cached batch -> (posterior parameters (K, B, 2C, h, w) as [winners; losers] for pairs or in stored
    order for ranked lists, conditioning, winner original sizes (B, 2), crops (B, 2))."""
    from mmalign.data.collate import winners_losers

    entry = batch["cache"][CACHE_NAME]
    per_image = torch.as_tensor(entry["latents"])  # (B, K, 2C, h, w), stored image order
    if "winner_index" in batch:  # pairs (collate_pairs): reorder to [winners; losers]
        posterior = winners_losers(per_image, batch["winner_index"]).view(2, per_image.shape[0],
                                                                          *per_image.shape[2:])
    else:
        posterior = per_image.transpose(0, 1)
    pooled = torch.as_tensor(entry["pooled"]) if "pooled" in entry else None
    cond = TextConditioning(torch.as_tensor(entry["prompt_embeds"]), pooled)
    return (posterior.float(), cond, torch.as_tensor(entry["original_size"]),
            torch.as_tensor(entry["crop_top_left"]))
