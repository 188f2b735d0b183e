"""Noisy-latent reward models (mmalign.rewards.latent) and their training (`task: reward`, `model.kind: latent`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError
from mmalign.rewards.latent import LatentRewardModel, build_latent_reward, encode_latents
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "assets/toy/t2i")
SD15 = str(ROOT / "assets/tiny/sd15")
RECIPE = ROOT / "configs/reward/latent_toy.yaml"
PROMPTS = ["a red circle on the left", "a blue square on the right"]


def cfg_for(out: Path, *overrides: str):
    return load_train_config(RECIPE, [f"run.output_dir={out}", f"model.latent.generator={TOY}",
                                      f"data.shards={ROOT / 'assets/tiny/pairs'}", "train.progress=false",
                                      *overrides])


def flow_generator(tmp_path: Path) -> str:
    """The toy pipeline with a FlowMatchEulerDiscreteScheduler config instead of its DDIM one."""
    folder = tmp_path / "flow_t2i"
    shutil.copytree(TOY, folder)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}))
    return str(folder)


def toy_pairs(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Fresh toy pairs: (2n, 3, 32, 32) in [-1, 1] as [winners (the caption's colour); losers (another colour,
    same shape and place)], and the n captions."""
    from mmalign.toy.scenes import COLORS, all_prompts, sample_scene

    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    good, bad, captions = [], [], []
    for _ in range(n):
        caption = prompts[rng.integers(len(prompts))]
        scene = sample_scene(rng, caption)
        other = [c for c in COLORS if c != scene.color][rng.integers(len(COLORS) - 1)]
        good.append(scene.render())
        bad.append(dataclasses.replace(scene, color=other).render())
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(good + bad)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


@torch.no_grad()
def pair_accuracy(model: LatentRewardModel, pixels: torch.Tensor, captions: list[str], t: float) -> float:
    """Fraction of pairs whose winner scores higher at noise level t, each image with its own noise draw."""
    n = len(captions)
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(7))
    t_all = model.snap_t(torch.full((2 * n,), t))
    r = model(model.add_noise(pixels, noise, t_all), t_all, captions + captions)[:, 0]
    return (r[:n] > r[n:]).float().mean().item()


# -- the model ---------------------------------------------------------------------------------------------------
def test_build_reads_the_generator(tmp_path):
    toy = build_latent_reward(TOY, dims=("color", "shape"), name="lat")
    assert (toy.name, toy.dims, toy.process, toy.latent_channels, toy.version) == (
        "lat", ("color", "shape"), "ddpm", 3, "unversioned")
    own = sum(p.numel() for n, p in toy.named_parameters() if not n.startswith("text_encoder."))
    assert own * 4 < 1_000_000  # float32 bytes, text encoder excluded
    assert [n for n, p in toy.named_parameters() if p.requires_grad and n.startswith("text_encoder.")] == []
    assert build_latent_reward(SD15).latent_channels == 4  # the VAE's
    assert build_latent_reward(flow_generator(tmp_path)).process == "flow"
    # Seeded, and the global RNG left alone.
    state = torch.get_rng_state()
    a, b = build_latent_reward(TOY, seed=3), build_latent_reward(TOY, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head[0].weight, build_latent_reward(TOY, seed=4).head[0].weight)


def test_save_load_round_trip_without_the_generator(tmp_path):
    generator = tmp_path / "generator"
    shutil.copytree(TOY, generator)
    model = build_latent_reward(str(generator), dims=("color", "shape"), name="lat", seed=1).eval()
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(generator)
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    folder = tmp_path / "moved"
    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    card = json.loads((folder / "mmalign_scorer.json").read_text())
    assert (card["kind"], card["name"], card["dims"], card["process"]) == ("latent", "lat", ["color", "shape"], "ddpm")

    loaded = LatentRewardModel.from_pretrained(folder)
    assert (loaded.name, loaded.dims, loaded.process, loaded.latent_channels) == ("lat", ("color", "shape"), "ddpm", 3)
    assert loaded.version.startswith("lat-") and loaded.version != "unversioned"
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 0.3, 0.7, 1.0])
    prompts = PROMPTS * 2
    with torch.no_grad():
        assert torch.equal(loaded(x, t, prompts), model(x, t, prompts))
    assert torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)

    (folder / "mmalign_scorer.json").write_text(json.dumps({**card, "kind": "video"}))
    with pytest.raises(ValueError, match="not a latent reward model folder"):
        LatentRewardModel.from_pretrained(folder)


