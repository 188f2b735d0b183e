"""LTX-Video (`LTXPipeline`) in the flow adapter: the flow convention and the transformer call against the pipeline's
own denoising step, the latent normalisation against `LTXPipeline._normalize_latents`, token packing, the tiny recipe
end to end (ln 2 at step 0, the LoRA reloads through `LTXPipeline.load_lora_weights` with alpha != rank), and a bad
frame count or size refused before any weights load."""

import json
import math

import pytest
import torch

from mmalign.config import validate_config
from mmalign.flow.adapter import FlowAdapter, check_flow_model, load_flow_components
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import TrainingError, train

LTX = "assets/tiny/ltx"
CAPTIONS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def comps():
    return load_flow_components(LTX)


def test_ltx_noising_equals_scale_noise_and_the_model_sees_1000_sigma(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = FlowAdapter(comps, reference="none")
    latents = torch.randn(2, 3, 8, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # (K, B, C, F, h, w)
    x_t, timesteps, target, sigmas = adapter.noisy_inputs(latents, torch.Generator().manual_seed(1))
    noise = target.view(2, 3, 8, 2, 4, 4)[0] + latents[0]  # v = noise - x0
    torch.testing.assert_close(noise, target.view(2, 3, 8, 2, 4, 4)[1] + latents[1])  # one noise per group
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(LTX, subfolder="scheduler")
    assert sched.config.use_dynamic_shifting  # LTX-Video's: shifted by the sequence length only when sampling
    torch.testing.assert_close(x_t[:3], sched.scale_noise(latents[0], timesteps[:3], noise), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(timesteps[:3], 1000 * sigmas, rtol=1e-5, atol=1e-3)
    # LTXPipeline hands its transformer `scheduler.timesteps` as they are: sigma·1000 after the dynamic shift too.
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=1.2)
    torch.testing.assert_close(sched.timesteps, 1000 * sched.sigmas[:-1])
    # model.shift: a fixed shift replaces the dynamic one (else the scheduler would ignore it).
    family, config = check_flow_model(LTX, shift=3.0)
    fixed = FlowMatchEulerDiscreteScheduler(**config)
    u = torch.tensor([0.2, 0.5, 0.9])
    index = (1000 - 1000 * u).round().long()  # the grid point u of the (descending) unshifted schedule
    assert family == "ltx" and not config["use_dynamic_shifting"]
    torch.testing.assert_close(fixed.sigmas[index], 3 * u / (1 + 2 * u))


def test_ltx_latents_are_normalised_as_the_pipeline_does(comps):
    from diffusers import LTXPipeline

    adapter = FlowAdapter(comps, reference="none")
    vae = comps.vae
    videos = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = adapter.encode(videos)
    raw = vae.encode(videos).latent_dist.mode()
    theirs = LTXPipeline._normalize_latents(raw, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert ours.shape == (2, 8, 2, 4, 4)  # 8k+1 frames -> k+1 latent frames, 32 px -> 4 at 8x
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    denorm = LTXPipeline._denormalize_latents(ours, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(denorm, raw, rtol=1e-5, atol=1e-5)
    # The tiny VAE's statistics are not the identity, so each term is seen: dropping the scaling factor changes it.
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    assert vae.config.scaling_factor != 1 and (ours - (raw - mean) / std).abs().max() > 1e-2
    with pytest.raises(ValueError, match="LTX's VAE takes 8k\\+1 frames"):
        adapter.encode(videos[:, :, :8])


@pytest.mark.parametrize("p, p_t", [(1, 1), (2, 2)])
def test_pack_unpack_round_trip(p, p_t):
    from diffusers import LTXPipeline

    x = torch.randn(2, 8, 4, 6, 4, generator=torch.Generator().manual_seed(0))  # (B, C, F, H, W)
    tokens = LTXPipeline._pack_latents(x, p, p_t)
    assert tokens.shape == (2, (4 // p_t) * (6 // p) * (4 // p), 8 * p_t * p * p)
    torch.testing.assert_close(LTXPipeline._unpack_latents(tokens, 4 // p_t, 6 // p, 4 // p, p, p_t), x)
    if p == 1:  # token i is the channel vector of the i-th (f, h, w) position in row-major order
        torch.testing.assert_close(tokens[1, 2 * 6 * 4 + 3 * 4 + 1], x[1, :, 2, 3, 1])


def test_ltx_velocity_is_the_pipelines_denoising_step(comps):
    """LTXPipeline's Euler loop moves latents by (sigma_next - sigma)·v; the adapter's `predict` at the same
    latents, timestep and prompts gives that v, unpacked to (B, C, F, H, W) (packing, RoPE scale, text mask)."""
    from diffusers import LTXPipeline

    pipe, adapter = comps.pipe, FlowAdapter(comps, reference="none")
    start = torch.randn(2, 8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def record(pipe_, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    with torch.no_grad():
        pipe(prompt=CAPTIONS, num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
             latents=LTXPipeline._pack_latents(start), output_type="latent", callback_on_step_end=record,
             callback_on_step_end_tensor_inputs=["latents"])
        cond = adapter.encode_text(CAPTIONS)
        assert cond.attention_mask.dtype == torch.bool and not cond.attention_mask.all()  # padding is masked
        before = LTXPipeline._pack_latents(start)
        for i, after in enumerate(seen):
            sigma, nxt = pipe.scheduler.sigmas[i], pipe.scheduler.sigmas[i + 1]
            v_pipe = LTXPipeline._unpack_latents((after - before) / (nxt - sigma), 2, 4, 4)
            t = pipe.scheduler.timesteps[i].expand(2)
            ours = adapter.predict(comps.transformer, LTXPipeline._unpack_latents(before, 2, 4, 4), t, cond)
            assert ours.shape == (2, 8, 2, 4, 4)
            torch.testing.assert_close(ours, v_pipe, rtol=1e-4, atol=1e-4)
            before = after
        unmasked = type(cond)(cond.prompt_embeds, attention_mask=torch.ones_like(cond.attention_mask))
        x = LTXPipeline._unpack_latents(before, 2, 4, 4)
        t = torch.full((2,), 500.0)
        assert (adapter.predict(comps.transformer, x, t, cond)
                - adapter.predict(comps.transformer, x, t, unmasked)).abs().max() > 1e-4


def test_flow_conditioning_repeats_and_moves_its_mask():
    from mmalign.flow.adapter import FlowConditioning

    mask = torch.tensor([[True, True, False], [True, False, False]])
    cond = FlowConditioning(torch.randn(2, 3, 4), attention_mask=mask)
    rep = cond.repeat(2)
    assert rep.prompt_embeds.shape == (4, 3, 4) and torch.equal(rep.attention_mask, torch.cat([mask, mask]))
    moved = cond.to("cpu", torch.float64)
    assert moved.prompt_embeds.dtype == torch.float64 and moved.attention_mask.dtype == torch.bool
    assert FlowConditioning(torch.randn(2, 3, 4)).repeat(2).attention_mask is None


# -- the tiny recipe end to end ----------------------------------------------------------------------------------


def test_tiny_ltx_recipe_starts_at_ln2_through_the_cli(tmp_path):
    from mmalign.cli import main

    run = tmp_path / "run"
    assert main(["train", "configs/tiny/flow_dpo_ltx.yaml", f"run.output_dir={run}", "train.max_steps=2",
                 "train.progress=false"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["beta/effective"] == 1000.0
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_tiny_ltx_lora_reloads_through_ltx_pipeline(tmp_path):
    from diffusers import LTXPipeline

    cfg = load_train_config("configs/tiny/flow_dpo_ltx.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                                "train.max_steps=3", "train.progress=false"])
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (4, 8)  # scale 2: alpha must survive the export
    result = train(cfg)
    pipe = LTXPipeline.from_pretrained(LTX)
    pipe.load_lora_weights(result.outputs["lora"])
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    kw = dict(hidden_states=torch.randn(2, 32, 8, generator=g),
              encoder_hidden_states=torch.randn(2, 12, 16, generator=g), timestep=torch.tensor([300.0, 800.0]),
              encoder_attention_mask=mask, num_frames=2, height=4, width=4, rope_interpolation_scale=(8 / 25, 8, 8),
              return_dict=False)
    with torch.no_grad():
        ours, theirs = result.module.eval()(**kw)[0], pipe.transformer.eval()(**kw)[0]
        base = LTXPipeline.from_pretrained(LTX).transformer(**kw)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the LoRA moved the transformer


# -- bad input, before any weights load --------------------------------------------------------------------------


def _ltx_cfg(tmp_path, **data):
    from mmalign.flow.task import FlowTrainConfig

    return validate_config(FlowTrainConfig, {
        "task": "flow", "run": {"output_dir": str(tmp_path / "run")}, "model": {"pretrained": LTX},
        "method": {"name": "flow_dpo", "beta": 100.0},
        "data": {"shards": "assets/tiny/video_pairs", "resolution": 32, "num_frames": 9, **data},
        "train": {"max_steps": 1}})


@pytest.mark.parametrize("data, message", [
    ({"num_frames": 8}, "data.num_frames 8: LTX's VAE takes 8k\\+1 frames \\(e.g. 1 or 9\\)"),
    ({"num_frames": 12}, "data.num_frames 12: LTX's VAE takes 8k\\+1 frames \\(e.g. 9 or 17\\)"),
    ({"resolution": 36}, "data.resolution 36: LTX needs a multiple of 8 .*e.g. 32"),
    ({"shards": "assets/tiny/pairs"}, "holds 'pair' samples; ltx models train on 'video_pair' shards"),
])
def test_ltx_frame_count_size_and_schema_are_refused_before_loading(tmp_path, monkeypatch, data, message):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr("mmalign.flow.task.load_flow_components", no_weights)
    with pytest.raises(Exception, match=message):
        train(_ltx_cfg(tmp_path, **data))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ltx_real_vae_ratios_come_from_its_config(tmp_path):
    """LTX-Video's VAE config (patch 4, three spatio-temporal scalings): 32x spatial, 8x temporal."""
    import shutil

    real = tmp_path / "ltx_real_ratios"
    shutil.copytree(LTX, real)
    vae_config = json.loads((real / "vae" / "config.json").read_text())
    vae_config.update(patch_size=4)
    (real / "vae" / "config.json").write_text(json.dumps(vae_config))
    cfg = _ltx_cfg(tmp_path, resolution=40)
    cfg.model.pretrained = str(real)
    with pytest.raises(TrainingError, match="data.resolution 40: LTX needs a multiple of 32 .*e.g. 32"):
        train(cfg)


def test_published_ltx_recipe_validates_and_says_what_beta_assumes():
    from pathlib import Path

    path = Path("configs/flow/ltx_video_flow_dpo_lora.yaml")
    cfg = load_train_config(path)
    text = path.read_text()
    assert cfg.task == "flow" and cfg.method.name == "flow_dpo" and cfg.method.beta == 100
    assert cfg.model.pretrained == "Lightricks/LTX-Video" and cfg.model.lora.rank == 32
    assert (cfg.data.num_frames - 1) % 8 == 0 and cfg.data.resolution % 32 == 0
    assert "What β assumes" in text and "Sources" in text
    # model.shift = exp(mu) of LTX-Video-Trainer's shifted logit-normal for the recipe's token count
    tokens = (cfg.data.resolution // 32) ** 2 * ((cfg.data.num_frames - 1) // 8 + 1)
    mu = 0.95 + (tokens - 1024) * (2.05 - 0.95) / (4096 - 1024)
    assert cfg.model.shift == pytest.approx(math.exp(mu), abs=0.01)
