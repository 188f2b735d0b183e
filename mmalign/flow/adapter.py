"""Flow-matching adapter (SD3-class images, Wan- and LTX-class video, the toy video world): a batch -> per-sample
velocity errors.

One convention, written once (`mmalign.samplers.flow`): `x_t = (1 - t)·x0 + t·noise`, velocity target
`v = noise - x0`, t = 1 is pure noise. The model sees its own timestep, `1000·t` for SD3, Wan and LTX (diffusers'
`FlowMatchEulerDiscreteScheduler` convention, `timesteps = sigmas·1000`: `LTXPipeline` passes `scheduler.timesteps`
to its transformer unscaled). Training draws `u` from the timestep
density (`uniform | logit_normal | mode`, diffusers' `compute_density_for_timestep_sampling`) and takes the
training scheduler's shifted sigma at index `u·1000`, as diffusers' SD3 training scripts do; the loss weighting
(`none | cosmap`, `compute_loss_weighting_for_sd3`) multiplies each element's squared error.

The surrogate of an item is `-err`, `err = mean over all non-batch dims of weight(t)·(v_pred - v)^2`. Items of a
group (a winner and its loser) share t and the noise, so their errors differ only because the items differ.

| pipeline (`model_index.json`) | latents | text | transformer call |
|---|---|---|---|
| `StableDiffusion3Pipeline` | `(vae(x) - shift_factor)·scaling_factor` | the pipeline's `encode_prompt` (CLIP-L, CLIP-G, T5 or zeros) | `(x, 1000·t, embeds, pooled_projections)` |
| `WanPipeline` | `(vae(video) - latents_mean) / latents_std`, frames 4k + 1 | the pipeline's `encode_prompt` (UMT5) | `(x, 1000·t, embeds)` |
| `LTXPipeline` | `(vae(video) - latents_mean)·scaling_factor / latents_std`, frames 8k + 1 | `encode_prompt` (T5) and its mask | `(pack(x), 1000·t, embeds, mask, sizes, rope scale)`, unpacked |
| `ToyVideoPipeline` (the toy video world) | pixel space: the clip in [-1, 1] | its CLIP text encoder's last hidden states | `(x, 1000·t, embeds)` |

The pipeline's scheduler must be a flow scheduler (`FlowMatchEulerDiscreteScheduler`, or a UniPC scheduler with
`use_flow_sigmas`, as Wan checkpoints ship); a DDPM/DDIM-scheduled model is refused before any weights load. A
scheduler with `use_dynamic_shifting` (LTX-Video) shifts only when sampling (by the sequence length), so its training
sigmas are the unshifted ones; `model.shift` sets a fixed shift instead (and turns the dynamic shifting off).
`FlowAdapter.surrogates` is the adapter contract (`mmalign.models.contract`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from mmalign.models.contract import Surrogates
from mmalign.models.loading import ModelLoadError, read_model_index
from mmalign.models.reference import adapters_disabled, frozen_copy

FAMILIES = {"StableDiffusion3Pipeline": "sd3", "WanPipeline": "wan", "LTXPipeline": "ltx",
            "ToyVideoPipeline": "toy_video"}
VIDEO_FAMILIES = ("wan", "ltx", "toy_video")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
WEIGHTING = ("none", "cosmap")


@dataclass
class FlowConditioning:
    """prompt_embeds (B, L, D); pooled (B, D2) for SD3, else None; attention_mask (B, L) bool for LTX (its
    transformer masks the padded text tokens), else None."""

    prompt_embeds: Tensor
    pooled: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None

    def repeat(self, k: int) -> "FlowConditioning":
        pooled = self.pooled.repeat(k, 1) if self.pooled is not None else None
        mask = self.attention_mask.repeat(k, 1) if self.attention_mask is not None else None
        return FlowConditioning(self.prompt_embeds.repeat(k, 1, 1), pooled, mask)

    def select(self, index: Tensor) -> "FlowConditioning":
        """The rows `index` of every tensor field (batch dim 0)."""
        import dataclasses

        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})

    def to(self, device, dtype=None) -> "FlowConditioning":
        pooled = self.pooled.to(device, dtype) if self.pooled is not None else None
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None  # stays bool
        return FlowConditioning(self.prompt_embeds.to(device, dtype), pooled, mask)


def _scheduler_config(pretrained: str, revision: str | None) -> dict:
    from huggingface_hub import hf_hub_download

    local = Path(pretrained) / "scheduler" / "scheduler_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        return json.loads(Path(hf_hub_download(pretrained, "scheduler/scheduler_config.json",
                                               revision=revision)).read_text())
    except Exception as err:  # offline / missing: reported with the model
        raise ModelLoadError(f"{pretrained}: cannot read scheduler/scheduler_config.json: {err}") from None


def check_flow_model(pretrained: str, revision: str | None = None, shift: float | None = None) -> tuple[str, dict]:
    """(family, training-scheduler config) of a flow pipeline, read from its model_index.json and scheduler
    config only (no weights): a pipeline class this adapter does not know, or a model with a DDPM/DDIM-style
    scheduler, is a ModelLoadError naming the folder and what would be valid."""
    index = read_model_index(pretrained, revision)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ModelLoadError(f"model.pretrained {pretrained}: pipeline class {name!r} is not a flow-matching pipeline "
                             f"this task knows; valid: {', '.join(FAMILIES)} (text-to-image diffusion pipelines "
                             "train with task: t2i)")
    sched = _scheduler_config(pretrained, revision)
    kind = sched.get("_class_name", "")
    if kind == "FlowMatchEulerDiscreteScheduler":
        config = {k: v for k, v in sched.items() if not k.startswith("_")}
    elif kind == "UniPCMultistepScheduler" and sched.get("use_flow_sigmas"):
        config = {"num_train_timesteps": sched.get("num_train_timesteps", 1000),
                  "shift": float(sched.get("flow_shift") or 1.0)}
    else:
        raise ModelLoadError(f"model.pretrained {pretrained}: its scheduler is {kind!r} "
                             f"(prediction_type {sched.get('prediction_type')!r}), a DDPM/DDIM-style diffusion "
                             "model, not rectified flow: train it with task: t2i, or point task: flow at a "
                             "flow-matching pipeline (SD3, Wan, LTX)")
    if shift is not None:
        # A dynamically shifting scheduler ignores `shift` when built; a fixed shift asked for must take effect.
        config.update(shift=float(shift), use_dynamic_shifting=False)
    return FAMILIES[name], config


@dataclass
class FlowComponents:
    """The loaded pipeline (its text encoders, tokenizers, VAE) and what training needs beside it."""

    pretrained: str
    pipe: object
    family: str
    train_scheduler: object  # FlowMatchEulerDiscreteScheduler: the training sigmas (with shift)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae(self):
        return getattr(self.pipe, "vae", None)

    def move_encoders(self, device: torch.device, mixed_precision: str) -> None:
        """The VAE (float32) and text encoders (bf16 under bf16 mixed precision, else float32) to `device`."""
        from mmalign.models.loading import move_module

        encoder_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                move_module(module, device, torch.float32 if name == "vae" else encoder_dtype)

    @property
    def is_video(self) -> bool:
        return self.family in VIDEO_FAMILIES


def load_flow_components(pretrained: str, *, revision: str | None = None, variant: str | None = None,
                         shift: float | None = None, transformer_path: str | None = None,
                         load_transformer: bool = True) -> FlowComponents:
    """Load a flow pipeline with its class's `from_pretrained` (a `[null, null]` component of model_index.json, e.g.
    SD3 without T5, loads as None); `transformer_path` replaces its transformer (e.g. a previous run's output);
    `load_transformer=False` reads no transformer weights (encoding only: the latent cache): the transformer is built
    from its config on the meta device, for the pipeline code that reads its config (SD3 sizes the zeros standing in
    for an absent T5 by `joint_attention_dim`)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, sched_config = check_flow_model(pretrained, revision, shift)
    index = read_model_index(pretrained, revision)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    try:
        if not load_transformer:
            cls = _transformer_class(index)
            with torch.device("meta"):
                absent["transformer"] = cls.from_config(cls.load_config(pretrained, subfolder="transformer",
                                                                        revision=revision))
        elif transformer_path is not None:
            cls = _transformer_class(index)
            absent["transformer"] = cls.from_pretrained(transformer_path)
        if family == "toy_video":
            from mmalign.toy.video_pipeline import ToyVideoPipeline

            pipe = ToyVideoPipeline.from_pretrained(pretrained, revision=revision, **absent)
        else:
            # The pipeline's own class: `DiffusionPipeline.from_pretrained` loads an optional component (Wan's
            # transformer) from the folder even when one (or None) is passed.
            pipe_class = getattr(diffusers, index["_class_name"])
            pipe = pipe_class.from_pretrained(pretrained, revision=revision, variant=variant, **absent)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{pretrained}: could not load the pipeline: {err}") from err
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return FlowComponents(pretrained, pipe, family, FlowMatchEulerDiscreteScheduler(**sched_config))


def _transformer_class(index: dict):
    import diffusers

    library, name = index["transformer"]
    return getattr(diffusers, name)


class FlowAdapter:
    """Turns images or videos + captions into per-sample velocity errors for a policy transformer and its
    reference ("copy": a frozen copy; "lora": the same transformer with its peft adapters disabled; "none").

    `frame_rate` (LTX only): the clips' frames per second, which sets LTX's temporal RoPE scale
    `(vae temporal ratio / frame_rate, vae spatial ratio, vae spatial ratio)`; 25 is `LTXPipeline`'s default."""

    def __init__(self, components: FlowComponents, reference: str = "copy",
                 reference_dtype: torch.dtype | None = None, timestep_sampling: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 weighting: str = "none", latents: str = "mean", frame_rate: float = 25.0):
        if reference not in ("copy", "lora", "none"):
            raise ValueError(f"reference must be 'copy', 'lora' or 'none' for flow models, got {reference!r} (flow "
                             "surrogates depend on the t and noise drawn each step, so they cannot be precomputed)")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling {timestep_sampling!r}: valid are {', '.join(TIMESTEP_SAMPLING)}")
        if weighting not in WEIGHTING:
            raise ValueError(f"weighting {weighting!r}: valid are {', '.join(WEIGHTING)}")
        self.c = components
        self.reference = reference
        self.timestep_sampling, self.logit_mean, self.logit_std, self.mode_scale = (
            timestep_sampling, logit_mean, logit_std, mode_scale)
        self.weighting = weighting
        self.latents = latents
        self.frame_rate = float(frame_rate)
        self.ref_transformer = frozen_copy(components.transformer, reference_dtype) if reference == "copy" else None
        self.refreshed = None  # a models.reference.RefreshedReference when the reference follows the policy

    # -- encoders (frozen) -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (N, 3, H, W) or videos (N, 3, F, H, W) in [-1, 1] -> the model's latents, float32."""
        vae, fam = self.c.vae, self.c.family
        if fam == "toy_video" or vae is None:
            return pixels.float()
        if fam == "wan":
            factor = vae.config.scale_factor_temporal
            if (pixels.shape[2] - 1) % factor:
                raise ValueError(f"{self.c.pretrained}: Wan's VAE takes 4k+1 frames ({factor}k+1), got "
                                 f"{pixels.shape[2]}")
        if fam == "ltx":
            t_factor, s_factor = vae.temporal_compression_ratio, vae.spatial_compression_ratio
            if (pixels.shape[2] - 1) % t_factor or pixels.shape[-1] % s_factor or pixels.shape[-2] % s_factor:
                raise ValueError(f"{self.c.pretrained}: LTX's VAE takes {t_factor}k+1 frames of a size divisible by "
                                 f"{s_factor}, got {pixels.shape[2]} frames of {tuple(pixels.shape[-2:])}")
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        z = (dist.mode() if self.latents == "mean" else dist.sample(generator)).float()
        if fam == "wan":
            shape = (1, -1) + (1,) * (z.ndim - 2)
            mean = torch.tensor(vae.config.latents_mean, device=z.device).view(shape)
            std = torch.tensor(vae.config.latents_std, device=z.device).view(shape)
            return (z - mean) / std
        if fam == "ltx":  # LTXPipeline._normalize_latents
            shape = (1, -1) + (1,) * (z.ndim - 2)
            mean, std = vae.latents_mean.float().view(shape), vae.latents_std.float().view(shape)
            return (z - mean) * vae.config.scaling_factor / std
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> FlowConditioning:
        """Prompt embeddings as the pipeline computes them for sampling."""
        pipe, fam = self.c.pipe, self.c.family
        # build_adapter puts the text encoder on the transformer's device; building the cache has no transformer
        device = pipe.text_encoder.device
        if fam == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                      do_classifier_free_guidance=False)
            return FlowConditioning(embeds.float(), pooled.float())
        if fam == "wan":
            embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device)
            return FlowConditioning(embeds.float())
        if fam == "ltx":
            embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device)
            return FlowConditioning(embeds.float(), attention_mask=mask)
        return FlowConditioning(pipe.encode_prompt(captions).float())

    # -- noising -----------------------------------------------------------------------------------------------
    def sample_t(self, b: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(sigmas (B,) = t in [0, 1], timesteps (B,) = the model's 1000·t) from the timestep density and the
        training scheduler's shifted schedule."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.timestep_sampling, b, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        sched = self.c.train_scheduler
        index = (u * sched.config.num_train_timesteps).long().clamp(0, sched.config.num_train_timesteps - 1)
        return sched.sigmas[index].float(), sched.timesteps[index].float()

    def noisy_inputs(self, latents: Tensor, generator: torch.Generator | None,
                     sigmas: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """latents (K, B, ...) -> (x_t, timesteps, target v, sigmas (B,)), the first three flattened to K·B rows.

        One t and one noise tensor per group b, shared by its K items."""
        from mmalign.samplers.flow import add_noise

        k, b = latents.shape[:2]
        noise = torch.randn(latents.shape[1:], generator=generator, dtype=latents.dtype).to(latents.device)
        if sigmas is None:
            sigmas, timesteps = self.sample_t(b, generator)
        else:
            timesteps = sigmas * self.c.train_scheduler.config.num_train_timesteps
        sigmas, timesteps = sigmas.to(latents.device), timesteps.to(latents.device)
        x0 = latents.reshape(k * b, *latents.shape[2:])
        noise_k = noise.repeat(k, *([1] * (noise.ndim - 1)))
        x_t = add_noise(x0, noise_k, sigmas.repeat(k))
        return x_t, timesteps.repeat(k), noise_k - x0, sigmas

    # -- errors ------------------------------------------------------------------------------------------------
    def predict(self, transformer: torch.nn.Module, x_t: Tensor, timesteps: Tensor,
                cond: FlowConditioning) -> Tensor:
        """The velocity the transformer predicts for x_t, in x_t's layout ((N, C, H, W) or (N, C, F, H, W))."""
        dtype = next(transformer.parameters()).dtype
        kwargs = {"encoder_hidden_states": cond.prompt_embeds.to(x_t.device, dtype)}
        if self.c.family == "sd3":
            kwargs["pooled_projections"] = cond.pooled.to(x_t.device, dtype)
        if self.c.family == "ltx":
            return self._predict_ltx(transformer, x_t.to(dtype), timesteps, cond, **kwargs)
        return transformer(hidden_states=x_t.to(dtype), timestep=timesteps.to(x_t.device), return_dict=False,
                           **kwargs)[0]

    def _predict_ltx(self, transformer: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: FlowConditioning,
                     encoder_hidden_states: Tensor) -> Tensor:
        """`LTXPipeline`'s transformer call: latents (N, C, F, H, W) packed into tokens (N, F·H·W, C·p_t·p·p)
        (`LTXPipeline._pack_latents`, the transformer's patch sizes), the token grid's sizes and the RoPE scale
        `(temporal ratio / frame_rate, spatial ratio, spatial ratio)` for the positions, the text mask; the
        predicted tokens are unpacked back to (N, C, F, H, W), the layout of the target."""
        from diffusers import LTXPipeline

        config = self.c.transformer.config  # `transformer` may be wrapped for distributed training
        p, p_t = config.patch_size, config.patch_size_t
        vae = self.c.vae
        frames, height, width = x_t.shape[2] // p_t, x_t.shape[3] // p, x_t.shape[4] // p  # = latent sizes at p=1
        rope_scale = (vae.temporal_compression_ratio / self.frame_rate, vae.spatial_compression_ratio,
                      vae.spatial_compression_ratio)
        out = transformer(hidden_states=LTXPipeline._pack_latents(x_t, p, p_t), timestep=timesteps.to(x_t.device),
                          encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=cond.attention_mask.to(x_t.device), num_frames=frames,
                          height=height, width=width, rope_interpolation_scale=rope_scale, return_dict=False)[0]
        return LTXPipeline._unpack_latents(out, frames, height, width, p, p_t)

    def errors(self, transformer: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: FlowConditioning,
               target: Tensor, sigmas: Tensor) -> Tensor:
        """(N,) `mean over non-batch dims of weight(t)·(pred - v)^2`, in float32."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        pred = self.predict(transformer, x_t, timesteps, cond).float()
        sq = (pred - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
        if self.weighting == "none":
            return sq
        return compute_loss_weighting_for_sd3(self.weighting, sigmas.float()).to(sq.device) * sq

    @contextlib.contextmanager
    def _reference(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.refreshed is not None:  # online training: a reference moved to the policy every K steps
            if self.reference == "copy":
                self.ref_transformer.train(policy.training)
            with self.refreshed.weights(policy) as model:
                yield model
        elif self.reference == "copy":
            self.ref_transformer.train(policy.training)
            yield self.ref_transformer
        elif self.reference == "lora":
            with adapters_disabled(policy) as model:
                yield model
        else:
            raise RuntimeError("this adapter was built without a reference (reference='none')")

    def group_errors(self, policy: torch.nn.Module, latents: Tensor, cond: FlowConditioning,
                     generator: torch.Generator | None, with_reference: bool,
                     unwrapped: torch.nn.Module | None = None,
                     sigmas: Tensor | None = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Errors of grouped latents (K, B, ...): (policy (K, B), reference (K, B) or None, t (B,))."""
        k, b = latents.shape[:2]
        x_t, timesteps, target, sigmas = self.noisy_inputs(latents, generator, sigmas)
        cond_k = cond.repeat(k)
        sig_k = sigmas.repeat(k)
        err = self.errors(policy, x_t, timesteps, cond_k, target, sig_k).view(k, b)
        ref = None
        if with_reference:
            with torch.no_grad(), self._reference(unwrapped or policy) as model:
                ref = self.errors(model, x_t, timesteps, cond_k, target, sig_k).view(k, b)
        return err, ref, sigmas

    # -- the adapter contract ----------------------------------------------------------------------------------
    def inputs(self, batch: dict, generator: torch.Generator | None, device) -> tuple[Tensor, FlowConditioning]:
        """Batch -> grouped latents (K, B, ...) and conditioning (B, ...).

        Images: `pixel_values` (2B, 3, H, W) in [-1, 1] as [winners; losers] (`collate_pairs`). Videos:
        `videos` (2B, 3, F, H, W) in [-1, 1], the same layout. Captions: `captions`. From the latent cache
        (`mmalign.flow.cache`): `latents` (2B, ...) float32 in the same layout, as `encode` makes them, and the
        conditioning's fields (`prompt_embeds` (B, L, D); `pooled`, `attention_mask` where the family has them)."""
        if "latents" in batch:
            if self.latents != "mean":
                raise ValueError(f"the latent cache holds the VAE posterior means; this adapter draws latents "
                                 f"({self.latents!r}): train it without data.cache")
            latents = batch["latents"].to(device, torch.float32)
            fields = {f: batch[f].to(device) for f in ("prompt_embeds", "pooled", "attention_mask") if f in batch}
            return latents.view(2, -1, *latents.shape[1:]), FlowConditioning(**fields)
        pixels = batch["videos"] if "videos" in batch else batch["pixel_values"]
        if self.c.is_video != (pixels.ndim == 5):
            what = "videos (N, 3, F, H, W)" if self.c.is_video else "images (N, 3, H, W)"
            raise ValueError(f"{self.c.pretrained} ({self.c.family}) trains on {what}, got a batch of shape "
                             f"{tuple(pixels.shape)}")
        latents = self.encode(pixels.to(device), generator)
        latents = latents.view(2, -1, *latents.shape[1:])
        return latents, self.encode_text(list(batch["captions"]))

    def surrogates(self, policy: torch.nn.Module, batch: dict, generator: torch.Generator | None,
                   with_reference: bool, unwrapped: torch.nn.Module | None = None) -> Surrogates:
        """The adapter contract: pairs -> `Surrogates` (2, B) of kind "error", t = the shared flow time."""
        device = next((unwrapped or policy).parameters()).device
        latents, cond = self.inputs(batch, generator, device)
        err, ref, sigmas = self.group_errors(policy, latents, cond, generator, with_reference, unwrapped)
        return Surrogates(-err, None if ref is None else -ref, "error", t=sigmas)
