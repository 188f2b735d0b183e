"""Step-aware preference models (SPM, SPO: Liang et al., CVPR 2025): a CLIP / PickScore-style scorer told the noise
level, that judges a generator's one-step clean estimates x0_hat(x_t, t) instead of finished images.

    e(t)     = MLP(sinusoid(1000·t))                                   (N, 2W), W the vision tower's width
    p        = post_layernorm(h_cls)                                   (N, W)   the vision tower's pooled output
    p_t      = p·(1 + scale) + shift,      (scale, shift) = e(t)                 adaLN-style modulation
    r        = logit_scale.exp() · cos(visual_projection(p_t), E_text(prompt))

t is the noise level in [0, 1]: **t = timestep / num_train_timesteps** (t = 0 clean, t -> 1 pure noise), so an SD
sampler at training timestep k passes k / 1000; `sinusoid` is the diffusion UNets' embedding on the 0..1000 scale
(`mmalign.rewards.latent.timestep_embedding`). The MLP's last layer starts at zero, so a fresh model scores exactly
as the CLIP scorer it wraps, at every t; training moves it away where the noise level matters.

Where the modulation acts, and why: on the vision tower's pooled output right after its final LayerNorm, before the
projection. That is adaLN in the DiT sense, `LN(x)·(1 + scale) + shift`: the LayerNorm's output gets a t-dependent
per-channel scale and shift. Before the LayerNorm (on the last hidden states) any channel-uniform part of the
modulation would be normalised away; after the projection it would be a per-t affine map of the embedding only,
in a space (CLIP's embed dim) narrower than the tower's width. The towers are left as transformers built them, so
the model still saves and loads as a plain `CLIPModel`. (SPO's released SPM puts adaLN in every vision block; that
needs a patched CLIP, which this module avoids. The blocks themselves still train on the noisy estimates.)

The generator side, `OneStepDenoiser`: a frozen text-to-image pipeline (SD 1.x/2.x, SDXL, the toy pixel-space
pipeline) that turns clean pair images into one-step estimates at a shared t, as SPM training and evaluation need:
encode with the VAE, noise both images of a pair with one timestep and one noise draw, one UNet call (with
classifier-free guidance, as the published SPM code), Tweedie's estimate `predicted_x0`, decode.

Saved folder (`save_pretrained`): the CLIP scorer's files at the top (a transformers `CLIPModel`, tokenizer,
`preprocessor_config.json`), the time MLP in `step_aware.safetensors`, and `mmalign_scorer.json` of kind
`step_aware`; `mmalign.rewards.registry` refuses such a folder where a plain image scorer is expected.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmalign.rewards.base import (ScorerError, as_prompt_list, check_scorer_name, fingerprint_folder, split_images,
                                  unique_prompts)
from mmalign.rewards.latent import timestep_embedding

WEIGHTS_FILE = "step_aware.safetensors"
T_CONVENTION = "t = timestep / num_train_timesteps in [0, 1]; 0 clean, 1 pure noise"


class StepAwareScorer(nn.Module):
    """A `CLIPScorer` (`mmalign.rewards.clip`) with timestep conditioning; see the module docstring.

    `score(images, prompts, t)` takes the images as `CLIPScorer.score` does (decoded one-step x0 estimates, e.g.
    float (N, 3, H, W) in [0, 1]) and t, (N,) or a scalar, in [0, 1]; it reports in the wrapped scorer's scale
    convention. `forward(images, prompts, t)` is the training reward `logit_scale.exp()·cos` on float images.
    Attributes: `scorer` (the wrapped CLIPScorer, whose `model` is a plain CLIPModel), `time_mlp`, `name`,
    `version`, `time_dim`, `hidden_dim`, `generator` (the pipeline it was trained with, provenance only).
    """

    modality = "image"
    dims = None

    def __init__(self, scorer, *, time_dim: int = 256, hidden_dim: int = 256, name: str | None = None,
                 generator: str | None = None):
        super().__init__()
        if time_dim <= 0 or time_dim % 2 or hidden_dim <= 0:
            raise ScorerError(f"time_dim {time_dim} / hidden_dim {hidden_dim}: both must be positive, time_dim even "
                              "(cos and sin halves)")
        self.scorer = scorer
        self.name = name or scorer.name
        self.version = "unversioned"
        self.time_dim, self.hidden_dim, self.generator = int(time_dim), int(hidden_dim), generator
        width = scorer.model.config.vision_config.hidden_size
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * width))
        # Zero (scale, shift) at init: the model starts as the base scorer, bit for bit, at every t.
        nn.init.zeros_(self.time_mlp[-1].weight)
        nn.init.zeros_(self.time_mlp[-1].bias)

    @property
    def clip(self):
        """The wrapped transformers CLIPModel."""
        return self.scorer.model

    @property
    def device(self) -> torch.device:
        return self.time_mlp[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.time_mlp[0].weight.dtype

    def _batch_t(self, t: Tensor | float, n: int) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ScorerError(f"t must be a scalar or of shape ({n},) for {n} images, got {tuple(t.shape)}")
        if bool(((t < 0) | (t > 1)).any()):
            raise ScorerError(f"t must lie in [0, 1] ({T_CONVENTION}), got values in [{t.min().item():.4g}, "
                              f"{t.max().item():.4g}]")
        return t.to(self.device)

    def modulation(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) t -> (scale, shift), each (N, W)."""
        emb = timestep_embedding(t, self.time_dim).to(self.dtype)
        return self.time_mlp(emb).chunk(2, dim=-1)

    def encode_images(self, pixel_values: Tensor, t: Tensor) -> Tensor:
        """Normalised pixel values (N, 3, S, S) at t (N,) -> unit-norm time-conditioned image embeddings (N, D)."""
        clip = self.scorer.model
        pooled = clip.vision_model(pixel_values=pixel_values).pooler_output  # post_layernorm(CLS)
        scale, shift = self.modulation(t)
        feats = clip.visual_projection(pooled * (1 + scale.to(pooled.dtype)) + shift.to(pooled.dtype))
        return feats / feats.norm(dim=-1, keepdim=True)

    def cosines(self, pixel_values: Tensor, prompts: list[str], t: Tensor) -> Tensor:
        """cos(image at t, prompt) per row; each distinct prompt is encoded once."""
        distinct, index = unique_prompts(prompts)
        text = self.scorer.encode_text(distinct)[index.to(self.scorer.device)]
        return (self.encode_images(pixel_values, t) * text).sum(-1)

    def forward(self, images: Tensor, prompts: list[str], t: Tensor | float) -> Tensor:
        """Training reward of float images (N, 3, H, W) in [0, 1] at t: `logit_scale.exp()·cos` (N,)."""
        n = images.shape[0]
        prompts = as_prompt_list(prompts, n)
        s = self.scorer
        pixels = s.preprocess.from_tensor(images.to(s.device, s.dtype))
        return s.model.logit_scale.exp() * self.cosines(pixels, prompts, self._batch_t(t, n))

    def score(self, images: Any, prompts: str | Sequence[str], t: Tensor | float) -> Tensor:
        """(N,) float32 scores of images (PIL, uint8 or float [0, 1], as `Scorer.score`) at noise levels t, in the
        wrapped scorer's scale convention. Does not switch off autograd."""
        kind, batch = split_images(images)
        n = batch.shape[0] if kind == "tensor" else len(batch)
        prompts = as_prompt_list(prompts, n)
        if n == 0:
            return torch.zeros((0,), device=self.device)
        s = self.scorer
        pixels = s.preprocess(kind, batch, device=s.device, dtype=s.dtype)
        return s.scale_scores(self.cosines(pixels, prompts, self._batch_t(t, n))).float()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dims": None}

    # -- export / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """The wrapped scorer's files (`CLIPScorer.save_pretrained`), the time MLP in safetensors and a scorer card
        of kind `step_aware` (replacing the wrapped scorer's)."""
        from safetensors.torch import save_file

        from mmalign.rewards.clip import write_scorer_card

        out = Path(folder)
        s = self.scorer
        s.save_pretrained(out)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.time_mlp.state_dict().items()},
                  str(out / WEIGHTS_FILE))
        write_scorer_card(out, {"kind": "step_aware", "name": self.name, "scale": s.scale,
                                "preprocess": s.preprocess.to_dict(), "max_length": s.max_length,
                                "t": T_CONVENTION,
                                "config": {"time_dim": self.time_dim, "hidden_dim": self.hidden_dim,
                                           "modulation": "pooled", "generator": self.generator}})
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "StepAwareScorer":
        """Load a folder written by `save_pretrained` (weights with safetensors only)."""
        from safetensors.torch import load_file

        from mmalign.rewards.clip import SCORER_CARD, load_clip_scorer, read_scorer_card
        from mmalign.rewards.preprocess import ImagePreprocess

        folder = Path(folder)
        card = read_scorer_card(folder) if folder.is_dir() else None
        if card is None or card.get("kind") != "step_aware":
            raise ScorerError(f"{folder}: not a step-aware preference model folder (needs {SCORER_CARD} of kind "
                              "'step_aware', written by StepAwareScorer.save_pretrained)")
        missing = [k for k in ("name", "scale", "preprocess", "config") if k not in card]
        missing += [f"config.{k}" for k in ("time_dim", "hidden_dim") if k not in card.get("config", {})]
        if missing:
            raise ScorerError(f"{folder / SCORER_CARD}: missing {', '.join(missing)}")
        check_scorer_name(card["name"], where=str(folder / SCORER_CARD))
        if not (folder / WEIGHTS_FILE).is_file():
            raise ScorerError(f"{folder}: no {WEIGHTS_FILE}; the folder is incomplete (write it with save_pretrained)")
        scorer = load_clip_scorer(str(folder), name=card["name"], scale=card["scale"],
                                  preprocess_mode=card["preprocess"]["mode"])
        scorer.preprocess = ImagePreprocess(**card["preprocess"])
        if card.get("max_length"):
            scorer.max_length = int(card["max_length"])
        config = card["config"]
        model = cls(scorer, time_dim=config["time_dim"], hidden_dim=config["hidden_dim"], name=card["name"],
                    generator=config.get("generator"))
        try:
            model.time_mlp.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        except RuntimeError as err:
            raise ScorerError(f"{folder / WEIGHTS_FILE}: does not fit the card's time_dim / hidden_dim: "
                              f"{err}") from None
        model.version = f"{model.name}-{fingerprint_folder(folder)}"
        return model.eval()

    @classmethod
    def from_clip(cls, source: str, *, name: str = "step_aware", scale: str = "logit_scale", time_dim: int = 256,
                  hidden_dim: int = 256, seed: int = 0, generator: str | None = None) -> "StepAwareScorer":
        """A new model on a CLIPModel folder / hub id (`load_clip_scorer`): the time MLP's first layer initialised
        from `seed` (the global RNG left as it was), its last layer zero."""
        from mmalign.rewards.clip import load_clip_scorer

        scorer = load_clip_scorer(source, name=name, scale=scale)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(scorer, time_dim=time_dim, hidden_dim=hidden_dim, name=name, generator=generator)


