"""Step-aware preference models (mmalign.rewards.step_aware, SPO's SPM) and their training (`task: reward`,
`model.kind: step_aware`)."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError
from mmalign.rewards.base import ScorerError
from mmalign.rewards.clip import load_clip_scorer
from mmalign.rewards.step_aware import (OneStepDenoiser, StepAwareScorer, bucket_edges, step_aware_accuracy,
                                        timestep_bounds)
from mmalign.rewards.tiny import build_tiny_clip
from mmalign.train.tasks import load_train_config

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "assets/toy/t2i")
SD15 = str(ROOT / "assets/tiny/sd15")
PAIRS = str(ROOT / "assets/tiny/pairs")
RECIPE = ROOT / "configs/reward/step_aware_toy.yaml"
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the left"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0))


@pytest.fixture(scope="module")
def toy_denoiser() -> OneStepDenoiser:
    return OneStepDenoiser.from_pretrained(TOY, guidance_scale=1.0)


def perturbed(model: StepAwareScorer, seed: int = 1) -> StepAwareScorer:
    """The time MLP's zero last layer replaced by random values, so the modulation does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.time_mlp[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def write_heldout(folder: Path, n: int, seed: int) -> str:
    """Fresh toy pairs: the scene with the caption's colour against the same scene in another colour; every third
    pair stored loser first (label_0 0), every fourth a tie (label_0 1/2)."""
    import dataclasses

    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.scenes import COLORS, all_prompts, sample_scene

    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    with ShardSetWriter(folder, "pair", max_count=16) as writer:
        for i in range(n):
            scene = sample_scene(rng, prompts[rng.integers(len(prompts))])
            other = [c for c in COLORS if c != scene.color][rng.integers(len(COLORS) - 1)]
            images, label_0 = [scene.render(), dataclasses.replace(scene, color=other).render()], 1.0
            if i % 4 == 3:
                label_0 = 0.5
            elif i % 3 == 2:
                images, label_0 = images[::-1], 0.0
            writer.write(pair_sample(f"held-{i:04d}", *images, caption=scene.caption, label_0=label_0))
    return str(folder)


def shard_json_rows(folder: str) -> list[dict]:
    rows = []
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            rows += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    return rows


