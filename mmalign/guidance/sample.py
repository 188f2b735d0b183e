"""Guided sampling: one loop per sampler family, written top to bottom, and best-of-N on top of them.

Both loops take the pipeline's own components (`mmalign.guidance.pipelines`). Inside the guidance window
`[t_lo, t_hi]` (t = 1 is pure noise) and every `every` steps, the weighted reward R (`RewardSet.objective`) is
evaluated on

- the clean estimate x0 of the current sample (Tweedie's `E[x0 | x_t]` for epsilon / v / sample prediction,
  `x_t - t·v` for flow), decoded by the VAE for image scorers; and/or
- the noisy latent x_t itself, for noisy-latent reward models (`latent=FOLDER`; no decode, no denoiser backward);

and its gradient g = dR/dx_t (x_t = the model input), optionally divided by each sample's root mean square,
moves the sample up the reward by the step's decrease of the noise level:

- flow (Euler, t decreasing): `v <- v - scale·g`, i.e. `x_next <- x_next + (t - t_next)·scale·g`
  (`mmalign.samplers.flow.guided_velocity`);
- diffusion (any `scheduler.step` of the DDPM/DDIM/Euler family): the same move with the noise level
  `sqrt(1 - abar)`, `x_next <- x_next + (sqrt(1 - abar_t) - sqrt(1 - abar_next))·scale·g`, applied to the
  scheduler's output (`mmalign.samplers.diffusion.guided_update`, which says why not by editing the noise
  prediction).

Over a whole trajectory the noise level falls from 1 to 0, so `scale` is the total displacement (in units of the
gradient's root mean square when normalised) for both families, spread over the steps of the window.
The graph of one step is freed before the next (`torch.autograd.grad` inside the step); nothing is kept across
steps. With `scale == 0` the loop runs exactly the unguided operations, so the images equal plain sampling bit
for bit (and the pipelines' own `__call__` at the same generators; tested).

Every image has its own `torch.Generator` seeded with its seed: an image depends on (model, prompt, seed,
settings), not on the batch it was drawn in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mmalign.guidance.config import GuidanceConfig, SamplerConfig
from mmalign.guidance.pipelines import decode, denoiser, encode, family, latent_shape, predict, scheduler_from
from mmalign.rewards.combine import RewardSet
from mmalign.samplers import diffusion as vp
from mmalign.samplers import flow


@dataclass
class GuidedSamples:
    """images (N, 3, H, W) float32 in [0, 1] and final latents (N, C, h, w), on the CPU; `scores`: every reward
    column's (N,) scores; `cost`: per image, denoiser forward passes (a CFG step counts 2), denoiser backward
    passes and decoder backward passes."""

    images: Tensor
    latents: Tensor
    prompts: list[str]
    seeds: list[int]
    scores: dict[str, Tensor] = field(default_factory=dict)
    cost: dict[str, int] = field(default_factory=dict)

    def select(self, index: Tensor) -> "GuidedSamples":
        idx = index.tolist()
        return GuidedSamples(self.images[index], self.latents[index], [self.prompts[i] for i in idx],
                             [self.seeds[i] for i in idx], {k: v[index] for k, v in self.scores.items()},
                             dict(self.cost))


@dataclass
class BestOfN:
    """`samples`: the chosen candidate of each of P prompts; `candidates`: all P·N candidates (prompt-major);
    `combined`: (P, N) weighted (normalised) scores; `chosen`: (P,) the argmax of each row."""

    samples: GuidedSamples
    candidates: GuidedSamples
    combined: Tensor
    chosen: Tensor


def candidate_seed(seed: int, index: int) -> int:
    """Seed of the `index`-th best-of-N candidate of a sample seeded `seed`: candidate 0 is the sample itself."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


class _Window:
    """Which steps are guided: those whose noise level t lies in `guidance.window`, every `guidance.every`-th of
    them counting from the first step inside the window."""

    def __init__(self, g: GuidanceConfig):
        self.g, self.seen = g, 0

    def __call__(self, t: float) -> bool:
        g = self.g
        if g.scale == 0 or not g.window[0] <= t <= g.window[1]:
            return False
        self.seen += 1
        return (self.seen - 1) % g.every == 0


def _normalised(grad: Tensor, normalize: bool) -> Tensor:
    grad = grad.float()
    if not normalize:
        return grad
    rms = grad.pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
    return grad / rms.clamp_min(1e-12)


def _decode_for_reward(pipe, x0: Tensor, checkpoint: bool) -> Tensor:
    if checkpoint and getattr(pipe, "vae", None) is not None:
        from torch.utils.checkpoint import checkpoint as ckpt

        return ckpt(lambda z: decode(pipe, z), x0, use_reentrant=False)
    return decode(pipe, x0)