def test_outputs_depend_on_prompt_and_t_and_gradients_flow():
    model = build_latent_reward(TOY, seed=0).eval()
    x = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    half = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        by_prompt = model(x, half, PROMPTS)[:, 0]
        by_t = model(x, torch.tensor([0.1, 0.9]), PROMPTS[:1] * 2)[:, 0]
    assert (by_prompt[0] - by_prompt[1]).abs() > 1e-4
    assert (by_t[0] - by_t[1]).abs() > 1e-4
    # Each row depends only on its own latent, t and prompt: a batch equals the rows scored one by one.
    x4, t4, p4 = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 0.2, 0.6, 1.0]), [PROMPTS[1], PROMPTS[0]] * 2
    with torch.no_grad():
        rows = torch.cat([model(x4[i:i + 1], t4[i:i + 1], [p4[i]]) for i in range(4)])
        torch.testing.assert_close(model(x4, t4, p4), rows)
    for t in (0.0, 0.5, 1.0):
        latents = torch.randn(3, 3, 32, 32, requires_grad=True)
        model(latents, torch.full((3,), t), PROMPTS + PROMPTS[:1]).sum().backward()
        grad = latents.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert all(grad[i].abs().sum() > 0 for i in range(3))
    # Prompt features are cached per prompt, for the encoder's device and dtype: a moved model recomputes them.
    doubled = model.double()(x4.double(), t4, p4)
    torch.testing.assert_close(doubled, build_latent_reward(TOY, seed=0).double()(x4.double(), t4, p4), rtol=0, atol=0)
    model.float()
    with pytest.raises(ValueError, match=r"latents must be \(N, 3, H, W\)"):
        model(torch.randn(2, 4, 32, 32), half, PROMPTS)
    with pytest.raises(ValueError, match="2 latents and 1 prompts"):
        model(torch.randn(2, 3, 32, 32), half, PROMPTS[:1])


@pytest.mark.parametrize("generator", [TOY, SD15])
def test_add_noise_is_the_diffusers_ddpm_forward_process(generator):
    from diffusers import DDPMScheduler

    model = build_latent_reward(generator)
    sched = DDPMScheduler.from_pretrained(generator, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.0004, 0.25, 0.5013, 0.9996, 1.0])
    timesteps = torch.tensor([0, 0, 250, 501, 999, 999])  # clamp(round(t * 1000), 0, 999)
    torch.testing.assert_close(model.add_noise(x0, noise, t), sched.add_noise(x0, noise, timesteps),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(model.snap_t(t), timesteps.float() / 1000)
    # A half-precision model keeps the exact forward process on float32 latents.
    torch.testing.assert_close(model.to(torch.bfloat16).add_noise(x0, noise, t), sched.add_noise(x0, noise, timesteps),
                               rtol=0, atol=1e-6)


def test_add_noise_flow(tmp_path):
    model = build_latent_reward(flow_generator(tmp_path))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])
    expected = torch.stack([(1 - s) * a + s * b for s, a, b in zip(t.tolist(), x0, noise)])
    torch.testing.assert_close(model.add_noise(x0, noise, t), expected)
    assert torch.equal(model.add_noise(x0, noise, torch.zeros(4)), x0)
    assert torch.equal(model.snap_t(t), t)


