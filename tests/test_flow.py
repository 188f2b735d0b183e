"""Flow matching (`task: flow`): the convention against diffusers, the tiny recipes end to end (ln 2 at step 0, the
LoRA reloads through the pipeline's own loader with alpha != rank), video pairs with per-dimension votes, and bad
input refused before any model loads."""

import json
import math

import pytest
import torch

from mmalign.config import ConfigError, validate_config
from mmalign.flow.adapter import FlowAdapter, check_flow_model, load_flow_components
from mmalign.flow.task import FlowTrainConfig, video_pair_batch
from mmalign.models.loading import ModelLoadError
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import TrainingError, train

SD3, WAN = "assets/tiny/sd3", "assets/tiny/wan"


def test_noising_equals_diffusers_scale_noise_and_timesteps_are_1000_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = FlowAdapter(load_flow_components(SD3), reference="none")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 8, generator=g)  # (K, B, C, h, w)
    x_t, timesteps, target, sigmas = adapter.noisy_inputs(latents, torch.Generator().manual_seed(1))
    noise = target.view(2, 3, 4, 8, 8)[0] + latents[0]  # v = noise - x0
    torch.testing.assert_close(noise, target.view(2, 3, 4, 8, 8)[1] + latents[1])  # one noise per group
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs = sched.scale_noise(latents[0], timesteps[:3], noise)
    torch.testing.assert_close(x_t[:3], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(timesteps[:3], 1000 * sigmas, rtol=1e-5, atol=1e-3)
    # Shift 3: sigma = 3u / (1 + 2u) of the unshifted grid u, so every sigma is at least the unshifted one.
    u = sigmas / (3 - 2 * sigmas)
    assert bool((sigmas >= u - 1e-6).all()) and bool(((sigmas > 0) & (sigmas <= 1)).all())


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_timestep_sampling_follows_the_diffusers_density(sampling):
    adapter = FlowAdapter(load_flow_components(SD3, shift=1.0), reference="none", timestep_sampling=sampling)
    sigmas, _ = adapter.sample_t(4000, torch.Generator().manual_seed(0))
    assert 0 < sigmas.min() and sigmas.max() <= 1
    if sampling == "logit_normal":  # sigmoid(N(0, 1)): median 0.5, few samples near the ends
        assert abs(sigmas.median().item() - 0.5) < 0.03 and (sigmas < 0.05).float().mean() < 0.02
    if sampling == "uniform":
        assert abs(sigmas.mean().item() - 0.5) < 0.02 and (sigmas < 0.05).float().mean() > 0.03


def test_cosmap_weighting_multiplies_each_error():
    comps = load_flow_components(SD3)
    plain = FlowAdapter(comps, reference="none")
    cosmap = FlowAdapter(comps, reference="none", weighting="cosmap")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 4, 8, 8, generator=g)
    cond = plain.encode_text(["a red circle", "a blue square"])
    sig = torch.tensor([0.3, 0.8])
    e1, _, _ = plain.group_errors(comps.transformer, latents, cond, torch.Generator().manual_seed(1), False,
                                  sigmas=sig)
    e2, _, _ = cosmap.group_errors(comps.transformer, latents, cond, torch.Generator().manual_seed(1), False,
                                   sigmas=sig)
    w = 2 / (math.pi * (1 - 2 * sig + 2 * sig ** 2))
    torch.testing.assert_close(e2, e1 * w, rtol=1e-5, atol=1e-6)