def _step_kwargs(scheduler, generators, eta: float) -> dict:
    """`eta` and `generator` for schedulers whose `step` takes them (as diffusers pipelines pass them)."""
    params = inspect.signature(scheduler.step).parameters
    out = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generators
    return out


def _diffusion_batch(pipe, scheduler, prompts: list[str], generators: list[torch.Generator], rewards: RewardSet | None,
                     g: GuidanceConfig, s: SamplerConfig, cost: dict[str, int]) -> tuple[Tensor, Tensor]:
    """DDPM/DDIM/Euler-family sampling of one batch with classifier-free guidance and reward guidance."""
    from diffusers.utils.torch_utils import randn_tensor

    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    shape = latent_shape(pipe, len(prompts), s.height, s.width)
    scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
    height, width = shape[2] * scale, shape[3] * scale
    cfg = s.cfg_scale > 1.0
    cond = encode(pipe, prompts, s.negative_prompt, cfg, height, width)
    x = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    scheduler.set_timesteps(s.steps, device=device)
    x = x * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators, s.eta)
    prediction_type = scheduler.config.prediction_type
    abars = vp.abar_schedule(scheduler)
    guided = _Window(g)
    passes = 2 if cfg else 1
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(x, t)
        t_frac = vp.noise_time(scheduler, abars[i])
        cost["denoiser_forward"] += passes
        grad = None
        if not guided(t_frac):
            with torch.no_grad():
                pred = predict(pipe, model_in, t, cond, s.cfg_scale)
        else:
            abar = abars[i]
            through_model = rewards.needs_pixels() and g.grad_through == "model"
            with torch.enable_grad():
                # A float32 leaf: the gradient of a reward through a half-precision model loses small entries.
                x_t = model_in.detach().float().requires_grad_(True)
                if through_model:
                    pred = predict(pipe, x_t, t, cond, s.cfg_scale)
                    x0 = vp.predicted_x0(pred.float(), x_t, abar, prediction_type)
                    cost["denoiser_backward"] += passes
                else:
                    with torch.no_grad():
                        pred = predict(pipe, model_in, t, cond, s.cfg_scale)
                    # The noise held fixed: x0 = (x_t - sqrt(1 - abar)·eps) / sqrt(abar), d x0 / d x_t = 1/sqrt(abar).
                    eps = vp.to_epsilon(pred.float(), model_in.float(), abar, prediction_type)
                    x0 = (x_t - (1 - abar) ** 0.5 * eps) / abar ** 0.5
                images = None
                if rewards.needs_pixels():
                    images = _decode_for_reward(pipe, x0, g.checkpoint_decode)
                    cost["decoder_backward"] += int(getattr(pipe, "vae", None) is not None)
                t_vec = torch.full((x_t.shape[0],), t_frac, device=device)
                objective = rewards.objective(prompts, images, x_t, t_vec)
                (grad,) = torch.autograd.grad(objective.sum(), x_t)
            pred = pred.detach()
        x = scheduler.step(pred, t, x, **step_kwargs, return_dict=False)[0]
        if grad is not None:
            x = vp.guided_update(x, _normalised(grad, g.normalize), g.scale, abars[i], abars[i + 1],
                                 vp.sigma_space(scheduler))
    with torch.no_grad():
        return decode(pipe, x), x