def test_encode_latents_with_a_vae_and_in_pixel_space():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(SD15, subfolder="vae").eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = encode_latents(vae, pixels, mode="mean")
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    torch.testing.assert_close(mean, dist.mean * 0.18215)
    a = encode_latents(vae, pixels, generator=torch.Generator().manual_seed(0))
    b = encode_latents(vae, pixels, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 4, 16, 16) and torch.equal(a, b) and not torch.equal(a, mean)
    assert torch.equal(encode_latents(None, pixels), pixels)


def test_the_reward_costs_well_below_one_generator_step():
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_latent_reward(TOY)
    unet = UNet2DConditionModel.from_pretrained(TOY, subfolder="unet")
    latents = torch.randn(2, 3, 32, 32, requires_grad=True)
    with FlopCounterMode(display=False) as reward_flops:
        model(latents, torch.tensor([0.5, 0.5]), PROMPTS).sum().backward()
    with FlopCounterMode(display=False) as unet_flops, torch.no_grad():
        unet(latents.detach(), torch.tensor([500, 500]), torch.randn(2, 8, unet.config.cross_attention_dim))
    assert reward_flops.get_total_flops() < 0.5 * unet_flops.get_total_flops()


# -- training ----------------------------------------------------------------------------------------------------
class Spy(torch.nn.Module):
    """Records what the loss feeds the reward model; reward = mean latent (differentiable)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, latents, t, prompts):
        self.calls.append((latents.detach().clone(), t.detach().clone(), list(prompts)))
        return self.w * latents.mean(dim=(1, 2, 3))[:, None]


def _pair_batch(winners: torch.Tensor, losers: torch.Tensor, captions: list[str]) -> dict:
    b = len(captions)
    return {"pixel_values": torch.cat([winners, losers]), "captions": captions, "label": torch.ones(b),
            "winner_index": torch.zeros(b, dtype=torch.long), "keys": [f"k{i}" for i in range(b)],
            "shards": ["s.tar"] * b}


def test_noised_feeds_one_shared_t_and_noise_per_pair_and_clean_feeds_t0(tmp_path):
    from mmalign.rewards.task import latent_pair_loss

    cfg = cfg_for(tmp_path, "model.latent.t_min=0.2", "model.latent.t_max=0.9")
    real = build_latent_reward(TOY)
    same = torch.rand(8, 3, 32, 32) * 2 - 1  # each pair's two images identical: x_t must be too
    batch = _pair_batch(same, same.clone(), [PROMPTS[i % 2] for i in range(8)])
    spy = Spy()
    latent_pair_loss(spy, real, None, batch, cfg.model.latent, cfg.method, torch.Generator().manual_seed(0))
    x_t, t, prompts = spy.calls[-1]
    assert prompts == batch["captions"] * 2
    assert torch.equal(t[:8], t[8:]) and torch.equal(x_t[:8], x_t[8:])
    assert len(set(t[:8].tolist())) == 8 and 0.2 <= t.min() and t.max() <= 0.9
    torch.testing.assert_close(t * 1000, (t * 1000).round())  # ddpm: on the timestep grid
    assert not torch.allclose(x_t, batch["pixel_values"], atol=1e-2)
    # Each pair's x_t is x0 noised at its own t: recover the noise and check it is shared across the pair.
    abar = real.alphas_cumprod[(t * 1000).round().long()].view(-1, 1, 1, 1)
    noise = (x_t - abar.sqrt() * batch["pixel_values"]) / (1 - abar).sqrt()
    torch.testing.assert_close(noise[:8], noise[8:])

    different = _pair_batch(same, torch.rand(8, 3, 32, 32) * 2 - 1, batch["captions"])
    latent_pair_loss(spy, real, None, different, cfg.model.latent, cfg.method, torch.Generator().manual_seed(0))
    x_t2, t2, _ = spy.calls[-1]
    assert torch.equal(t2, t) and torch.equal(x_t2[:8], x_t[:8])  # all randomness from the generator

    clean = cfg_for(tmp_path, "model.latent.train_noise=clean")
    latent_pair_loss(spy, real, None, different, clean.model.latent, clean.method, torch.Generator().manual_seed(0))
    x_t, t, _ = spy.calls[-1]
    assert torch.equal(t, torch.zeros(16)) and torch.equal(x_t, different["pixel_values"])


def test_training_raises_pair_accuracy_and_exports(tmp_path):
    pixels, captions = toy_pairs(128, seed=123)  # held out: fresh scenes
    before = build_latent_reward(TOY, seed=0).eval()
    cfg = cfg_for(tmp_path / "run", "train.max_steps=40", "train.batch_size=8")
    result = train(cfg)
    after = result.module.cpu().eval()  # trained on the GPU where there is one
    acc_before = {t: pair_accuracy(before, pixels, captions, t) for t in (0.0, 0.5)}
    acc_after = {t: pair_accuracy(after, pixels, captions, t) for t in (0.0, 0.5)}
    assert max(acc_before.values()) < 0.7
    assert acc_after[0.0] > 0.8 and acc_after[0.5] > 0.75, acc_after
    assert 0 <= result.metrics["rewards/accuracy"] <= 1 and "rewards/margin" in result.metrics

    exported = LatentRewardModel.from_pretrained(result.outputs["reward_model"])
    assert exported.name == "toy_latent_reward" and exported.dims == ("reward",)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.1, 0.8])
    with torch.no_grad():  # both on the CPU: `after` recomputes its prompt features there
        assert torch.equal(exported(x, t, PROMPTS), after(x, t, PROMPTS))
    # The resolved config.yaml (every key written out, CLIP defaults included) loads back.
    assert load_train_config(Path(result.run_dir) / "config.yaml").model == cfg.model


@pytest.mark.skipif(torch.cuda.is_available(), reason="bit-exact resume is a CPU float32 property "
                    "(docs/training.md); CUDA's convolution gradients are not deterministic")
def test_resume_is_exact(tmp_path):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=4"]
    straight = train(cfg_for(tmp_path / "a", *common))
    train(cfg_for(tmp_path / "b", *common, "train.max_steps=2"))
    resumed = train(cfg_for(tmp_path / "b", *common, "run.resume=latest"))
    for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(a, b), name


def test_training_through_a_vae(tmp_path):
    result = train(cfg_for(tmp_path / "run", f"model.latent.generator={SD15}", "train.max_steps=2",
                           "train.batch_size=4", "model.latent.latents=mean"))
    exported = LatentRewardModel.from_pretrained(result.outputs["reward_model"])
    assert exported.latent_channels == 4
    assert np.isfinite(result.metrics["loss"])


# -- several dimensions ----------------------------------------------------------------------------------------
def _write_dim_pairs(folder: Path, n: int, with_labels: bool = True) -> str:
    """Toy pairs judged on colour and shape: image 1 has another colour and, every other pair, another shape.
    Stored order swapped for every third pair."""
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.scenes import all_prompts, sample_scene

    rng = np.random.default_rng(0)
    prompts = all_prompts()
    with ShardSetWriter(folder, "pair", max_count=64) as writer:
        for i in range(n):
            scene = sample_scene(rng, prompts[i % len(prompts)])
            bad = dataclasses.replace(scene, color="blue" if scene.color != "blue" else "red",
                                      shape=scene.shape if i % 2 else ("circle" if scene.shape != "circle"
                                                                       else "square"))
            images, labels = [scene.render(), bad.render()], {"color": 1, "shape": 0.5 if i % 2 else 1}
            label_0 = 1.0
            if i % 3 == 0:
                images, label_0 = images[::-1], 0.0
                labels = {d: 1 - v for d, v in labels.items()}
            extra = {"dim_labels": labels} if with_labels else {}
            writer.write(pair_sample(f"p{i:04d}", *images, caption=scene.caption, label_0=label_0, **extra))
    return str(folder)


def test_pair_dim_labels_follow_the_winner_row():
    from mmalign.rewards.task import pair_dim_labels

    batch = {"keys": ["a", "b"], "shards": ["s0.tar", "s0.tar"], "winner_index": torch.tensor([0, 1]),
             "extra": [{"dim_labels": {"color": 1, "shape": 0.5}}, {"dim_labels": {"color": 0, "shape": 1}}]}
    torch.testing.assert_close(pair_dim_labels(batch, ["color", "shape"]), torch.tensor([[1.0, 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"s0.tar: pair 'a': dim_labels has no \['style'\]"):
        pair_dim_labels(batch, ["color", "style"])
    batch["extra"][0] = {"dim_labels": None}
    with pytest.raises(ValueError, match="s0.tar: pair 'a': no dim_labels in its JSON"):
        pair_dim_labels(batch, ["color", "shape"])
    batch["extra"][0] = {"dim_labels": {"color": "A", "shape": 1}}
    with pytest.raises(ValueError, match=r"pair 'a': dim_labels \{'color': 'A'\}: each must be 1"):
        pair_dim_labels(batch, ["color", "shape"])


def test_multi_dim_training_logs_each_dimension(tmp_path):
    shards = _write_dim_pairs(tmp_path / "pairs", 16)
    result = train(cfg_for(tmp_path / "run", f"data.shards={shards}", "model.latent.dims=[color,shape]",
                           "train.max_steps=2", "train.batch_size=8", "method.loss=btt"))
    for name in ("rewards/color/accuracy", "rewards/shape/accuracy", "rewards/color/loss", "rewards/shape/num_ties"):
        assert name in result.metrics
    # Pairs 1, 3, 5, ... tie on shape: 8 ties among the 16 pairs, half in each step of 8 (shuffled).
    assert result.metrics["rewards/color/num_ties"] == 0 and result.metrics["rewards/shape/num_ties"] > 0
    assert LatentRewardModel.from_pretrained(result.outputs["reward_model"]).dims == ("color", "shape")


def test_multi_dim_without_labels_is_refused_before_training(tmp_path):
    shards = _write_dim_pairs(tmp_path / "pairs", 4, with_labels=False)
    with pytest.raises(ValueError, match=r"shard-000000.tar: pair 'p0000': no dim_labels in its JSON; "
                                         r"model.latent.dims \['color', 'shape'\]"):
        train(cfg_for(tmp_path / "run", f"data.shards={shards}", "model.latent.dims=[color,shape]",
                      "train.max_steps=1"))
    assert not (tmp_path / "run").exists()  # refused before the run folder or any model


# -- config ------------------------------------------------------------------------------------------------------
def test_recipe_validates_and_round_trips(tmp_path):
    from mmalign.rewards.task import RewardTrainConfig

    cfg = load_train_config(RECIPE)
    assert cfg.model.kind == "latent" and cfg.model.latent.generator == "assets/toy/t2i"
    assert cfg.model.latent.train_noise == "noised" and cfg.data.resolution == 32
    # The resolved config (every field written out) loads back: defaults of the CLIP settings are not refused.
    again = RewardTrainConfig.model_validate(cfg.model_dump())
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("model.latent.t_max=1.5", "less than or equal to 1"),
    ("model.latent.t_min=-0.1", "greater than or equal to 0"),
    ("model.latent.t_min=0.8 model.latent.t_max=0.2", "t_min 0.8 > t_max 0.2"),
    ("model.latent.train_noise=clean model.latent.t_max=0.5", "do not apply to train_noise 'clean'"),
    ("model.latent.train_noise=sometimes", "noised"),
    ("model.latent.width=12", "multiple of 8"),
    ("model.latent.dims=[]", "at least 1"),
    ("model.latent.dims=[a,a]", "each dimension once"),
    ("model.latent.dims=[a/b]", "metric names"),
    ("model.latent.generator=null", "latent.generator: required for kind 'latent'"),
    ("model.unfreeze_vision_blocks=2", "unfreeze_vision_blocks: CLIP / video settings that do not apply"),
    ("model.pretrained=tiny", "not used by kind 'latent'"),
    ("model.kind=clip model.pretrained=tiny", "latent: only for kind 'latent'"),
    ("model.latent.latents=mode", "sample"),
])
def test_config_refuses_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(RECIPE, override.split())
