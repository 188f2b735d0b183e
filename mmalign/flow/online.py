"""Online flow training (`online:` in a `task: flow` config): pairs made during training from the model's samples.

Each micro-batch is B prompts from `online.prompts` (a text file, one prompt per line, or JSONL with `prompt`).
For each prompt the sampler draws N samples (`online.num_samples`) from the current policy (or the reference,
`online.sample_from`) with Euler steps on the pipeline's own flow schedule (`online.steps`; classifier-free
guidance against the empty prompt when `online.guidance_scale > 1`), decodes them and scores them with the
rewards (`online.rewards`: any registered scorer, video or image, with per-dimension weights; the group's reward is
`sum_reward weight·sum_d dim_weight_d·score_d`). Then, by method:

- `flow_dpo`: the group's best and worst become one pair [best; worst] (flow_grpo's and VideoAlign's online pairs);
- `sft`: the best sample is the target (the worst rides along unused, as with offline pairs);
- `flow_rwr`: all N samples, each weighted by its reward (`softmax(r / temperature)` over the micro-batch).

A group whose best and worst rewards differ by no more than `online.min_gap` teaches nothing (equal rewards): it is
dropped and counted (`online/groups_skipped`). A micro-batch with no group left is skipped (`skipped/online_no_gap`)
on one process; under DDP the step still runs every process's forward and backward (the ranks must agree) with
the loss multiplied by 0, so it moves nothing but the optimizer's momentum and weight decay.

Samples are generated in latent space and trained on as they were generated (no decode / re-encode round trip);
their pixels exist only for the rewards. All randomness (the initial noise, then the training t and noise) comes
from the step's generator, so a resumed run repeats the same samples.

The reference can follow the policy: `online.ref_update_every: K` moves it to the policy every K optimizer steps
(flow_grpo's `ref_update_step`; `mmalign.models.reference.RefreshedReference`); the snapshot is saved with every
checkpoint, so a resumed run compares against the same reference.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from mmalign.config import StrictModel
from mmalign.flow.adapter import FlowAdapter, FlowConditioning
from mmalign.rewards.combine import RewardSpec


class FlowOnlineConfig(StrictModel):
    prompts: str = Field(..., description="Prompt file: one prompt per line ('#' comments) or JSONL with 'prompt'.")
    num_samples: int = Field(4, ge=2, description="Samples per prompt (N); the pair is the best and the worst.")
    steps: int = Field(10, ge=1, description="Euler sampling steps on the pipeline's flow schedule.")
    guidance_scale: float = Field(1.0, ge=1.0, description="Classifier-free guidance of the samples against the "
                                                           "empty prompt (1 = none).")
    sample_from: Literal["policy", "reference"] = Field(
        "policy", description="policy = on-policy samples from the model being trained; reference = from the "
                              "reference (the starting model until it is refreshed).")
    rewards: list[RewardSpec] = Field(..., min_length=1, description="Rewards of a sample: scorer specs with "
                                                                      "weights and per-dimension weights.")
    min_gap: float = Field(0.0, ge=0.0, description="A group whose best - worst reward is <= this is skipped.")
    ref_update_every: int = Field(0, ge=0, description="Move the reference to the policy every K optimizer steps "
                                                       "(0 = never).")
    max_prompts: Optional[int] = Field(None, gt=0, description="Use only the first N prompts of the file.")


# -- sampling ---------------------------------------------------------------------------------------------------------
def latent_shape(adapter: FlowAdapter, n: int, num_frames: int, resolution: int) -> tuple[int, ...]:
    """The latent shape of n samples of `resolution`² pixels (and `num_frames` frames for video)."""
    c = adapter.c
    fam = c.family
    if fam == "toy_video":
        return (n, c.transformer.config.in_channels, num_frames, resolution, resolution)
    vae = c.vae
    if fam == "wan":
        return (n, vae.config.z_dim, (num_frames - 1) // vae.config.scale_factor_temporal + 1,
                resolution // vae.config.scale_factor_spatial, resolution // vae.config.scale_factor_spatial)
    if fam == "sd3":
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return (n, c.transformer.config.in_channels, resolution // f, resolution // f)
    raise ValueError(f"online sampling supports the sd3, wan and toy_video families, not {fam!r}")


def sampling_scheduler(adapter: FlowAdapter):
    """A fresh Euler scheduler with the training schedule's shift (the pipeline's, or `model.shift`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(adapter.c.train_scheduler.config)
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{adapter.c.pretrained}: the scheduler uses dynamic shifting; online sampling needs a fixed "
                         "shift (set model.shift)")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