# -- the generator side -------------------------------------------------------------------------------------------
def timestep_bounds(t_lo: float, t_hi: float, num_train_timesteps: int) -> tuple[int, int]:
    """The training timesteps k (inclusive bounds) whose t = k / T lies in [t_lo, t_hi): `ceil(t_lo·T)` to
    `min(ceil(t_hi·T), T) - 1`, so t_hi = 1 includes T - 1 and adjacent ranges partition the grid; t_lo == t_hi
    gives the one timestep `min(round(t_lo·T), T - 1)`. ValueError when no timestep falls in the range."""
    steps = int(num_train_timesteps)
    if not 0 <= t_lo <= t_hi <= 1:
        raise ValueError(f"t range [{t_lo}, {t_hi}]: need 0 <= t_lo <= t_hi <= 1 ({T_CONVENTION})")
    if t_lo == t_hi:
        k = min(round(t_lo * steps), steps - 1)
        return k, k
    lo = math.ceil(t_lo * steps - 1e-6)
    hi = min(math.ceil(t_hi * steps - 1e-6), steps) - 1
    if hi < lo:
        raise ValueError(f"t range [{t_lo}, {t_hi}) holds no timestep k / {steps}; widen it")
    return lo, hi


class OneStepDenoiser:
    """A frozen text-to-image generator reduced to what SPM training needs: clean pair images -> one-step x0
    estimates at a shared noise level (module docstring).

    `adapter` is a `mmalign.t2i.adapter.T2IAdapter` (reference 'none'), whose VAE, UNet, text encoder(s) and noise
    scheduler are used. `guidance_scale` > 1: classifier-free guidance against `negative_prompt` (two UNet rows per
    image); 1: the conditional prediction only.
    """

    def __init__(self, adapter, *, guidance_scale: float = 5.0, negative_prompt: str = ""):
        sched = adapter.c.noise_scheduler
        if getattr(sched.config, "thresholding", False):
            raise ValueError(f"{adapter.c.pretrained}: the scheduler's dynamic thresholding is not supported for "
                             "one-step estimates; use a scheduler config with thresholding false")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale {guidance_scale}: must be >= 1 (1 = no classifier-free guidance)")
        self.adapter = adapter
        self.pretrained = adapter.c.pretrained
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.alphas_cumprod = sched.alphas_cumprod.detach().float().cpu()
        self.prediction_type = sched.config.prediction_type
        # The DDIM / DDPM step clips its clean estimate to this range when the config says so (the toy's does).
        self.clip_range = float(sched.config.clip_sample_range) if sched.config.clip_sample else None

    @classmethod
    def from_pretrained(cls, generator: str, *, guidance_scale: float = 5.0,
                        negative_prompt: str = "") -> "OneStepDenoiser":
        """A pipeline folder / hub id (SD 1.x/2.x, SDXL, the toy pipeline), loaded with `from_pretrained` and
        frozen."""
        from mmalign.t2i.adapter import T2IAdapter, load_t2i_components

        components = load_t2i_components(generator)
        components.unet.requires_grad_(False).eval()
        return cls(T2IAdapter(components, reference="none"), guidance_scale=guidance_scale,
                   negative_prompt=negative_prompt)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.adapter.c.unet.parameters()).device

    @property
    def native_resolution(self) -> int:
        """The generator's default image size in pixels (UNet sample size times the VAE's downsampling)."""
        c = self.adapter.c
        factor = 2 ** (len(c.vae.config.block_out_channels) - 1) if c.vae is not None else 1
        return int(c.unet.config.sample_size) * factor

    def to(self, device) -> "OneStepDenoiser":
        c = self.adapter.c
        for module in (c.unet, c.vae, *c.text_encoders):
            if module is not None:
                module.to(device)
        return self

    def draw_timesteps(self, n: int, t_lo: float, t_hi: float, generator: torch.Generator | None) -> Tensor:
        """(n,) long timesteps uniform on the grid of [t_lo, t_hi) (`timestep_bounds`), from `generator`."""
        lo, hi = timestep_bounds(t_lo, t_hi, self.num_train_timesteps)
        return torch.randint(lo, hi + 1, (n,), generator=generator)

    @torch.no_grad()
    def x0_images(self, pixel_values: Tensor, captions: list[str], timesteps: Tensor,
                  generator: torch.Generator | None) -> Tensor:
        """Pairs `[winners; losers]` (2B, 3, H, W) in [-1, 1], B captions, B timesteps -> the decoded one-step
        estimates (2B, 3, H, W) in [0, 1], float32.

        Per pair: one timestep k and one noise draw shared by its two images, `x_t = sqrt(abar_k)·x0 +
        sqrt(1 - abar_k)·noise` (x0 the VAE posterior sample, one draw per image as the published SPM code, times
        scaling_factor after shift_factor; pixel space: the images), the UNet's prediction at (x_t, k, caption)
        (with classifier-free guidance), `predicted_x0`, clipped as the scheduler's step clips (`clip_sample`),
        decoded and mapped to [0, 1]. All randomness from `generator`, drawn on the CPU."""
        from mmalign.samplers.diffusion import add_noise, predicted_x0

        a = self.adapter
        c = a.c
        b = len(captions)
        if pixel_values.shape[0] != 2 * b or timesteps.shape != (b,):
            raise ValueError(f"x0_images: {pixel_values.shape[0]} images, {b} captions and timesteps of shape "
                             f"{tuple(timesteps.shape)}; need [winners; losers] (2B), B captions, (B,) timesteps")
        device = self.device
        x0 = a.sample_latents(a.encode_images(pixel_values.to(device)), generator)
        noise = torch.randn((b, *x0.shape[1:]), generator=generator, dtype=x0.dtype).to(device)
        k = torch.cat([timesteps, timesteps]).long().cpu()
        abar = self.alphas_cumprod[k]
        x_t = add_noise(x0, torch.cat([noise, noise]), abar.to(device))

        cond = a.encode_text(list(captions)).repeat(2)
        rows, steps = x_t, k.to(device)
        embeds, pooled = cond.prompt_embeds, cond.pooled
        guided = self.guidance_scale != 1
        if guided:
            neg = a.encode_text([self.negative_prompt]).repeat(2 * b)
            rows, steps = torch.cat([x_t, x_t]), torch.cat([steps, steps])
            embeds = torch.cat([neg.prompt_embeds, embeds])
            pooled = torch.cat([neg.pooled, pooled]) if pooled is not None else None
        dtype = next(c.unet.parameters()).dtype
        kwargs = {}
        if c.is_sdxl:  # micro-conditioning: the image's own size, no crop
            h, w = pixel_values.shape[-2:]
            n = rows.shape[0]
            time_ids = a.time_ids(torch.tensor([[h, w]]).expand(n, 2), torch.zeros(n, 2), (h, w))
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device, dtype),
                                           "time_ids": time_ids.to(device, dtype)}
        pred = c.unet(rows.to(dtype), steps, embeds.to(device, dtype), **kwargs).sample.float()
        if guided:
            uncond, text = pred.chunk(2)
            pred = uncond + self.guidance_scale * (text - uncond)
        est = torch.empty_like(x_t)
        for i in range(b):  # one abar per pair
            rows_i = [i, b + i]
            est[rows_i] = predicted_x0(pred[rows_i], x_t[rows_i], float(abar[i]), self.prediction_type)
        if self.clip_range is not None:
            est = est.clamp(-self.clip_range, self.clip_range)
        if c.vae is not None:
            z = est / a.vae_scale + a.vae_shift
            est = c.vae.decode(z.to(c.vae.dtype)).sample.float()
        return (est / 2 + 0.5).clamp(0, 1)