def test_tiny_sd3_flow_dpo_starts_at_ln2_and_its_lora_reloads_through_the_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    cfg = load_train_config("configs/tiny/flow_dpo_sd3.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                                 "train.max_steps=4", "train.progress=false"])
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["beta/effective"] == 1000.0
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] == 4
    pipe = DiffusionPipeline.from_pretrained(SD3, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(result.outputs["lora"])
    trained = result.module.eval()
    pipe.transformer.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    embeds, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    kw = dict(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=embeds,
              pooled_projections=pooled, return_dict=False)
    with torch.no_grad():
        ours, theirs = trained(**kw)[0], pipe.transformer(**kw)[0]
        base = DiffusionPipeline.from_pretrained(SD3, text_encoder_3=None, tokenizer_3=None).transformer(**kw)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the LoRA trained away from the base (alpha 8 / rank 4 kept)


def test_sft_and_the_1_minus_t_squared_schedule_run(tmp_path):
    cfg = load_train_config("configs/tiny/flow_sft_sd3.yaml", [f"run.output_dir={tmp_path / 'sft'}",
                                                                "train.max_steps=2", "train.progress=false"])
    assert train(cfg).global_step == 2
    cfg = load_train_config("configs/tiny/flow_dpo_sd3.yaml", [f"run.output_dir={tmp_path / 'sched'}",
                                                                "train.max_steps=1", "train.progress=false",
                                                                "method.beta_schedule=(1-t)^2"])
    train(cfg)
    row = json.loads((tmp_path / "sched" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6) and 0 < row["beta/effective"] < 1000.0


# -- video pairs -------------------------------------------------------------------------------------------------


def _clips(n, frames=9, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(frames, size, size, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(n)]


def test_video_pairs_vote_over_weighted_dimensions_and_drop_ties():
    a, b = _clips(3), _clips(3, seed=1)
    labels = {"VQ": torch.tensor([1.0, 0.0, 1.0]), "MQ": torch.tensor([1.0, 0.0, 0.0]),
              "TA": torch.tensor([0.0, 0.5, 0.5])}  # votes: +1 (A), -2 (B), 0 (tie)
    batch = {"prompts": ["p0", "p1", "p2"], "labels": labels, "frames_a": a, "frames_b": b, "keys": ["0", "1", "2"]}
    out = video_pair_batch(batch, {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}, 9, 16)
    assert out["captions"] == ["p0", "p1"] and out["ties_dropped"] == 1 and out["videos"].shape == (4, 3, 9, 16, 16)
    assert torch.allclose(out["videos"][0, :, 0], torch.nn.functional.interpolate(
        torch.as_tensor(a[0][:1]).permute(0, 3, 1, 2).float() / 127.5 - 1, size=(16, 16), mode="bilinear",
        antialias=True, align_corners=False)[0])  # A won pair 0
    only_ta = video_pair_batch(batch, {"TA": 1.0}, 9, 16)  # TA alone: B wins pair 0, pairs 1 and 2 tie
    assert only_ta["captions"] == ["p0"] and only_ta["ties_dropped"] == 2
    torch.testing.assert_close(only_ta["videos"][0], video_pair_batch(
        {**batch, "frames_a": b, "frames_b": a}, {"TA": -1.0}, 9, 16)["videos"][0])
    none = video_pair_batch({**batch, "labels": {d: torch.full((3,), 0.5) for d in labels}},
                            {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}, 9, 16)
    assert none["videos"] is None and none["ties_dropped"] == 3
    short = video_pair_batch({**batch, "frames_a": _clips(3, frames=5)}, {"VQ": 1.0}, 9, 16)
    assert short["short_dropped"] == 3 and short["videos"] is None  # all three decided by VQ, all too short
    with pytest.raises(Exception, match="fewer than data.num_frames 9"):
        video_pair_batch({**batch, "frames_a": _clips(3, frames=5)}, {"VQ": 1.0}, 9, 16, strict=True)


# -- bad input, before any model loads ---------------------------------------------------------------------------


def _flow_cfg(tmp_path, **over):
    data = {"task": "flow", "run": {"output_dir": str(tmp_path / "run")},
            "model": {"pretrained": SD3}, "method": {"name": "flow_dpo", "beta": 100.0},
            "data": {"shards": "assets/tiny/pairs", "resolution": 32}, "train": {"max_steps": 1}}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return validate_config(FlowTrainConfig, data)


def test_flow_dpo_needs_an_explicit_beta():
    with pytest.raises(ConfigError, match="method.beta is required for flow_dpo"):
        validate_config(FlowTrainConfig, {"task": "flow", "model": {"pretrained": SD3},
                                          "data": {"shards": "x"}, "train": {"max_steps": 1}})


def test_a_ddpm_scheduled_model_is_refused_naming_its_scheduler(tmp_path):
    import shutil

    ddpm = tmp_path / "sd3_ddpm"
    shutil.copytree(SD3, ddpm)
    (ddpm / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    with pytest.raises(ModelLoadError, match="'DDPMScheduler' .* a DDPM/DDIM-style diffusion model, not rectified"):
        check_flow_model(str(ddpm))
    with pytest.raises(TrainingError, match="not a flow-matching pipeline"):
        train(_flow_cfg(tmp_path, model={"pretrained": "assets/toy/t2i"}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wan_frame_count_size_and_shard_schema_are_checked_before_loading(tmp_path):
    with pytest.raises(TrainingError, match="Wan's VAE takes 4k\\+1 frames"):
        train(_flow_cfg(tmp_path, model={"pretrained": WAN}, data={"num_frames": 8}))
    with pytest.raises(TrainingError, match="multiple of 16"):
        train(_flow_cfg(tmp_path, model={"pretrained": WAN}, data={"resolution": 40}))
    with pytest.raises(Exception, match="holds 'pair' samples; wan models train on 'video_pair' shards"):
        train(_flow_cfg(tmp_path, model={"pretrained": WAN}))


def test_tiny_wan_flow_dpo_on_toy_video_pairs_reloads_through_wan_pipeline(tmp_path):
    from diffusers import WanPipeline

    cfg = load_train_config("configs/tiny/flow_dpo_wan.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                                 "train.max_steps=3", "train.progress=false"])
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(rows) == 3
    pipe = WanPipeline.from_pretrained(WAN)
    pipe.load_lora_weights(result.outputs["lora"])
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 3, 4, 4, generator=g), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 8, 16, generator=g), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer.eval()(**kw)[0], result.module.eval()(**kw)[0], rtol=1e-4,
                                   atol=1e-5)


def test_the_toy_video_pipeline_is_a_flow_model_in_pixel_space(tmp_path):
    from mmalign.methods import preference_loss
    from mmalign.toy.video_pipeline import build_toy_video

    build_toy_video(seed=0).save_pretrained(tmp_path / "toy_video")
    comps = load_flow_components(str(tmp_path / "toy_video"))
    assert comps.family == "toy_video" and comps.vae is None
    adapter = FlowAdapter(comps, reference="copy")
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(4, 3, 9, 32, 32, generator=g) * 2 - 1
    s = adapter.surrogates(comps.transformer, {"videos": videos, "captions": ["a red circle moving left"] * 2},
                           torch.Generator().manual_seed(1), with_reference=True)
    loss, _ = preference_loss("flow_dpo", s, beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # pixel space: the latents are the clips themselves
    torch.testing.assert_close(adapter.encode(videos), videos)


@pytest.mark.parametrize("recipe", ["flow_rwr_wan", "flow_sft_wan"])
def test_wan_rwr_and_sft_recipes_train(tmp_path, recipe):
    cfg = load_train_config(f"configs/tiny/{recipe}.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                             "train.max_steps=2", "train.progress=false"])
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if recipe == "flow_rwr_wan":  # both clips of each pair weighted: 4 items of 2 pairs
        assert 1 <= rows[0]["rwr/ess"] <= 4 and rows[0]["rwr/weight_max"] >= 1


def test_flow_rwr_reads_rewards_from_the_shards_and_names_a_missing_field():
    import torch

    from mmalign.flow.task import pair_item_rewards

    batch = {"keys": ["k0", "k1"], "winner_index": torch.tensor([0, 1]),
             "extra": [{"rewards": [0.9, 0.1]}, {"rewards": [0.2, 0.7]}]}
    torch.testing.assert_close(pair_item_rewards(batch), torch.tensor([[0.9, 0.7], [0.1, 0.2]]))
    with pytest.raises(Exception, match="k1: method flow_rwr needs the pair's 'rewards' field"):
        pair_item_rewards({**batch, "extra": [{"rewards": [0.9, 0.1]}, {}]})
    a, b = _clips(1), _clips(1, seed=1)
    vp = {"prompts": ["p"], "labels": {"VQ": torch.tensor([0.5])}, "frames_a": a, "frames_b": b, "keys": ["v0"],
          "extra": [{"rewards_a": {"VQ": 0.3, "TA": 1.0}, "rewards_b": {"VQ": 0.5, "TA": 0.0}}]}
    out = video_pair_batch(vp, {"VQ": 1.0, "TA": 2.0}, 9, 16, rewards=True)  # a tie is kept for RWR
    torch.testing.assert_close(out["item_rewards"], torch.tensor([[2.3], [0.5]]))
    with pytest.raises(Exception, match="v0: method flow_rwr needs per-dimension rewards"):
        video_pair_batch({**vp, "extra": [{}]}, {"VQ": 1.0}, 9, 16, rewards=True)


# -- published recipes and the launcher ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wan21_t2v_1.3b_flow_dpo_lora.yaml", "sd35_medium_flow_dpo_lora.yaml"])
def test_published_flow_recipes_validate_and_say_what_beta_assumes(name):
    from pathlib import Path

    path = Path("configs/flow") / name
    cfg = load_train_config(path)
    assert cfg.task == "flow" and cfg.method.name == "flow_dpo" and cfg.method.beta == 100
    assert cfg.model.lora.rank == 32 and cfg.model.lora.alpha == 64
    assert "What β assumes" in path.read_text() and "Sources" in path.read_text()
    if "wan" in name:
        assert (cfg.data.num_frames - 1) % 4 == 0 and cfg.data.resolution % 16 == 0
    else:
        assert cfg.optim.lr == 3e-4


def test_the_videoalign_launcher_converts_then_trains(tmp_path):
    import subprocess

    csv = tmp_path / "train.csv"
    csv.write_text("path_A,path_B,prompt,VQ,MQ,TA\n")
    run = subprocess.run(["bash", "scripts/train_wan_flow_dpo.sh", "--csv", str(csv), "--video-root", str(tmp_path),
                          "--shards", str(tmp_path / "shards"), "--num-processes", "2", "--dry-run", "--",
                          "method.name=flow_rwr"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    convert, launch = [line for line in run.stdout.splitlines() if line.startswith("+")]
    assert "shards convert --from videoalign" in convert and f"--video-root {tmp_path}" in convert
    assert "--num_processes 2" in launch and "configs/flow/wan21_t2v_1.3b_flow_dpo_lora.yaml" in launch
    assert launch.endswith("method.name=flow_rwr") and f"data.shards={tmp_path / 'shards'}" in launch
    bad = subprocess.run(["bash", "scripts/train_wan_flow_dpo.sh", "--csv", str(tmp_path / "missing.csv")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "missing.csv: no such file" in bad.stderr


@pytest.mark.parametrize("recipe", ["flow_dpo_sd3", "flow_dpo_wan"])
def test_flow_resume_matches_an_uninterrupted_run_bit_exactly(tmp_path, recipe):
    """All of a step's randomness (t, noise, VAE draws) comes from the loop's generator: a run stopped at step 2 and
    resumed ends with the same LoRA weights and losses as one that ran straight through."""
    common = ["train.checkpoint_every=2", "train.batch_size=2", "train.progress=false"]

    def cfg(folder, *extra):
        return load_train_config(f"configs/tiny/{recipe}.yaml", [f"run.output_dir={tmp_path / folder}", *common,
                                                                  *extra])

    straight = train(cfg("a", "train.max_steps=4"))
    train(cfg("b", "train.max_steps=2"))
    resumed = train(cfg("b", "train.max_steps=4", "run.resume=latest"))
    assert resumed.global_step == 4
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name

    def losses(folder):
        return [json.loads(line)["loss"] for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]

    assert losses("b") == losses("a")
