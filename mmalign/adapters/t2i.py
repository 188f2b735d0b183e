"""Text-to-image diffusion adapter (SD 1.x/2.x and SDXL): a batch -> per-sample denoising errors.

The log-likelihood surrogate of an image under a diffusion model is `-err` with
`err = mean over (C, H, W) of (unet(x_t, t, c) - target)^2` at a sampled timestep `t` and noise; `target` is the
noise (epsilon prediction), the velocity `alpha_t·noise - sigma_t·x0` (v prediction) or `x0` (sample prediction),
as the model's scheduler config says. Items that are compared (a winner and its loser, the K images of a ranked
list) share `t` and the noise, so their errors differ only because the images differ.

Layout convention: grouped tensors are `(K, B, ...)` (K = 2 for pairs: index 0 winners, 1 losers); flattened they
give the `[winners; losers]` batch the losses expect. This module holds no loss math.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor


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


class ModelLoadError(ValueError):
    """A model folder or hub id could not be loaded; the message says what was expected."""


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    """The pipeline's model_index.json, from a local folder or the hub cache."""
    local = Path(pretrained)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{pretrained}: not a diffusers pipeline folder (no model_index.json); expected "
                                 "subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/")
        return json.loads(index.read_text())
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise ModelLoadError(f"{pretrained}: no such model folder (and not a hub id of the form org/name)")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as err:  # hub errors come in many classes; the message matters
        raise ModelLoadError(f"{pretrained}: could not load the pipeline config from the hub or the local cache "
                             f"({type(err).__name__}: {err}). Offline, pass a local pipeline folder.") from err


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


def load_t2i_components(pretrained: str, *, revision: str | None = None, variant: str | None = None,
                        unet_path: str | None = None, load_unet: bool = True) -> T2IComponents:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the training noise scheduler with `from_pretrained`.

    SD 1.x/2.x pipelines have one text encoder; SDXL (`text_encoder_2` in model_index.json) has two. A pipeline
    without a `vae` entry (the toy world's `ToyT2IPipeline`) is pixel space: its UNet denoises RGB images.
    `unet_path` replaces the pipeline's UNet (a folder with config.json + weights), e.g. a previous run's output.
    `load_unet=False` skips the UNet (`components.unet` is None): what encoding images and captions needs, e.g.
    building the latent cache, without reading the largest part of the pipeline. The UNet's checks against the VAE
    (in_channels) and SDXL (addition_embed_type) are then skipped too; training loads it and runs them.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    index = read_model_index(pretrained, revision)
    is_sdxl = "text_encoder_2" in index
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


def move_module(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`module.to(device, dtype)`, casting only when the dtype differs (diffusers' `ModelMixin.to` warns about
    float32 modules on every cast, even a no-op one)."""
    if device is not None:
        module.to(device)
    if dtype is not None and getattr(module, "dtype", None) != dtype:
        module.to(dtype=dtype)
    return module


class T2IAdapter:
    """Turns images + captions into per-sample denoising errors for a policy UNet and its reference.

    reference: "frozen_copy" (a deep copy of the UNet, frozen, optionally in another dtype / offloaded to CPU),
    "disabled_adapters" (the same UNet with its peft LoRA adapters switched off: no second copy), or None
    (methods without a reference: sft, mapo).
    """

    def __init__(self, components: T2IComponents, reference: Optional[str] = "frozen_copy",
                 reference_dtype: torch.dtype | None = None, offload_reference: bool = False):
        if reference not in ("frozen_copy", "disabled_adapters", None):
            raise ValueError(f"reference must be 'frozen_copy', 'disabled_adapters' or None, got {reference!r}")
        if reference is not None and components.unet is None:
            raise ValueError(f"{components.pretrained}: reference {reference!r} needs the UNet; the components were "
                             "loaded with load_unet=False")
        self.c = components
        self.reference = reference
        self.offload_reference = offload_reference
        self.ref_unet = None
        if reference == "frozen_copy":
            self.ref_unet = copy.deepcopy(components.unet).requires_grad_(False).eval()
            if reference_dtype is not None:
                move_module(self.ref_unet, dtype=reference_dtype)
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
        if self.reference == "frozen_copy":
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
        elif self.reference == "disabled_adapters":
            policy_unet.disable_adapters()
            try:
                yield policy_unet
            finally:
                policy_unet.enable_adapters()
        else:
            raise RuntimeError("this adapter was built without a reference (reference=None)")

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
