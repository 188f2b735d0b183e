"""Sampler steps with log-probabilities (`mmalign.samplers.ddim`, `mmalign.samplers.flow_sde`): the transition's
log-density against a hand computation and against sampling frequencies, equality with `DDIMScheduler.step`,
the fix of the published samplers' clamped previous timestep, per-sample timesteps, and the flow SDE's Euler limit,
its parity with flow_grpo's expression and its marginals."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from mmalign.samplers import diffusion as vp
from mmalign.samplers.ddim import ddim_step_with_logprob
from mmalign.samplers.flow_sde import sde_step_with_logprob

SHAPE = (3, 4, 5, 5)


def _ddim(prediction_type="epsilon", steps=10, **kw):
    s = DDIMScheduler(prediction_type=prediction_type, **kw)
    s.set_timesteps(steps)
    return s


def _inputs(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _hand_log_prob(x, mean, std):
    """Mean over non-batch elements of the Normal log-density; std (B,)."""
    std = std.reshape(-1, *([1] * (x.ndim - 1)))
    return Normal(mean, std).log_prob(x).flatten(1).mean(1)


# -- DDIM: equality with diffusers -----------------------------------------------------------------------------

CONFIGS = [dict(clip_sample=False), dict(clip_sample=True, clip_sample_range=0.5),
           dict(clip_sample=False, thresholding=True, sample_max_value=1.5)]


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "clip", "threshold"])
@pytest.mark.parametrize("ptype", vp.PREDICTION_TYPES)
def test_ddim_equals_scheduler_step_at_every_step(ptype, config, set_alpha_to_one):
    s = _ddim(ptype, set_alpha_to_one=set_alpha_to_one, **config)
    x, pred = _inputs()
    for t in s.timesteps:
        out = ddim_step_with_logprob(s, pred, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
        # The same generator draws the same noise as the scheduler's own draw...
        ref = s.step(pred, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
        torch.testing.assert_close(out.prev_sample, ref, rtol=0, atol=0)
        # ... and that noise given explicitly reproduces it; zero noise gives the mean.
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(out.prev_sample, s.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample,
                                   rtol=0, atol=0)
        mean = s.step(pred, t, x, eta=1.0, variance_noise=torch.zeros(SHAPE)).prev_sample
        torch.testing.assert_close(out.mean, mean, rtol=0, atol=0)
        prev = int(t) - s.config.num_train_timesteps // s.num_inference_steps
        torch.testing.assert_close(out.std, (s._get_variance(int(t), prev) ** 0.5).expand(3), rtol=0, atol=0)


def test_ddim_eta_below_one_matches_scheduler_step():
    s = _ddim("v_prediction")
    x, pred = _inputs(1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = s.timesteps[4]
    out = ddim_step_with_logprob(s, pred, t, x, eta=0.4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.prev_sample, s.step(pred, t, x, eta=0.4, variance_noise=noise).prev_sample)


# -- the log-density ------------------------------------------------------------------------------------------


def test_ddim_log_prob_equals_a_hand_computation():
    s = _ddim("epsilon", set_alpha_to_one=False, clip_sample=False)
    x, eps = _inputs(2)
    t = int(s.timesteps[3])
    a_t, a_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t - 100])
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    std = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
    stored = mean + 0.7 * std * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))

    scored = ddim_step_with_logprob(s, eps, t, x, prev_sample=stored)
    assert scored.prev_sample is stored
    torch.testing.assert_close(scored.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored.std, torch.full((3,), std), rtol=1e-5, atol=0)
    torch.testing.assert_close(scored.log_prob, _hand_log_prob(stored, mean, torch.full((3,), std)),
                               rtol=1e-5, atol=1e-5)
    # The mean over elements: numel times it is the whole sample's log-density.
    full = Normal(mean, std).log_prob(stored).flatten(1).sum(1)
    torch.testing.assert_close(scored.log_prob * stored[0].numel(), full, rtol=1e-5, atol=1e-3)

    drawn = ddim_step_with_logprob(s, eps, t, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn.log_prob, _hand_log_prob(drawn.prev_sample, mean, torch.full((3,), std)),
                               rtol=1e-5, atol=1e-5)


def test_ddim_log_prob_gradient_reaches_the_model_output():
    # d log_prob / d eps = (x_prev - mean)/(std²·numel) · d mean / d eps, with
    # d mean / d eps = sqrt(1 - a_prev - std²) - sqrt(a_prev)·sqrt(1 - a_t)/sqrt(a_t) (through x0).
    s = _ddim("epsilon", set_alpha_to_one=False, clip_sample=False)
    x, eps = _inputs(3)
    t = int(s.timesteps[2])
    stored = ddim_step_with_logprob(s, eps, t, x, generator=torch.Generator().manual_seed(0))
    eps = eps.clone().requires_grad_(True)
    out = ddim_step_with_logprob(s, eps, t, x, prev_sample=stored.prev_sample)
    out.log_prob.sum().backward()
    a_t, a_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t - 100])
    std = float(out.std[0])
    dmean = math.sqrt(1 - a_prev - std**2) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    expected = (stored.prev_sample - out.mean.detach()) / (std**2 * eps[0].numel()) * dmean
    torch.testing.assert_close(eps.grad, expected, rtol=1e-4, atol=1e-7)


def _check_against_frequencies(step):
    """`step(prev_sample=None | grid)` on N copies of one 1-D x_t: the drawn values' mean, std and histogram agree
    with the reported mean, std and exp(log_prob), and exp(log_prob) integrates to 1."""
    n = 200_000
    out = step(None, n)
    mu, sd = float(out.mean[0, 0]), float(out.std[0])
    assert torch.allclose(out.mean, out.mean[:1]) and torch.allclose(out.std, out.std[:1])
    draws = out.prev_sample[:, 0].double()
    assert abs(float(draws.mean()) - mu) < 5 * sd / math.sqrt(n)
    assert abs(float(draws.std()) / sd - 1) < 5 * math.sqrt(0.5 / n)

    edges = torch.linspace(mu - 4 * sd, mu + 4 * sd, 41, dtype=torch.float64)
    width = float(edges[1] - edges[0])
    freq = torch.histc(draws, bins=40, min=float(edges[0]), max=float(edges[-1])) / (n * width)
    centres = ((edges[1:] + edges[:-1]) / 2).float()
    density = step(centres.reshape(-1, 1), len(centres)).log_prob.double().exp()
    torch.testing.assert_close(freq, density, rtol=0, atol=0.01 / sd)

    grid = torch.linspace(mu - 8 * sd, mu + 8 * sd, 4001, dtype=torch.float32)
    dens = step(grid.reshape(-1, 1), len(grid)).log_prob.double().exp()
    assert abs(float(torch.trapezoid(dens, grid.double())) - 1) < 1e-4


def test_ddim_log_prob_matches_sampling_frequencies():
    s = _ddim("epsilon", set_alpha_to_one=False, clip_sample=False)
    t = int(s.timesteps[5])

    def step(prev, n):
        x, eps = torch.full((n, 1), 0.8), torch.full((n, 1), -0.3)
        gen = torch.Generator().manual_seed(11) if prev is None else None
        return ddim_step_with_logprob(s, eps, t, x, prev_sample=prev, generator=gen)

    _check_against_frequencies(step)


def test_flow_sde_log_prob_matches_sampling_frequencies():
    def step(prev, n):
        x, v = torch.full((n, 1), 0.5), torch.full((n, 1), 1.2)
        gen = torch.Generator().manual_seed(12) if prev is None else None
        return sde_step_with_logprob(v, x, 0.6, 0.5, noise_level=0.7, prev_sample=prev, generator=gen)

    _check_against_frequencies(step)


# -- the clamp bug of the published samplers -------------------------------------------------------------------


def _published_abar_prev(scheduler, t: int) -> float:
    """ddpo-pytorch / SPO: `prev = clamp(t - T // steps, 0, T - 1)`, then
    `where(prev >= 0, alphas_cumprod[prev], final_alpha_cumprod)` (the branch is decided after the clamp)."""
    prev = torch.tensor(t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps)
    prev = torch.clamp(prev, 0, scheduler.config.num_train_timesteps - 1)
    return float(torch.where(prev >= 0, scheduler.alphas_cumprod.gather(0, prev.reshape(1)),
                             scheduler.final_alpha_cumprod))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_last_step_uses_final_alpha_cumprod_not_the_clamped_timestep(spacing):
    s = _ddim("sample", set_alpha_to_one=True, clip_sample=False, timestep_spacing=spacing)
    x, pred = _inputs(4)
    last = int(s.timesteps[-1])
    a_t = float(s.alphas_cumprod[last])

    # The scheduler's last step goes to abar = 1: variance 0, straight to the clean estimate.
    assert float(s._get_variance(last, last - 100)) == 0.0
    out = ddim_step_with_logprob(s, pred, last, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.std, torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(out.mean, pred, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.prev_sample, s.step(pred, last, x, eta=1.0).prev_sample, rtol=0, atol=0)
    assert torch.isnan(out.log_prob).all()  # a deterministic step has no density ...
    with pytest.raises(ValueError, match="deterministic"):  # ... and scoring one is refused
        ddim_step_with_logprob(s, pred, last, x, prev_sample=out.prev_sample)

    # The published version goes to alphas_cumprod[0] instead, and draws noise the scheduler never adds.
    a_pub = _published_abar_prev(s, last)
    assert a_pub == float(s.alphas_cumprod[0]) < 1.0
    std_pub = math.sqrt((1 - a_pub) / (1 - a_t) * (1 - a_t / a_pub))
    mean_pub = math.sqrt(a_pub) * pred + math.sqrt(1 - a_pub - std_pub**2) * (x - math.sqrt(a_t) * pred) / math.sqrt(
        1 - a_t)
    if spacing == "trailing":
        assert std_pub > 1e-3  # noise drawn where the scheduler adds none
    else:
        assert last == 0 and std_pub == 0.0  # from t = 0 it returns x_t itself instead of the clean estimate
        torch.testing.assert_close(mean_pub, x, rtol=1e-5, atol=1e-4)
    assert (mean_pub - out.mean).abs().max() > 1e-3

    # Every earlier step is the same in both versions.
    for t in s.timesteps[:-1]:
        prev = int(t) - 100
        assert _published_abar_prev(s, int(t)) == float(s.alphas_cumprod[prev])


def test_without_set_alpha_to_one_the_published_last_step_agrees():
    # SD 1.5 / SDXL ship set_alpha_to_one = false: final_alpha_cumprod is alphas_cumprod[0], as the clamp gives.
    s = _ddim("epsilon", set_alpha_to_one=False, steps_offset=1)
    last = int(s.timesteps[-1])
    assert _published_abar_prev(s, last) == float(s.final_alpha_cumprod)
    x, eps = _inputs(5)
    out = ddim_step_with_logprob(s, eps, last, x, generator=torch.Generator().manual_seed(0))
    assert bool((out.std > 0).all()) and torch.isfinite(out.log_prob).all()


# -- per-sample timesteps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype", vp.PREDICTION_TYPES)
def test_per_sample_timesteps_equal_row_by_row_steps(ptype):
    s = _ddim(ptype, set_alpha_to_one=False, clip_sample=True, steps_offset=1)
    ts = torch.stack([s.timesteps[0], s.timesteps[4], s.timesteps[-1]])
    x, pred = _inputs(6)
    gens = [torch.Generator().manual_seed(20 + i) for i in range(3)]
    out = ddim_step_with_logprob(s, pred, ts, x, generator=gens)
    stored = x + torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    scored = ddim_step_with_logprob(s, pred, ts, x, prev_sample=stored)
    for i, t in enumerate(ts.tolist()):
        row = ddim_step_with_logprob(s, pred[i:i + 1], t, x[i:i + 1], generator=torch.Generator().manual_seed(20 + i))
        torch.testing.assert_close(out.prev_sample[i:i + 1], row.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(out.log_prob[i:i + 1], row.log_prob, rtol=0, atol=0)
        noise = torch.randn(1, *SHAPE[1:], generator=torch.Generator().manual_seed(20 + i))
        ref = s.step(pred[i:i + 1], t, x[i:i + 1], eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(out.prev_sample[i:i + 1], ref, rtol=0, atol=0)
        one = ddim_step_with_logprob(s, pred[i:i + 1], t, x[i:i + 1], prev_sample=stored[i:i + 1])
        torch.testing.assert_close(scored.log_prob[i:i + 1], one.log_prob, rtol=0, atol=0)
    assert len(set(out.std.tolist())) == 3


def test_timestep_forms_and_half_precision():
    s = _ddim("epsilon")
    x, eps = _inputs(7)
    t = int(s.timesteps[2])
    ref = ddim_step_with_logprob(s, eps, t, x, prev_sample=x)
    for form in (torch.tensor(t), torch.tensor([t] * 3), torch.tensor(float(t))):
        torch.testing.assert_close(ddim_step_with_logprob(s, eps, form, x, prev_sample=x).log_prob, ref.log_prob)
    half = ddim_step_with_logprob(s, eps.bfloat16(), t, x.bfloat16(), generator=torch.Generator().manual_seed(0))
    assert half.prev_sample.dtype == torch.bfloat16 and half.mean.dtype == torch.float32
    assert torch.isfinite(half.log_prob).all()


def test_bad_input_is_refused_with_the_argument_named():
    s = _ddim("epsilon")
    x, eps = _inputs(8)
    t = int(s.timesteps[1])
    with pytest.raises(ValueError, match="DDIMScheduler"):
        ddim_step_with_logprob(FlowMatchEulerDiscreteScheduler(), eps, t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), eps, t, x)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(s, eps, t, x, eta=0.0)
    with pytest.raises(ValueError, match="outside"):
        ddim_step_with_logprob(s, eps, 1000, x)
    with pytest.raises(ValueError, match="2 timesteps"):
        ddim_step_with_logprob(s, eps, torch.tensor([t, t]), x)
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_logprob(s, eps, t, x, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="prev_sample has shape"):
        ddim_step_with_logprob(s, eps, t, x, prev_sample=x[:, :2])
    with pytest.raises(ValueError, match="t_next"):
        sde_step_with_logprob(eps, x, 0.5, 0.6)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(eps, x, 0.5, 0.4, noise_level=0.0)


def test_conversions_take_per_sample_abar():
    x, pred = _inputs(9)
    abar = torch.tensor([0.2, 0.5, 0.9])
    for ptype in vp.PREDICTION_TYPES:
        batched = vp.predicted_x0(pred, x, abar.view(-1, 1, 1, 1), ptype)
        eps = vp.to_epsilon(pred, x, abar.view(-1, 1, 1, 1), ptype)
        for i in range(3):
            torch.testing.assert_close(batched[i], vp.predicted_x0(pred[i], x[i], float(abar[i]), ptype))
            torch.testing.assert_close(eps[i], vp.to_epsilon(pred[i], x[i], float(abar[i]), ptype))


# -- the flow SDE ---------------------------------------------------------------------------------------------


def test_flow_sde_equals_a_hand_computation_with_per_sample_times():
    x, v = _inputs(10)
    t, t_next, a = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.45, 0.0]), 0.7
    stored = x - 0.1 * v
    out = sde_step_with_logprob(v, x, t, t_next, noise_level=a, prev_sample=stored)
    for i in range(3):
        ti, dt = float(t[i]), float(t_next[i] - t[i])
        sig2 = a**2 * ti / (1 - ti)
        mean = x[i] + (v[i] + sig2 / (2 * ti) * (x[i] + (1 - ti) * v[i])) * dt
        std = math.sqrt(sig2 * -dt)
        torch.testing.assert_close(out.mean[i], mean, rtol=1e-5, atol=1e-6)
        assert out.std[i].item() == pytest.approx(std, rel=1e-6)
        hand = Normal(mean, std).log_prob(stored[i]).mean()
        torch.testing.assert_close(out.log_prob[i], hand, rtol=1e-5, atol=1e-5)


def test_flow_sde_matches_flow_grpo_expression_including_t_one():
    """flow_grpo's `sde_step_with_logprob` (sde_type='sde') transcribed, on a shifted flow scheduler's sigmas."""
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(8)
    sigmas, a = s.sigmas, 0.7
    assert float(sigmas[0]) == 1.0
    x, v = _inputs(11)
    for i in range(len(s.timesteps)):
        sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1].item()
        dt = sigma_prev - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        out = sde_step_with_logprob(v, x, float(sigma), float(sigma_prev), noise_level=a)
        torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std, (std_dev_t * torch.sqrt(-dt)).expand(3), rtol=1e-6, atol=0)


def test_flow_sde_reduces_to_the_euler_step_as_noise_vanishes():
    x, v = _inputs(12)
    t, t_next = 0.7, 0.55
    euler = x + (t_next - t) * v
    errors = []
    for a in (1e-1, 1e-2, 1e-3):
        out = sde_step_with_logprob(v, x, t, t_next, noise_level=a, generator=torch.Generator().manual_seed(0))
        errors.append(float((out.prev_sample - euler).abs().max()))
        assert float((out.mean - euler).abs().max()) < 2 * a**2 * float((x.abs() + v.abs()).max())
    assert errors[0] > 5 * errors[1] > 25 * errors[2]
    assert errors[2] < 1e-2


def test_flow_sde_keeps_the_marginals_of_a_gaussian_toy():
    """x0 ~ N(m, s0²): x_t ~ N((1-t)·m, (1-t)²·s0² + t²) and the exact velocity is E[noise - x0 | x_t]. Many small SDE
    steps from t = 0.8 to 0.2 must land on the marginal at 0.2 (a wrong sign of the score term would not)."""
    m, s0, a, n = 1.5, 0.5, 0.7, 200_000

    def moments(t):
        return (1 - t) * m, (1 - t) ** 2 * s0**2 + t**2

    def velocity(x, t):
        mu, var = moments(t)
        return (t - (1 - t) * s0**2) / var * (x - mu) - m

    g = torch.Generator().manual_seed(0)
    mu, var = moments(0.8)
    x = mu + math.sqrt(var) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    times = torch.linspace(0.8, 0.2, 31, dtype=torch.float64).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        x = sde_step_with_logprob(velocity(x, t), x, t, t_next, noise_level=a, generator=g).prev_sample
    mu, var = moments(0.2)
    assert abs(float(x.mean()) - mu) < 0.01
    assert abs(float(x.var()) / var - 1) < 0.03
