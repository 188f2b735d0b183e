"""Variance-preserving diffusion: `x_t = sqrt(abar_t)·x0 + sqrt(1 - abar_t)·eps` (DDPM, DDIM, Euler-style).

Every function works in the variance-preserving parametrisation, i.e. on the *model input*: for DDPM/DDIM that is
the scheduler's sample itself, for sigma-space schedulers (Euler, Euler-ancestral, whose sample is
`x0 + sigma·eps`) it is `scheduler.scale_model_input(sample, t) = sample / sqrt(sigma^2 + 1)`, with
`abar = 1 / (1 + sigma^2)`. Predictions are converted between the three `prediction_type`s diffusers knows:

- epsilon: `eps`;
- v_prediction: `v = sqrt(abar)·eps - sqrt(1 - abar)·x0`;
- sample: `x0`.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# Schedulers whose `step` is one memoryless move from x_t to x_next, so a displacement of x_next is what the next
# step sees. Multistep / two-stage schedulers (PNDM, Heun, KDPM2, DPM-Solver, UniPC, DEIS) keep samples or
# model outputs between calls and would drop or distort it; guidance refuses them (`check_guidable`).
VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
SIGMA_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
GUIDABLE = VP_SCHEDULERS + SIGMA_SCHEDULERS


def check_guidable(scheduler) -> None:
    """ValueError naming the scheduler class when reward guidance cannot move its samples (see GUIDABLE)."""
    name = type(scheduler).__name__
    if name not in GUIDABLE:
        raise ValueError(f"sampler.scheduler: {name} keeps state between steps (multistep or two-stage), which would "
                         f"drop or distort the guidance move; guidance samples with {', '.join(GUIDABLE)}: set "
                         "sampler.scheduler to ddim, ddpm or euler_ancestral")


def sigma_space(scheduler) -> bool:
    """Whether the scheduler's sample is `x0 + sigma·eps` (Euler-style) rather than the variance-preserving `x_t`
    (DDPM, DDIM). By class: DPM-Solver / UniPC also carry `sigmas` but sample in VP space."""
    return type(scheduler).__name__ in SIGMA_SCHEDULERS


def abar_schedule(scheduler) -> list[float]:
    """abar at the input of each sampling step and after the last one (len(timesteps) + 1 values), after
    `set_timesteps`, as the scheduler's own step computes them: `1 / (1 + sigma^2)` for sigma-space schedulers
    (the last sigma is 0: clean); for DDIM the previous timestep `t - T // steps` (below 0: `final_alpha_cumprod`,
    which is `alphas_cumprod[0]` unless `set_alpha_to_one`); for DDPM `previous_timestep(t)` (below 0: 1)."""
    if sigma_space(scheduler):
        return [1.0 / (1.0 + float(s) ** 2) for s in scheduler.sigmas[: len(scheduler.timesteps) + 1]]
    ac = scheduler.alphas_cumprod
    out = [float(ac[int(t)]) for t in scheduler.timesteps]
    last = int(scheduler.timesteps[-1])
    if type(scheduler).__name__ == "DDIMScheduler":
        prev = last - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        final = float(ac[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    elif hasattr(scheduler, "previous_timestep"):
        prev = int(scheduler.previous_timestep(last))
        final = float(ac[prev]) if prev >= 0 else 1.0
    else:
        final = 1.0
    return out + [final]


def noise_time(scheduler, abar: float) -> float:
    """The noise level as a training time in [0, 1]: `k / T` for the training timestep k whose abar is nearest
    (exactly `t / T` for DDPM/DDIM's integer timesteps; the sigma-space schedulers' continuous or fractional
    timesteps map onto the same grid a noisy-latent reward model was trained on)."""
    ac = scheduler.alphas_cumprod
    k = int(torch.argmin((ac - abar).abs()))
    return k / len(ac)


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")


def _at_least(x: Tensor | float, floor: float = 1e-12) -> Tensor | float:
    return x.clamp(min=floor) if isinstance(x, Tensor) else max(x, floor)


def to_epsilon(pred: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """The noise the prediction implies. Here and below a tensor `abar` broadcasts against `x_t` (per sample:
    shape (B, 1, ..., 1))."""
    _check(prediction_type)
    a, s = abar ** 0.5, (1.0 - abar) ** 0.5
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a * pred + s * x_t
    return (x_t - a * pred) / _at_least(s)


def from_epsilon(eps: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """The prediction, in `prediction_type`, that implies noise `eps` at `x_t` (inverse of `to_epsilon`)."""
    _check(prediction_type)
    a, s = abar ** 0.5, (1.0 - abar) ** 0.5
    if prediction_type == "epsilon":
        return eps
    x0 = (x_t - s * eps) / _at_least(a)
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    return x0


def predicted_x0(pred: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """Tweedie's estimate of the clean sample, `E[x0 | x_t] = (x_t - sqrt(1 - abar)·eps) / sqrt(abar)`."""
    _check(prediction_type)
    a, s = abar ** 0.5, (1.0 - abar) ** 0.5
    if prediction_type == "sample":
        return pred
    if prediction_type == "v_prediction":
        return a * x_t - s * pred
    return (x_t - s * pred) / _at_least(a)


def guided_update(x_next: Tensor, grad: Tensor, scale: float, abar: float, abar_next: float,
                  sigma_space: bool) -> Tensor:
    """Move the scheduler's next sample up the reward gradient `grad` (taken at the variance-preserving x_t):
    `x_vp <- x_vp + scale·(sqrt(1 - abar) - sqrt(1 - abar_next))·grad`, the step's decrease of the noise level
    times the gradient, as a flow Euler step does with `v <- v - scale·grad` (`mmalign.samplers.flow`): over a
    whole trajectory the steps sum to `scale` (times the gradient's size). In sigma space the displacement is
    scaled to the sample, `x = x_vp / sqrt(abar)`.

    Why after the step and not by editing the noise prediction (classifier guidance): schedulers that clip the
    clean estimate (`clip_sample`, the toy's DDIM) keep the edited noise but clip the edited clean estimate, which
    turns the net move of an edited prediction against the gradient; a displacement of the sample has the right
    sign under every scheduler."""
    move = scale * ((1.0 - abar) ** 0.5 - (1.0 - abar_next) ** 0.5)
    if sigma_space:
        move = move / abar_next ** 0.5
    return x_next + move * grad.to(x_next.dtype)


def add_noise(x0: Tensor, noise: Tensor, abar: Tensor | float) -> Tensor:
    """`sqrt(abar)·x0 + sqrt(1 - abar)·noise`; a tensor `abar` is (N,) and broadcasts over the other dims."""
    abar = torch.as_tensor(abar, dtype=x0.dtype, device=x0.device)
    if abar.ndim:
        abar = abar.view(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
