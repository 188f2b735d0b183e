"""SPO on text-to-image diffusion: the log-density of one denoising transition under the policy and the reference.

A step pair (`step_pair` shards, written by `mmalign selfgen spo`) holds one state x_t of a DDIM run (its timestep
t, `num_inference_steps`, `eta`, classifier-free guidance scale) and two next states drawn from it, the winner x_w
and the loser x_l by the step-aware preference model. Each next state's surrogate is

    log π(x_{t-1} | x_t, c) = the Gaussian log-density of the DDIM step (`mmalign.samplers.ddim`), mean over C,H,W

with the model output exactly as in sampling: `eps_u + g·(eps_c - eps_u)` against the empty prompt when the row's
guidance scale g > 1 (SPO's training does the same). The mean over elements is what SPO's β = 10 assumes (the
published sampler's convention); a sum would need β / (C·H·W). The method table's `spo` turns the (2, B)
surrogates of policy and reference into `spo_step_loss`; at policy == reference the loss is exactly ln 2.

The DDIM scheduler is built from the pipeline's own scheduler config (`ddim_scheduler`), so training scores the
transitions the resampler drew: `set_alpha_to_one`, `steps_offset` and the timestep spacing come from the model's
folder, whatever scheduler class it ships (SD 1.5's PNDM config, SDXL's Euler config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmalign.models.contract import Surrogates
from mmalign.samplers.ddim import ddim_step_with_logprob

if TYPE_CHECKING:
    from mmalign.t2i.adapter import T2IAdapter, TextConditioning


def ddim_scheduler(pretrained: str, num_inference_steps: int, revision: str | None = None):
    """A `DDIMScheduler` from the pipeline's scheduler config, with its timesteps set."""
    from diffusers import DDIMScheduler

    config = DDIMScheduler.load_config(pretrained, subfolder="scheduler", revision=revision)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler


def _same(values: Tensor, what: str, keys) -> float:
    """The one value every row of the batch shares (the step's schedule and eta are per run, not per row)."""
    values = values.flatten()
    if not bool((values == values[0]).all()):
        raise ValueError(f"step pairs {list(keys)}: rows of one batch must share {what} (got "
                         f"{sorted(set(values.tolist()))}); write them from one sampling configuration")
    return float(values[0])


def guided_prediction(adapter: T2IAdapter, unet: torch.nn.Module, x_t: Tensor, timesteps: Tensor,
                      cond: TextConditioning, uncond: TextConditioning | None, guidance_scale: Tensor,
                      time_ids: Tensor | None) -> Tensor:
    """The model output used by the sampler: with classifier-free guidance (rows with g > 1) against `uncond`."""
    from mmalign.t2i.adapter import TextConditioning

    dtype = next(unet.parameters()).dtype
    if uncond is None:
        return _unet(adapter, unet, x_t.to(dtype), timesteps, cond, time_ids, dtype)
    both = TextConditioning(torch.cat([uncond.prompt_embeds, cond.prompt_embeds]),
                            None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled]))
    tid = None if time_ids is None else torch.cat([time_ids, time_ids])
    out = _unet(adapter, unet, torch.cat([x_t, x_t]).to(dtype), torch.cat([timesteps, timesteps]), both, tid, dtype)
    eps_u, eps_c = out.float().chunk(2)
    g = guidance_scale.to(eps_c.device, eps_c.dtype).view(-1, *([1] * (eps_c.ndim - 1)))
    return eps_u + g * (eps_c - eps_u)


def _unet(adapter, unet, x, timesteps, cond, time_ids, dtype) -> Tensor:
    kwargs = {}
    if adapter.c.is_sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(x.device, dtype),
                                       "time_ids": time_ids.to(x.device, dtype)}
    return unet(x, timesteps.to(x.device), cond.prompt_embeds.to(x.device, dtype), **kwargs).sample.float()


class TransitionScorer:
    """Scores step pairs for an adapter; the DDIM scheduler is built once per `num_inference_steps`."""

    def __init__(self, adapter: T2IAdapter, revision: str | None = None):
        self.adapter, self.revision = adapter, revision
        self._schedulers: dict[int, object] = {}

    def scheduler(self, num_inference_steps: int):
        if num_inference_steps not in self._schedulers:
            self._schedulers[num_inference_steps] = ddim_scheduler(self.adapter.c.pretrained, num_inference_steps,
                                                                   self.revision)
        return self._schedulers[num_inference_steps]

    def logps(self, unet: torch.nn.Module, batch: dict, cond: TextConditioning, uncond: TextConditioning | None,
              time_ids: Tensor | None) -> Tensor:
        """(2, B) log-densities of [x_w; x_l] given x_t under `unet`."""
        device = next(unet.parameters()).device
        keys = batch.get("keys", [])
        steps = int(_same(batch["num_inference_steps"], "num_inference_steps", keys))
        eta = _same(batch["eta"], "eta", keys)
        sched = self.scheduler(steps)
        x_t = batch["x_t"].to(device).float()
        t = batch["timesteps"].to(device).long()
        expected = t - sched.config.num_train_timesteps // steps
        if not torch.equal(expected.cpu(), batch["prev_timesteps"].long().cpu()):
            raise ValueError(f"step pairs {list(keys)}: stored prev_timesteps {batch['prev_timesteps'].tolist()} "
                             f"are not this pipeline's DDIM schedule at {steps} steps ({expected.tolist()})")
        pred = guided_prediction(self.adapter, unet, x_t, t, cond, uncond, batch["guidance_scale"], time_ids)
        out = []
        for name in ("x_w", "x_l"):
            step = ddim_step_with_logprob(sched, pred, t, x_t, eta=eta, prev_sample=batch[name].to(device).float())
            out.append(step.log_prob)
        return torch.stack(out)

    def surrogates(self, policy: torch.nn.Module, batch: dict, with_reference: bool,
                   unwrapped: torch.nn.Module | None = None) -> Surrogates:
        """The adapter contract for step pairs: `Surrogates` (2, B) of kind "transition"."""
        a = self.adapter
        captions = list(batch["captions"])
        cond = a.encode_text(captions)
        cfg = bool((batch["guidance_scale"] > 1).any())
        uncond = a.encode_text([""] * len(captions)) if cfg else None
        time_ids = None
        if a.c.is_sdxl:
            size = batch["x_t"].shape[-1] * 8  # the VAE's 8x: the sampled images' size, no crop
            sizes = torch.tensor([[size, size]] * len(captions))
            time_ids = a.time_ids(sizes, torch.zeros_like(sizes), (size, size))
        policy_logps = self.logps(policy, batch, cond, uncond, time_ids)
        ref = None
        if with_reference:
            with torch.no_grad(), a._reference_unet(unwrapped or policy) as ref_unet:
                ref = self.logps(ref_unet, batch, cond, uncond, time_ids)
        return Surrogates(policy_logps, ref, "transition", t=batch["timesteps"])