def _flow_batch(pipe, scheduler, prompts: list[str], generators: list[torch.Generator], rewards: RewardSet | None,
                g: GuidanceConfig, s: SamplerConfig, cost: dict[str, int]) -> tuple[Tensor, Tensor]:
    """Rectified-flow Euler sampling (t from 1 to 0) of one batch with classifier-free and reward guidance."""
    from diffusers.utils.torch_utils import randn_tensor

    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    shape = latent_shape(pipe, len(prompts), s.height, s.width)
    height, width = shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor
    cfg = s.cfg_scale > 1.0
    cond = encode(pipe, prompts, s.negative_prompt, cfg, height, width)
    x = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = model.config.patch_size
        c = scheduler.config
        kwargs["mu"] = calculate_shift((shape[2] // patch) * (shape[3] // patch), c.get("base_image_seq_len", 256),
                                       c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                       c.get("max_shift", 1.16))
    scheduler.set_timesteps(s.steps, device=device, **kwargs)
    guided = _Window(g)
    passes = 2 if cfg else 1
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        cost["denoiser_forward"] += passes
        if not guided(sigma):
            with torch.no_grad():
                v = predict(pipe, x, t, cond, s.cfg_scale)
        else:
            through_model = rewards.needs_pixels() and g.grad_through == "model"
            with torch.enable_grad():
                x_t = x.detach().float().requires_grad_(True)
                if through_model:
                    v = predict(pipe, x_t, t, cond, s.cfg_scale)
                    cost["denoiser_backward"] += passes
                else:
                    with torch.no_grad():
                        v = predict(pipe, x, t, cond, s.cfg_scale)
                x0 = flow.predicted_x0(v.float(), x_t, sigma)
                images = None
                if rewards.needs_pixels():
                    images = _decode_for_reward(pipe, x0, g.checkpoint_decode)
                    cost["decoder_backward"] += 1
                t_vec = torch.full((x_t.shape[0],), sigma, device=device)
                objective = rewards.objective(prompts, images, x_t, t_vec)
                (grad,) = torch.autograd.grad(objective.sum(), x_t)
            v = flow.guided_velocity(v.detach(), _normalised(grad, g.normalize), g.scale).to(v.dtype)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    with torch.no_grad():
        return decode(pipe, x), x


def guided_sample(pipe, prompts: list[str], seeds: list[int], rewards: RewardSet | None = None, *,
                  guidance: GuidanceConfig | None = None, sampler: SamplerConfig | None = None,
                  progress: bool = True) -> GuidedSamples:
    """Sample one image per (prompt, seed) with reward guidance; see the module docstring.

    `rewards` may be None only for unguided sampling (`guidance.scale == 0`); when given, every sample is scored
    by every reward (`GuidedSamples.scores`).
    """
    from tqdm.auto import tqdm

    g = guidance or GuidanceConfig()
    s = sampler or SamplerConfig()
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per sample")
    run = _flow_batch if family(pipe) == "flow" else _diffusion_batch
    scheduler = scheduler_from(pipe, s.scheduler)
    if g.scale != 0:
        if rewards is None or not rewards.active:
            raise ValueError(f"guidance.scale {g.scale} needs at least one reward of non-zero weight")
        rewards.check_guidable()
        _check_latent_process(pipe, rewards)
        if family(pipe) == "diffusion":
            vp.check_guidable(scheduler)
    device = denoiser(pipe).device
    cost = {"denoiser_forward": 0, "denoiser_backward": 0, "decoder_backward": 0}
    images, latents, scores = [], [], []
    starts = range(0, len(prompts), s.batch_size)
    for start in tqdm(starts, desc="guided sampling" if g.scale else "sampling", disable=not progress):
        batch_prompts = list(prompts[start:start + s.batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds[start:start + s.batch_size]]
        batch_cost = dict.fromkeys(cost, 0)
        img, lat = run(pipe, scheduler, batch_prompts, gens, rewards, g, s, batch_cost)
        for k in cost:
            cost[k] = batch_cost[k]  # per image: every image of a batch costs the same passes
        if rewards is not None:
            scores.append(rewards.score(batch_prompts, img.to(device), lat))
        images.append(img.cpu())
        latents.append(lat.detach().cpu())
    merged = {k: torch.cat([b[k] for b in scores]) for k in scores[0]} if scores else {}
    return GuidedSamples(torch.cat(images), torch.cat(latents), list(prompts), [int(x) for x in seeds], merged, cost)


def _check_latent_process(pipe, rewards: RewardSet) -> None:
    """A noisy-latent reward model must have been trained on the pipeline's noising process."""
    want = "flow" if family(pipe) == "flow" else "ddpm"
    for term in rewards.active:
        if term.latent and getattr(term.model, "process", want) != want:
            raise ValueError(f"reward {term.spec!r} was trained on {term.model.process!r} noisy latents, but "
                             f"{type(pipe).__name__} samples with a {want!r} process")


def best_of_n(pipe, prompts: list[str], seeds: list[int], rewards: RewardSet, n: int, *, normalize: str = "none",
              guidance: GuidanceConfig | None = None, sampler: SamplerConfig | None = None,
              progress: bool = True) -> BestOfN:
    """N candidates per prompt (candidate j seeded `candidate_seed(seed, j)`, so candidate 0 is what
    `guided_sample` gives for that seed), each scored by every reward; the kept one maximises the weighted score
    `RewardSet.combine` (z-normalised per dimension with normalize="z"). Any
    scorer works, differentiable or not; with `guidance.scale != 0` every candidate is also guided. z is taken over
    each prompt's own N candidates (so the choice does not depend on the other prompts or the batching; with N = 2
    every column's z is +-1, a vote per reward: use N >= 3 for the spread to count)."""
    if n < 1:
        raise ValueError(f"best_of must be >= 1, got {n}")
    cand_prompts = [p for p in prompts for _ in range(n)]
    cand_seeds = [candidate_seed(seed, j) for seed in seeds for j in range(n)]
    candidates = guided_sample(pipe, cand_prompts, cand_seeds, rewards, guidance=guidance, sampler=sampler,
                               progress=progress)
    combined = rewards.combine(candidates.scores, normalize, group=n).view(len(prompts), n)
    chosen = combined.argmax(dim=1)
    return BestOfN(candidates.select(torch.arange(len(prompts)) * n + chosen), candidates, combined, chosen)