@torch.no_grad()
def sample_latents(adapter: FlowAdapter, model: torch.nn.Module, cond: FlowConditioning,
                   uncond: FlowConditioning | None, shape: tuple[int, ...], generator: torch.Generator,
                   steps: int, guidance_scale: float = 1.0) -> Tensor:
    """Euler sampling from t = 1 to 0 (`scheduler.step`, as the pipelines do): (N, ...) latents in float32. The
    initial noise is drawn on the CPU from `generator`."""
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=generator).to(device)
    scheduler = sampling_scheduler(adapter)
    scheduler.set_timesteps(steps, device=device)
    cfg = guidance_scale > 1.0 and uncond is not None
    both = FlowConditioning(torch.cat([uncond.prompt_embeds, cond.prompt_embeds]),
                            None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled])) if cfg else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if cfg else x
        v = adapter.predict(model, model_in, t.expand(model_in.shape[0]), both).float()
        if cfg:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance_scale * (v_text - v_uncond)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.float()


@torch.no_grad()
def decode(adapter: FlowAdapter, latents: Tensor) -> Tensor:
    """Latents -> pixels in [0, 1]: images (N, 3, H, W), videos (N, F, 3, H, W) (the layout video scorers take)."""
    c = adapter.c
    if c.family == "toy_video" or c.vae is None:
        x = latents
    else:
        vae = c.vae
        z = latents.to(vae.device, vae.dtype)
        if c.family == "wan":
            shape = (1, -1) + (1,) * (z.ndim - 2)
            mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
            std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(shape)
            z = z * std + mean
        else:
            z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        x = vae.decode(z, return_dict=False)[0]
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return x.permute(0, 2, 1, 3, 4) if x.ndim == 5 else x


# -- pairs ------------------------------------------------------------------------------------------------------------
class OnlineSampler:
    """Makes a micro-batch's training groups from its prompts: sample, decode, score, pick (module docstring)."""

    def __init__(self, adapter: FlowAdapter, cfg: FlowOnlineConfig, rewards, *, num_frames: int, resolution: int):
        self.adapter, self.cfg, self.rewards = adapter, cfg, rewards
        self.num_frames, self.resolution = num_frames, resolution

    def score(self, prompts: list[str], pixels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(N,) combined rewards and every column's (N,) scores."""
        total, columns = torch.zeros(len(prompts)), {}
        for term in self.rewards.terms:
            raw = term.raw(prompts, images=pixels)
            columns.update({c: raw[:, j].cpu() for j, c in enumerate(term.columns)})
            if term.weight:
                total = total + term.weight * (raw @ torch.tensor(term.dim_weights, dtype=raw.dtype,
                                                                  device=raw.device)).cpu()
        return total, columns

    def groups(self, policy_unwrapped: torch.nn.Module, captions: list[str], method: str,
               generator: torch.Generator) -> dict:
        """{"latents": (K, B', ...), "cond": FlowConditioning (B'), "item_rewards": (K, B') for flow_rwr,
        "kept": (B,) bool, "metrics"}; K = 2 ([best; worst]) or N (flow_rwr)."""
        a, n, b = self.adapter, self.cfg.num_samples, len(captions)
        prompts = [p for p in captions for _ in range(n)]  # prompt-major: group i is rows i·N .. i·N + N - 1
        cond = a.encode_text(prompts)
        uncond = a.encode_text([""] * len(prompts)) if self.cfg.guidance_scale > 1 else None
        shape = latent_shape(a, len(prompts), self.num_frames, self.resolution)
        was_training = policy_unwrapped.training
        policy_unwrapped.eval()
        try:
            if self.cfg.sample_from == "reference":
                with a._reference(policy_unwrapped) as model:
                    latents = sample_latents(a, model, cond, uncond, shape, generator, self.cfg.steps,
                                             self.cfg.guidance_scale)
            else:
                latents = sample_latents(a, policy_unwrapped, cond, uncond, shape, generator, self.cfg.steps,
                                         self.cfg.guidance_scale)
        finally:
            policy_unwrapped.train(was_training)
        with torch.no_grad():
            reward, columns = self.score(prompts, decode(a, latents))
        r = reward.view(b, n)
        best, worst = r.argmax(1), r.argmin(1)
        gap = r.max(1).values - r.min(1).values
        kept = gap > self.cfg.min_gap
        grouped = latents.view(b, n, *latents.shape[1:])
        rows = torch.arange(b)
        if method == "flow_rwr":
            chosen = grouped.transpose(0, 1)  # (N, B, ...)
            item_rewards = r.T.contiguous()
        else:
            chosen = torch.stack([grouped[rows, best], grouped[rows, worst]])  # (2, B, ...)
            item_rewards = torch.stack([r[rows, best], r[rows, worst]])
        metrics = {"online/reward_mean": r.mean(), "online/reward_best": r.max(1).values.mean(),
                   "online/reward_worst": r.min(1).values.mean(), "online/reward_gap": gap.mean(),
                   "online/groups_skipped": (~kept).sum().float()}
        metrics.update({f"online/{c}": v.float().mean() for c, v in columns.items()})
        return {"latents": chosen, "cond": FlowConditioning(cond.prompt_embeds[::n], None if cond.pooled is None
                                                            else cond.pooled[::n]),
                "item_rewards": item_rewards, "kept": kept, "metrics": metrics}