# -- the model ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["logit_scale", "clip_score", "cosine"])
def test_identity_at_init_equals_the_base_scorer_at_every_t(clip_folder, scale):
    base = load_clip_scorer(clip_folder, name="base", scale=scale).eval()
    model = StepAwareScorer.from_clip(clip_folder, name="sam", scale=scale, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 40, 36, generator=g)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    uint8 = (torch.rand(3, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        expected = base.score(images, prompts)
        expected_uint8 = base.score(uint8, PROMPTS)
        for t in (0.0, 0.001, 0.37, 0.999, 1.0, torch.tensor([0.0, 0.25, 0.5, 1.0])):
            assert torch.equal(model.score(images, prompts, t), expected)
            assert torch.equal(model(images, prompts, t), base(images, prompts))
            t3 = t if not isinstance(t, torch.Tensor) else t[:3]
            assert torch.equal(model.score(uint8, PROMPTS, t3), expected_uint8)
    # The identity is the zero last layer's doing: with it perturbed, scores move and depend on t.
    perturbed(model)
    with torch.no_grad():
        at_0, at_9 = model.score(images, prompts, 0.0), model.score(images, prompts, 0.9)
    assert (at_0 - expected).abs().max() > 1e-3 and (at_0 - at_9).abs().max() > 1e-3


def test_t_is_checked(clip_folder):
    model = StepAwareScorer.from_clip(clip_folder)
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ScorerError, match=r"t must lie in \[0, 1\] \(t = timestep / num_train_timesteps"):
        model.score(images, PROMPTS[:2], 999.0)
    with pytest.raises(ScorerError, match=r"t must be a scalar or of shape \(2,\)"):
        model.score(images, PROMPTS[:2], torch.zeros(3))


def test_gradients_reach_the_modulation(clip_folder):
    model = StepAwareScorer.from_clip(clip_folder, seed=0).train()
    images = torch.rand(4, 3, 32, 32)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    model(images, PROMPTS + PROMPTS[:1], t).sum().backward()
    first, last = model.time_mlp[0], model.time_mlp[-1]
    for p in (last.weight, last.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # Through the zero last layer nothing reaches the first yet; after one step it does.
    assert first.weight.grad.abs().sum() == 0
    assert model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.time_mlp.parameters():
            p -= 0.1 * p.grad
    model.zero_grad()
    model(images, PROMPTS + PROMPTS[:1], t).sum().backward()
    assert first.weight.grad.abs().sum() > 0


def test_save_load_round_trip_and_the_registry_refuses_it(clip_folder, tmp_path):
    from transformers import CLIPModel

    from mmalign.rewards.registry import is_differentiable, load_scorer, scorer_kind

    model = perturbed(StepAwareScorer.from_clip(clip_folder, name="sam", generator=TOY)).eval()
    folder = model.save_pretrained(tmp_path / "sam")
    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert "step_aware.safetensors" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    card = json.loads((folder / "mmalign_scorer.json").read_text())
    assert (card["kind"], card["name"], card["scale"], card["config"]["generator"]) == (
        "step_aware", "sam", "logit_scale", TOY)
    assert card["t"].startswith("t = timestep / num_train_timesteps")

    loaded = StepAwareScorer.from_pretrained(folder)
    assert loaded.name == "sam" and loaded.version.startswith("sam-") and loaded.generator == TOY
    images, t = torch.rand(3, 3, 32, 32), torch.tensor([0.0, 0.5, 0.99])
    with torch.no_grad():
        assert torch.equal(loaded.score(images, PROMPTS, t), model.score(images, PROMPTS, t))
    # The CLIP part is a plain transformers CLIPModel.
    assert isinstance(CLIPModel.from_pretrained(folder), CLIPModel)

    message = r"a step-aware preference model scores .* at a noise level t.*StepAwareScorer.from_pretrained"
    for spec in (str(folder), f"pickscore={folder}", f"clip_score={folder}"):
        with pytest.raises(ScorerError, match=message):
            load_scorer(spec)
    assert scorer_kind(str(folder)) == "step_aware" and is_differentiable(str(folder))
    with pytest.raises(ScorerError, match="not a step-aware preference model folder"):
        StepAwareScorer.from_pretrained(clip_folder)


# -- the generator side ------------------------------------------------------------------------------------------
def test_timestep_grid():
    assert timestep_bounds(0.0, 1.0, 1000) == (0, 999)
    assert timestep_bounds(0.2, 0.4, 1000) == (200, 399)  # 0.2 * 1000 is 200.00000000000003 in floating point
    assert timestep_bounds(0.8, 1.0, 1000) == (800, 999)
    assert timestep_bounds(0.5, 0.5, 1000) == (500, 500) and timestep_bounds(1.0, 1.0, 1000) == (999, 999)
    with pytest.raises(ValueError, match="holds no timestep"):
        timestep_bounds(0.1001, 0.1009, 1000)
    assert bucket_edges(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="strictly increasing"):
        bucket_edges([0.0, 0.5, 0.5])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_toy_one_step_estimates_share_t_and_noise_per_pair(guidance):
    from diffusers import UNet2DConditionModel

    denoiser = OneStepDenoiser.from_pretrained(TOY, guidance_scale=guidance)
    b = 3
    g = torch.Generator().manual_seed(0)
    winners = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    pixels = torch.cat([winners, winners.clone()])
    pixels[b + 1] = torch.rand(3, 32, 32, generator=g) * 2 - 1  # pair 1's loser differs
    k = torch.tensor([0, 400, 999])
    images = denoiser.x0_images(pixels, PROMPTS, k, torch.Generator().manual_seed(5))
    assert images.shape == (2 * b, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images[0], images[b]) and torch.equal(images[2], images[b + 2])  # same image, t and noise
    assert not torch.allclose(images[1], images[b + 1])

    # By hand, with the diffusers UNet: x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise (one draw per pair), the toy
    # predicts x0 ("sample"), its DDIM config clips it to [-1, 1] (clip_sample), pixel space needs no decode.
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(TOY, subfolder="unet").eval()
    tok = AutoTokenizer.from_pretrained(TOY, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(TOY, subfolder="text_encoder").eval()
    sched = DDPMScheduler.from_pretrained(TOY, subfolder="scheduler")
    noise = torch.randn((b, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    k2 = torch.cat([k, k])
    x_t = sched.add_noise(pixels, torch.cat([noise, noise]), k2)

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids)[0]

    with torch.no_grad():
        pred = unet(x_t, k2, embed(PROMPTS + PROMPTS)).sample
        if guidance != 1:
            uncond = unet(x_t, k2, embed([""] * (2 * b))).sample
            pred = uncond + guidance * (pred - uncond)
    torch.testing.assert_close(images, (pred.clamp(-1, 1) / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_sd15_one_step_estimates_are_the_ddim_step_pred_original_sample():
    """Through a VAE with an epsilon UNet: the published SPM code's recipe (VAE sample, shared noise,
    classifier-free guidance, `DDIMScheduler.step(...).pred_original_sample`, decode), computed with diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    denoiser = OneStepDenoiser.from_pretrained(SD15, guidance_scale=2.0)
    assert denoiser.native_resolution == 2 * denoiser.adapter.c.unet.config.sample_size  # a 2-level VAE: x2
    b = 2
    pixels = torch.rand(2 * b, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    k = torch.tensor([10, 700])
    images = denoiser.x0_images(pixels, PROMPTS[:b], k, torch.Generator().manual_seed(9))

    vae = AutoencoderKL.from_pretrained(SD15, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(SD15, subfolder="unet").eval()
    tok = AutoTokenizer.from_pretrained(SD15, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(SD15, subfolder="text_encoder").eval()
    sched = DDIMScheduler.from_pretrained(SD15, subfolder="scheduler")
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * vae.config.scaling_factor
        noise = torch.randn((b, *z.shape[1:]), generator=g)
        k2 = torch.cat([k, k])
        x_t = sched.add_noise(z, torch.cat([noise, noise]), k2)
        ids = tok(PROMPTS[:b] * 2 + [""] * (2 * b), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        text, uncond = enc(ids)[0].chunk(2)
        eps_text, eps_uncond = unet(x_t, k2, text).sample, unet(x_t, k2, uncond).sample
        eps = eps_uncond + 2.0 * (eps_text - eps_uncond)
        x0 = torch.stack([sched.step(eps[i:i + 1], int(k2[i]), x_t[i:i + 1]).pred_original_sample[0]
                          for i in range(2 * b)])
        expected = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


def test_sdxl_one_step_estimates_run_with_micro_conditioning():
    denoiser = OneStepDenoiser.from_pretrained(str(ROOT / "assets/tiny/sdxl"))
    assert denoiser.adapter.c.is_sdxl and denoiser.guidance_scale == 5.0
    winners = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = torch.cat([winners, winners.flip(-1)])

    def run(seed):
        return denoiser.x0_images(pixels, PROMPTS[:2], torch.tensor([3, 900]), torch.Generator().manual_seed(seed))

    images = run(0)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all() and 0 <= images.min() < images.max() <= 1
    assert torch.equal(images, run(0)) and not torch.equal(images, run(1))  # all randomness from the generator


# -- the loss ----------------------------------------------------------------------------------------------------
class Spy(torch.nn.Module):
    """Records what the loss feeds the model; reward = w * mean pixel (differentiable in w)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, images, prompts, t):
        self.calls.append((images.detach().clone(), list(prompts), t.detach().clone()))
        return self.w * images.mean(dim=(1, 2, 3))


def test_loss_soft_labels_with_ties_and_inverse_prompt_count_weights(toy_denoiser):
    from mmalign.rewards.task import StepAwareModelConfig, step_aware_pair_loss

    cfg = load_train_config(RECIPE, ["method.prompt_weight=shards", "model.step_aware.t_min=0.2",
                                     "model.step_aware.t_max=0.6"])
    g = torch.Generator().manual_seed(0)
    captions = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    batch = {"pixel_values": torch.rand(8, 3, 32, 32, generator=g) * 2 - 1, "captions": captions,
             "label": torch.tensor([1.0, 0.5, 1.0, 0.5]),  # pairs 1 and 3 are ties
             "num_example_per_prompt": torch.tensor([4.0, 1.0, 4.0, 2.0])}
    spy = Spy()
    loss, metrics = step_aware_pair_loss(spy, toy_denoiser, batch, cfg.model.step_aware, cfg.method,
                                         torch.Generator().manual_seed(1))
    images, prompts, t = spy.calls[-1]
    assert prompts == captions + captions
    assert torch.equal(t[:4], t[4:]) and 0.2 <= t.min() and t.max() < 0.6
    torch.testing.assert_close(t * 1000, (t * 1000).round())  # on the timestep grid

    # By hand: p = P(row i preferred) (1/2 for a tie), d = r_i - r_partner, per pair the cross-entropy minus the
    # label's entropy, weights 1 / num_example_per_prompt normalised to sum 1.
    r = 20.0 * images.double().mean(dim=(1, 2, 3))
    d, p = (r[:4] - r[4:]).tolist(), [1.0, 0.5, 1.0, 0.5]
    w = [1 / 4, 1.0, 1 / 4, 1 / 2]

    def logsig(x):
        return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))

    per_pair = [-(pi * logsig(di) + (1 - pi) * logsig(-di)) - (math.log(2) if pi == 0.5 else 0.0)
                for di, pi in zip(d, p)]
    expected = sum(wi * li for wi, li in zip(w, per_pair)) / sum(w)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["rewards/num_ties"] == 2 and metrics["rewards/num_pairs"] == 2
    loss.backward()
    assert spy.w.grad.abs() > 0

    # Uniform weights differ (the weighting is not a no-op here), and 'shards' without the counts is refused.
    none = load_train_config(RECIPE, ["method.prompt_weight=none"])
    uniform, _ = step_aware_pair_loss(Spy(), toy_denoiser, batch, cfg.model.step_aware, none.method,
                                      torch.Generator().manual_seed(1))
    assert uniform.item() == pytest.approx(sum(per_pair) / 4, rel=1e-5) and abs(uniform.item() - expected) > 1e-4
    del batch["num_example_per_prompt"]
    with pytest.raises(ValueError, match="prompt_weight 'shards': the batch has no num_example_per_prompt"):
        step_aware_pair_loss(Spy(), toy_denoiser, batch, StepAwareModelConfig(generator=TOY), cfg.method)


def test_prompt_counts_come_from_the_whole_shard_set(tmp_path):
    from mmalign.rewards.task import RewardTask, shard_prompt_counts

    rows = shard_json_rows(PAIRS)
    assert shard_prompt_counts(PAIRS) == dict(Counter(r["caption"] for r in rows))
    held = write_heldout(tmp_path / "ties", 48, seed=3)
    rows = shard_json_rows(held)
    assert any(r["label_0"] == 0.5 for r in rows)
    assert shard_prompt_counts(held, "drop") == dict(Counter(r["caption"] for r in rows if r["label_0"] != 0.5))
    # The task's batches carry each pair's count (from all shards, not the batch).
    cfg = load_train_config(RECIPE, [f"run.output_dir={tmp_path / 'run'}", f"data.shards={PAIRS}"])
    counts = shard_prompt_counts(PAIRS)
    batch = next(RewardTask(cfg).batches(0, 1, 0))
    assert batch["num_example_per_prompt"].tolist() == [float(counts[c]) for c in batch["captions"]]
    assert max(counts.values()) > 1 and min(counts.values()) != max(counts.values())


# -- evaluation --------------------------------------------------------------------------------------------------
class ByT(torch.nn.Module):
    """Prefers the winner row (the first half) below t = 0.4 and the loser row above; records every t."""

    def __init__(self):
        super().__init__()
        self.ts = []

    def forward(self, images, prompts, t):
        self.ts.append(t.clone())
        b = images.shape[0] // 2
        sign = torch.where(t < 0.4, 1.0, -1.0)
        first = torch.cat([torch.ones(b), torch.zeros(b)])
        return sign * first


class Constant(torch.nn.Module):
    def forward(self, images, prompts, t):
        return torch.zeros(images.shape[0])


def test_accuracy_per_t_bucket(tmp_path, toy_denoiser):
    held = write_heldout(tmp_path / "held", 40, seed=11)
    rows = shard_json_rows(held)
    ties = sum(r["label_0"] == 0.5 for r in rows[:20])

    spy = ByT()
    result = step_aware_accuracy(spy, toy_denoiser, held, 5, resolution=32, max_pairs=20, batch_size=8, seed=0)
    assert result.edges == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert result.accuracy == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert (result.num_pairs, result.num_ties) == (20 - ties, ties) and 0 < ties < 20
    # Batches of 8, 8, 4 pairs, each scored in the 5 buckets in order; both rows of a pair share t.
    assert [len(t) for t in spy.ts] == [16] * 5 + [16] * 5 + [8] * 5
    for i, t in enumerate(spy.ts):
        lo, hi = result.edges[i % 5], result.edges[i % 5 + 1]
        half = len(t) // 2
        assert torch.equal(t[:half], t[half:]) and lo <= t.min() and t.max() < hi

    metrics = result.metrics("eval")
    assert metrics["eval/accuracy/t_0.00-0.20"] == 1.0 and metrics["eval/accuracy/t_0.80-1.00"] == 0.0
    assert metrics["eval/accuracy"] == pytest.approx(0.4) and metrics["eval/num_pairs"] == 20 - ties

    const = step_aware_accuracy(Constant(), toy_denoiser, held, [0.0, 0.5, 1.0], resolution=32)
    assert const.accuracy == [0.5, 0.5]  # a model tie counts 1/2
    assert const.num_pairs + const.num_ties == 40

    # A real model at init: the base tiny CLIP, the same at every t up to the draws.
    model = StepAwareScorer.from_clip(str(build_tiny_clip(tmp_path / "clip")))
    real = step_aware_accuracy(model, toy_denoiser, held, 2, resolution=32, max_pairs=8)
    assert len(real.accuracy) == 2 and all(0 <= a <= 1 for a in real.accuracy) and model.training


# -- training ----------------------------------------------------------------------------------------------------
def test_toy_recipe_trains_through_the_cli_evaluates_and_exports(tmp_path):
    from safetensors.torch import load_file

    from mmalign.cli import main
    from mmalign.train.metrics import read_metrics

    held = write_heldout(tmp_path / "held", 24, seed=5)
    run = tmp_path / "run"
    code = main(["train", str(RECIPE), f"run.output_dir={run}", f"model.step_aware.generator={TOY}",
                 f"data.shards={PAIRS}", "train.progress=false", "train.log_every=1", f"validation.shards={held}",
                 "validation.every=10", "validation.max_pairs=16"])
    assert code == 0
    rows = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    losses = [r["loss"] for r in train_rows]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert np.std(losses) > 1e-3 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(0 <= r["rewards/t"] < 1 for r in train_rows)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        accs = [r[f"eval/accuracy/t_{lo:.2f}-{lo + 0.2:.2f}"] for lo in (0.0, 0.2, 0.4, 0.6, 0.8)]
        assert all(0 <= a <= 1 for a in accs) and r["eval/accuracy"] == pytest.approx(np.mean(accs))
    saved = json.loads((run / "eval" / "step-000020.json").read_text())
    assert saved["edges"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and len(saved["accuracy"]) == 5

    exported = StepAwareScorer.from_pretrained(run / "reward_model")
    assert exported.name == "toy_step_aware" and exported.generator == TOY and exported.time_dim == 64
    # The exported model is the final checkpoint's weights: it scores as they do.
    final = StepAwareScorer.from_clip(str(run / "tiny_clip_seed0"), name="x", time_dim=64, hidden_dim=64)
    final.load_state_dict(load_file(str(run / "checkpoints/step-20/model.safetensors")))
    images, t = torch.rand(3, 3, 32, 32), torch.tensor([0.05, 0.5, 0.95])
    with torch.no_grad():
        assert torch.equal(exported.score(images, PROMPTS, t), final.eval().score(images, PROMPTS, t))
        # Training moved the modulation: the scores now depend on t.
        assert (exported.score(images, PROMPTS, 0.0) - exported.score(images, PROMPTS, 0.9)).abs().max() > 0
    assert exported.clip.logit_scale.exp() <= 100 + 1e-4


# -- config ------------------------------------------------------------------------------------------------------
def test_recipe_validates_and_round_trips():
    from mmalign.rewards.task import RewardTrainConfig

    cfg = load_train_config(RECIPE)
    assert cfg.model.kind == "step_aware" and cfg.model.step_aware.generator == "assets/toy/t2i"
    assert cfg.method.loss == "soft_ce" and cfg.method.prompt_weight == "shards" and cfg.data.ties == "keep"
    assert RewardTrainConfig.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("override, message", [
    ("model.step_aware.generator=null", "step_aware.generator: required for kind 'step_aware'"),
    ("model.kind=clip", "step_aware: only for kind 'step_aware'"),
    ("model.step_aware.t_min=0.8 model.step_aware.t_max=0.2", "t_min 0.8 > t_max 0.2"),
    ("model.step_aware.t_max=1.5", "less than or equal to 1"),
    ("model.step_aware.guidance_scale=0.5", "greater than or equal to 1"),
    ("model.step_aware.time_dim=63", "multiple of 2"),
    ("model.pretrained=null", "pretrained: required for kind 'step_aware'"),
    ("method.loss=btt", "btt takes no per-pair weights"),
    ("validation.every=5", "validation.every 5: needs validation.shards"),
])
def test_config_refuses_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(RECIPE, override.split())


def test_validation_shards_are_only_for_step_aware_and_music():
    with pytest.raises(ConfigError, match=r"validation.shards: held-out accuracy is for model.kind 'step_aware' "
                                          r"\(per t bucket\) or 'music', got 'clip'"):
        load_train_config(ROOT / "configs/reward/toy_clip.yaml", ["validation.shards=assets/tiny/pairs"])
