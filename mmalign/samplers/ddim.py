"""DDIM (Song et al. 2021, eq. 12 and 16) as a Gaussian transition with its log-density, for SPO / DDPO-style
training on single denoising steps.

From x_t at timestep t to the previous timestep `t_prev = t - T // num_inference_steps` (as `DDIMScheduler.step`):

    x0   = the clean estimate of the prediction (clipped or thresholded as the scheduler's config says)
    eps  = the noise the (unclipped) prediction implies
    std  = eta · sqrt((1 - abar_prev) / (1 - abar_t) · (1 - abar_t / abar_prev))
    mean = sqrt(abar_prev) · x0 + sqrt(1 - abar_prev - std²) · eps
    x_prev ~ N(mean, std²·I)

with `abar_prev = alphas_cumprod[t_prev]` for `t_prev >= 0` and `final_alpha_cumprod` below 0 (1 with
`set_alpha_to_one`, else `alphas_cumprod[0]`).

The published step this replaces, ddpo-pytorch's `ddim_step_with_logprob`
(github.com/kvablack/ddpo-pytorch, ddpo_pytorch/diffusers_patch/ddim_with_logprob.py, copied into SPO's
github.com/RockeyCoss/SPO, spo/custom_diffusers/ddim_with_logprob.py and ddim_seperate.py), clamps first,
``prev_timestep = torch.clamp(prev_timestep, 0, num_train_timesteps - 1)``, and then takes
``torch.where(prev_timestep >= 0, alphas_cumprod.gather(0, prev_timestep), final_alpha_cumprod)`` (in the step
and again in `_get_variance`): the condition is always true, so the last step goes to `alphas_cumprod[0]` instead
of `final_alpha_cumprod`. With `set_alpha_to_one` (diffusers' default, and the toy world's scheduler) that last step
should be deterministic (std 0, straight to the clean estimate) but is drawn with noise, and its "log-density" is
that of a transition the scheduler never makes (from t = 0, as leading spacing without `steps_offset` ends, it even
returns x_t unchanged). Here the branch is taken on the unclamped `t_prev`; the clamp only
keeps the (unused) gather in range. Without `set_alpha_to_one` (SD 1.5's and SDXL's scheduler configs set it false)
both give `alphas_cumprod[0]`, so there the published numbers are unaffected.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.samplers.diffusion import predicted_x0, to_epsilon
from mmalign.samplers.gaussian import GaussianStep, Generators, compute_dtype, draw_or_score, per_sample

FN = "ddim_step_with_logprob"


def ddim_step_with_logprob(scheduler, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
                           eta: float = 1.0, prev_sample: Tensor | None = None,
                           generator: Generators = None) -> GaussianStep:
    """One DDIM step of a diffusers `DDIMScheduler` (after `set_timesteps`) with its Gaussian transition and
    log-density (module docstring).

    Args:
        scheduler: a `DDIMScheduler`; its `prediction_type` (epsilon, v_prediction, sample), `clip_sample` /
            `clip_sample_range` and `thresholding` are honoured as `DDIMScheduler.step` does (with its default
            `use_clipped_model_output=False`: the direction term uses the unclipped prediction's noise).
        model_output: (B, ...) the model's prediction at `sample` (after classifier-free guidance, if any).
        timestep: int, or a (B,) tensor of per-sample timesteps (a training batch mixes transitions of different
            steps).
        sample: (B, ...) x_t.
        eta: in (0, 1]; 1 is DDPM-like ancestral sampling (SPO's and DDPO's setting). eta = 0 is deterministic
            and has no density: use `scheduler.step`.
        prev_sample: (B, ...) the next state to score (training: the stored x_{t-1}); None draws one.
        generator: for the draw, as `DDIMScheduler.step` uses it (the same seed gives the same noise).

    Returns:
        `GaussianStep` (prev_sample, mean, std (B,), log_prob (B,) = mean over elements; β = 10 of
        `spo_step_loss` assumes this mean, a sum would need β / numel). `std` is 0 and `log_prob` NaN where the
        step is deterministic: to `abar_prev = 1` (the last step with `set_alpha_to_one`) or with
        `abar_prev = abar_t` (from t = 0 without it); scoring such a step is a ValueError."""
    abar_t, abar_prev = _abars(scheduler, timestep, sample)
    eta = float(eta)
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"{FN}: eta must be in (0, 1], got {eta}; eta = 0 (deterministic DDIM) has no transition "
                         "density, use scheduler.step for it")
    dtype = compute_dtype(model_output.dtype)
    pred, x_t = model_output.to(dtype), sample.to(dtype)
    a_t, a_prev = per_sample(abar_t.to(dtype), x_t.ndim), per_sample(abar_prev.to(dtype), x_t.ndim)

    prediction_type = scheduler.config.prediction_type
    x0 = _clip_or_threshold(scheduler, predicted_x0(pred, x_t, a_t, prediction_type))
    eps = to_epsilon(pred, x_t, a_t, prediction_type)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    mean = a_prev ** 0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    return draw_or_score(FN, mean, std.flatten(), prev_sample, generator, model_output.dtype, sample.dtype)


def _abars(scheduler, timestep: int | Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """(abar_t, abar_prev), each (B,) on the sample's device. The previous timestep is `t - T // steps` as in
    `DDIMScheduler.step`; the `final_alpha_cumprod` branch is taken on it unclamped (module docstring)."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"{FN}: scheduler is {type(scheduler).__name__}; this step is DDIM's, pass a DDIMScheduler "
                         "(e.g. DDIMScheduler.from_config(pipe.scheduler.config))")
    if scheduler.num_inference_steps is None:
        raise ValueError(f"{FN}: the scheduler has no inference steps; call scheduler.set_timesteps(n) first")
    ac = scheduler.alphas_cumprod
    n = len(ac)
    t = torch.as_tensor(timestep).to(ac.device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{FN}: timestep must be integer training timesteps in [0, {n}), got {t.tolist()}")
        t = t.long()
    t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(-1)
    if t.shape[0] != sample.shape[0]:
        raise ValueError(f"{FN}: {t.shape[0]} timesteps for a batch of {sample.shape[0]}; give one, or one per sample")
    if bool(((t < 0) | (t >= n)).any()):
        raise ValueError(f"{FN}: timesteps {t.tolist()} outside the training range [0, {n})")
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=ac.dtype)
    abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    return ac[t].to(sample.device), abar_prev.to(sample.device)


def _clip_or_threshold(scheduler, x0: Tensor) -> Tensor:
    """Step 4 of `DDIMScheduler.step`: dynamic thresholding, else clipping to ±clip_sample_range."""
    c = scheduler.config
    if c.thresholding:
        return scheduler._threshold_sample(x0)
    if c.clip_sample:
        return x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    return x0
