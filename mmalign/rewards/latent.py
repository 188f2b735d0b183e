"""Noisy-latent reward models (in the manner of Flow-NRG): a small time-conditioned network that scores a
generator's NOISY latents x_t, so that its gradient with respect to x_t is meaningful at every noise level. Used
for inference-time reward guidance inside the denoising loop, with no VAE decode.

    c        = SiLU(MLP(sinusoid(1000·t)) + P·e(prompt))                              (N, E), E = 4·width
    h_0      = x_t                                                                      (N, C, H, W)
    h_i      = SiLU(GN(conv_i(h_{i-1}))·(1 + a_i) + b_i),   (a_i, b_i) = W_i·c          widths w, 2w, 4w
    r        = head(mean over H, W of h_3)                                              (N, D)

conv_1 keeps the resolution, conv_2 and conv_3 halve it (stride 2); GN is a GroupNorm with 8 groups and no affine
of its own (the FiLM / adaLN modulation `a_i, b_i` is its affine); `head` is a 2-layer MLP with one output per
reward dimension (`dims`). `e(prompt)` is the mean of the last hidden states over the prompt's tokens of a frozen
copy of the generator's (first) text encoder; the caption matters (in the toy world the right colour is the one
the caption names), so it modulates every stage.

Forward processes (t = 1 pure noise, t = 0 clean), `add_noise`:
- `ddpm`: `x_t = sqrt(abar_k)·x0 + sqrt(1 - abar_k)·noise`, `k = clamp(round(t·T), 0, T-1)`, abar the generator
  scheduler's `alphas_cumprod` (T = num_train_timesteps); a sampler at timestep k passes `t = k / T`;
- `flow`: `x_t = (1 - t)·x0 + t·noise` (rectified flow; t is the sigma of a FlowMatch scheduler).

Latents are what the generator's denoiser sees: `(z - shift_factor)·scaling_factor` with z the VAE posterior sample
(or mean), `encode_latents`; a pixel-space pipeline (no VAE, the toy world's) denoises the images in [-1, 1].

A saved folder (`save_pretrained`) loads without the generator: `latent_reward.safetensors` (the network's own
weights), `text_encoder/` + `tokenizer/` (transformers `save_pretrained`), `scheduler/scheduler_config.json` (the
generator's, for abar) and `mmalign_scorer.json` (`kind: latent`, name, dims, process, architecture).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.rewards.base import ScorerError, check_scorer_name, fingerprint_folder, unique_prompts

WEIGHTS_FILE = "latent_reward.safetensors"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
PROCESSES = ("ddpm", "flow")
_TEXT_CACHE_SIZE = 4096


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(N,) t in [0, 1] -> (N, dim) `[cos(1000·t·f_k), sin(1000·t·f_k)]`, `f_k = 10000^(-k / (dim/2))`,
    k < dim/2 (the sinusoidal embedding of diffusion UNets, on the 0..1000 timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def process_of_scheduler(scheduler_config: dict) -> str:
    """`flow` for a FlowMatch scheduler (FlowMatchEulerDiscreteScheduler, ...), else `ddpm`."""
    return "flow" if str(scheduler_config.get("_class_name", "")).startswith("FlowMatch") else "ddpm"


class LatentRewardModel(nn.Module):
    """r(x_t, t, prompt) -> (N, D), differentiable in x_t; see the module docstring.

    Attributes: `name`, `dims` (one head per reward dimension), `process` ("ddpm" or "flow": the forward process
    it was trained on), `version` (a fingerprint of the folder it was loaded from; "unversioned" when built),
    `latent_channels`, `width`, `generator` (the pipeline it was built from, provenance only).
    """

    def __init__(self, text_encoder, tokenizer, scheduler_config: dict, *, latent_channels: int, process: str,
                 dims: Sequence[str] = ("reward",), width: int = 32, name: str = "latent_reward",
                 generator: str | None = None):
        super().__init__()
        if process not in PROCESSES:
            raise ScorerError(f"process {process!r}: valid processes are {PROCESSES}")
        dims = tuple(dims)
        if not dims or len(set(dims)) != len(dims):
            raise ScorerError(f"dims {list(dims)}: need at least one reward dimension, each named once")
        if width <= 0 or width % 8:
            raise ScorerError(f"width {width}: must be a positive multiple of 8 (GroupNorm with 8 groups)")
        if latent_channels <= 0:
            raise ScorerError(f"latent_channels {latent_channels}: must be positive")
        self.name, self.dims, self.process = name, dims, process
        self.latent_channels, self.width, self.generator = int(latent_channels), int(width), generator
        self.version = "unversioned"
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        emb = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, emb)
        self.convs, self.norms, self.films = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_in = latent_channels
        for i, c in enumerate((width, 2 * width, 4 * width)):
            self.convs.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            self.norms.append(nn.GroupNorm(8, c, affine=False))
            self.films.append(nn.Linear(emb, 2 * c))
            c_in = c
        self.head = nn.Sequential(nn.Linear(c_in, emb), nn.SiLU(), nn.Linear(emb, len(dims)))
        # ddpm's abar (T,), float32 on the CPU: derived from the scheduler config, so not saved; not a buffer, so
        # casting the model to half precision leaves the forward process as exact as the diffusers scheduler's.
        self.alphas_cumprod = torch.zeros(0)
        if process == "ddpm":
            from diffusers import DDPMScheduler

            self.alphas_cumprod = DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.clone()
        # The text encoder is frozen, so a prompt's features never change: the guidance loop calls the model with
        # the same prompts at every step. CPU float32 entries, keyed by prompt, valid for the encoder's device and
        # dtype they were computed on (`_text_cache_for`): a moved model recomputes, as a fresh one would.
        self._text_cache: dict[str, Tensor] = {}
        self._text_cache_for: tuple | None = None

    @property
    def device(self) -> torch.device:
        return self.text_proj.weight.device

    def train(self, mode: bool = True) -> "LatentRewardModel":
        super().train(mode)
        self.text_encoder.eval()  # frozen
        return self

    # -- forward process ---------------------------------------------------------------------------------------
    def _batch_t(self, t: Tensor | float, n: int) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ScorerError(f"t must be a scalar or of shape ({n},) for {n} latents, got {tuple(t.shape)}")
        return t

    def _timesteps(self, t: Tensor) -> Tensor:
        """ddpm: (N,) t -> (N,) long timesteps `clamp(round(t·T), 0, T-1)`."""
        steps = self.alphas_cumprod.shape[0]
        return torch.clamp(torch.round(t.float() * steps), 0, steps - 1).long()

    def snap_t(self, t: Tensor) -> Tensor:
        """The t the forward process really uses: ddpm `clamp(round(t·T), 0, T-1) / T` (the timestep grid), flow
        t as is. Training feeds the network this t, so it sees at training the values a sampler passes."""
        if self.process == "flow":
            return t.float()
        return self._timesteps(t).float() / self.alphas_cumprod.shape[0]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process: x0, noise (N, C, H, W), t (N,) (or a scalar) in [0, 1] -> x_t (N, C, H, W).

        ddpm: `sqrt(abar_k)·x0 + sqrt(1 - abar_k)·noise` with `k = clamp(round(t·T), 0, T-1)` (what the diffusers
        scheduler's `add_noise(x0, noise, k)` computes); flow: `(1 - t)·x0 + t·noise`."""
        if x0.shape != noise.shape:
            raise ScorerError(f"add_noise: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        t = self._batch_t(t, x0.shape[0]).to(x0.device)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if self.process == "flow":
            s = t.to(x0.dtype).view(shape)
            return (1 - s) * x0 + s * noise
        abar = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[self._timesteps(t).to(x0.device)]
        return (abar ** 0.5).view(shape) * x0 + ((1 - abar) ** 0.5).view(shape) * noise

    # -- text --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """(P,) prompts -> (P, text_dim) float32: the mean of the frozen text encoder's last hidden states over each
        prompt's tokens (the attention mask). Padded to the encoder's full length, as the pipelines do, so a
        prompt's features do not depend on the other prompts of the call."""
        tok = self.tokenizer
        max_length = min(tok.model_max_length, self.text_encoder.config.max_position_embeddings)
        enc = tok(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        ids = enc["input_ids"].to(self.text_encoder.device)
        mask = enc["attention_mask"].to(self.text_encoder.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def _text_features(self, prompts: list[str]) -> Tensor:
        encoder = (self.text_encoder.device, self.text_encoder.dtype)
        if encoder != self._text_cache_for:
            self._text_cache, self._text_cache_for = {}, encoder
        distinct, index = unique_prompts(prompts)
        new = [p for p in distinct if p not in self._text_cache]
        if new:
            if len(self._text_cache) + len(new) > _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            for p, feats in zip(new, self.encode_prompts(new).cpu()):
                self._text_cache[p] = feats
        feats = torch.stack([self._text_cache[p] for p in distinct])
        return feats.to(self.device)[index.to(self.device)]

    # -- the reward --------------------------------------------------------------------------------------------
    def forward(self, latents: Tensor, t: Tensor, prompts: list[str]) -> Tensor:
        """Noisy latents (N, C, H, W) at t (N,) in [0, 1] (t = 1 pure noise; a scalar is broadcast) with one
        prompt each -> rewards (N, D) in `dims` order, differentiable in `latents`."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ScorerError(f"latents must be (N, {self.latent_channels}, H, W), got {tuple(latents.shape)}")
        n = latents.shape[0]
        if isinstance(prompts, str) or len(prompts) != n:
            raise ScorerError(f"got {n} latents and {1 if isinstance(prompts, str) else len(prompts)} prompts; pass "
                              "a list with one prompt per latent")
        t = self._batch_t(t, n).to(self.device)
        weight = self.text_proj.weight
        cond = F.silu(self.time_mlp(timestep_embedding(t, weight.shape[0]).to(weight.dtype))
                      + self.text_proj(self._text_features(list(prompts)).to(weight.dtype)))
        h = latents.to(weight.dtype)
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            scale, shift = film(cond)[:, :, None, None].chunk(2, dim=1)
            h = F.silu(norm(conv(h)) * (1 + scale) + shift)
        return self.head(h.mean(dim=(2, 3)))

    # -- export / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a folder `from_pretrained` loads without the generator (see the module docstring)."""
        from safetensors.torch import save_file

        from mmalign.config import atomic_write_text
        from mmalign.rewards.clip import write_scorer_card

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(out / "tokenizer")
        (out / SCHEDULER_FILE).parent.mkdir(exist_ok=True)
        atomic_write_text(out / SCHEDULER_FILE, json.dumps(self.scheduler_config, indent=1))
        own = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
               if not k.startswith("text_encoder.")}
        save_file(own, str(out / WEIGHTS_FILE))
        write_scorer_card(out, {"kind": "latent", "name": self.name, "dims": list(self.dims), "process": self.process,
                                "config": {"latent_channels": self.latent_channels, "width": self.width,
                                           "generator": self.generator}})
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "LatentRewardModel":
        """Load a folder written by `save_pretrained` (weights with safetensors only)."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPTextModel

        from mmalign.rewards.clip import SCORER_CARD, read_scorer_card

        folder = Path(folder)
        card = read_scorer_card(folder)
        if card is None or card.get("kind") != "latent":
            raise ScorerError(f"{folder}: not a latent reward model folder (needs {SCORER_CARD} of kind 'latent', "
                              "written by LatentRewardModel.save_pretrained)")
        missing = [k for k in ("name", "dims", "process", "config") if k not in card]
        missing += [f"config.{k}" for k in ("latent_channels", "width") if k not in card.get("config", {})]
        if missing:
            raise ScorerError(f"{folder / SCORER_CARD}: missing {', '.join(missing)}")
        check_scorer_name(card["name"], where=str(folder / SCORER_CARD))
        for path in (WEIGHTS_FILE, SCHEDULER_FILE, "text_encoder", "tokenizer"):
            if not (folder / path).exists():
                raise ScorerError(f"{folder}: no {path}; the folder is incomplete (write it with save_pretrained)")
        config = card["config"]
        model = cls(CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
                    AutoTokenizer.from_pretrained(folder / "tokenizer"),
                    json.loads((folder / SCHEDULER_FILE).read_text()), latent_channels=config["latent_channels"],
                    process=card["process"], dims=card["dims"], width=config["width"], name=card["name"],
                    generator=config.get("generator"))
        missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
        missing = [k for k in missing if not k.startswith("text_encoder.")]
        if missing or unexpected:
            raise ScorerError(f"{folder / WEIGHTS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.version = f"{model.name}-{fingerprint_folder(folder)}"
        return model.eval()


def build_latent_reward(generator: str, *, dims: Sequence[str] = ("reward",), width: int = 32,
                        name: str = "latent_reward", seed: int = 0) -> LatentRewardModel:
    """A fresh model for a generator pipeline (folder or hub id): its text encoder + tokenizer (copied, frozen),
    scheduler config (process `flow` for a FlowMatch scheduler, else `ddpm`) and latent channels (the VAE's, or 3
    for a pixel-space pipeline). Weights initialised from `seed`; the global RNG is left as it was."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    from mmalign.models.loading import ModelLoadError, read_model_index

    index = read_model_index(generator)
    missing = [c for c in ("text_encoder", "tokenizer", "scheduler") if (index.get(c) or [None])[0] is None]
    if missing:
        raise ModelLoadError(f"{generator}: model_index.json has no {', '.join(missing)}; a latent reward model "
                             "needs the generator's text encoder, tokenizer and scheduler")
    try:
        scheduler_config = dict(DDPMScheduler.load_config(generator, subfolder="scheduler"))
        tokenizer = AutoTokenizer.from_pretrained(generator, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(generator, subfolder="text_encoder")
        channels = 3
        if (index.get("vae") or [None])[0] is not None:
            channels = int(AutoencoderKL.load_config(generator, subfolder="vae")["latent_channels"])
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{generator}: could not load a component for a latent reward model: {err}") from err
    if len(tokenizer) <= 2:  # offline, a missing hub tokenizer can load as an empty 2-token one
        raise ModelLoadError(f"{generator}: tokenizer has only {len(tokenizer)} tokens; its files are missing")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LatentRewardModel(text_encoder, tokenizer, scheduler_config, latent_channels=channels,
                                 process=process_of_scheduler(scheduler_config), dims=dims, width=width, name=name,
                                 generator=str(generator))


def load_generator_vae(generator: str):
    """The generator's `AutoencoderKL`, frozen, or None for a pixel-space pipeline (no `vae` in model_index.json)."""
    from diffusers import AutoencoderKL

    from mmalign.models.loading import read_model_index

    if (read_model_index(generator).get("vae") or [None])[0] is None:
        return None
    return AutoencoderKL.from_pretrained(generator, subfolder="vae").requires_grad_(False).eval()


@torch.no_grad()
def encode_latents(vae, pixel_values: Tensor, *, mode: str = "sample",
                   generator: torch.Generator | None = None) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> the latents (N, C, h, w) the generator denoises, float32:
    `(z - shift_factor)·scaling_factor` with z the VAE posterior's mean (`mode="mean"`) or a sample
    `mean + std·eps` (`"sample"`, eps drawn on the CPU from `generator`). Pixel space (`vae` None): the images."""
    if mode not in ("sample", "mean"):
        raise ValueError(f"mode {mode!r}: use 'sample' or 'mean'")
    if vae is None:
        return pixel_values.float()
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    z = dist.mean
    if mode == "sample":
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
        z = z + dist.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()