# -- evaluation -----------------------------------------------------------------------------------------------------
@dataclass
class BucketAccuracy:
    """Pair accuracy of a step-aware model per t bucket: bucket j is `[edges[j], edges[j+1])` (the last one up to
    T - 1 / T), `accuracy[j]` over the non-tie pairs (a model tie counts 1/2), each pair scored once per bucket."""

    edges: list[float]
    accuracy: list[float]
    num_pairs: int
    num_ties: int

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`{prefix}/accuracy/t_{lo:.2f}-{hi:.2f}` per bucket, `{prefix}/accuracy` (their mean),
        `{prefix}/num_pairs`, `{prefix}/num_ties`."""
        out = {f"{prefix}/accuracy/t_{lo:.2f}-{hi:.2f}": acc
               for lo, hi, acc in zip(self.edges, self.edges[1:], self.accuracy)}
        out[f"{prefix}/accuracy"] = sum(self.accuracy) / len(self.accuracy) if self.num_pairs else float("nan")
        out[f"{prefix}/num_pairs"] = float(self.num_pairs)
        out[f"{prefix}/num_ties"] = float(self.num_ties)
        return out


def bucket_edges(buckets: int | Sequence[float]) -> list[float]:
    """`buckets` equal buckets over [0, 1], or explicit increasing edges in [0, 1] (at least two)."""
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"buckets {buckets}: need at least one")
        return [i / buckets for i in range(buckets + 1)]
    edges = [float(e) for e in buckets]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0 or edges[-1] > 1:
        raise ValueError(f"bucket edges {edges}: need at least two, strictly increasing, within [0, 1]")
    return edges


@torch.no_grad()
def step_aware_accuracy(model: StepAwareScorer, generator: OneStepDenoiser | str, shards: str,
                        buckets: int | Sequence[float] = 5, *, resolution: int | None = None,
                        max_pairs: int | None = None, batch_size: int = 16, seed: int = 0) -> BucketAccuracy:
    """Accuracy per t bucket on held-out `pair` shards (read in order, centre-cropped to `resolution`, default the
    generator's native size; at most `max_pairs`). Each pair is scored in every bucket at a timestep drawn
    uniformly on the bucket's grid (`timestep_bounds`), both images of the pair sharing it and one noise draw
    (`OneStepDenoiser.x0_images`); the model compares the two estimates at that t. Ties (label 1/2) are counted,
    not scored. All randomness from `seed`. `generator` is a loaded `OneStepDenoiser` or a pipeline folder."""
    from mmalign.data.collate import collate_pairs
    from mmalign.data.dataset import PairDataset
    from mmalign.rewards.metrics import pairwise_accuracy

    edges = bucket_edges(buckets)
    gen = generator if isinstance(generator, OneStepDenoiser) else OneStepDenoiser.from_pretrained(generator)
    resolution = resolution or gen.native_resolution
    dataset = PairDataset(shards, transforms={"resolution": resolution, "crop": "center"}, ties="keep", rank=0,
                          world_size=1)
    rng = torch.Generator().manual_seed(seed)
    steps = gen.num_train_timesteps
    labels: list[float] = []
    diffs: list[list[float]] = [[] for _ in edges[1:]]

    def run(samples: list[dict]) -> None:
        batch = collate_pairs(samples)
        captions, b = batch["captions"], len(samples)
        labels.extend(1.0 if float(p) == 1.0 else 0.0 for p in batch["label"])
        for j, (lo, hi) in enumerate(zip(edges, edges[1:])):
            k = gen.draw_timesteps(b, lo, hi, rng)
            images = gen.x0_images(batch["pixel_values"], captions, k, rng)
            t = torch.cat([k, k]).float() / steps
            r = model(images, captions + captions, t).float().cpu()
            diffs[j].extend((r[:b] - r[b:]).tolist())

    was_training = model.training
    model.eval()
    try:
        pending: list[dict] = []
        for sample in dataset:
            pending.append(sample)
            if max_pairs is not None and len(labels) + len(pending) >= max_pairs:
                break
            if len(pending) == batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError(f"{shards}: no pairs to evaluate")
    stats = [pairwise_accuracy(labels, d) for d in diffs]
    return BucketAccuracy(edges=edges, accuracy=[s["accuracy"] for s in stats], num_pairs=stats[0]["num_pairs"],
                          num_ties=stats[0]["num_ties"])
