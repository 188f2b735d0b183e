"""SPO on text-to-image diffusion: the transition surrogate against a hand computation, the tiny recipe (ln 2 at step
0, exact resume, the LoRA through diffusers' loader), SDXL, and the step-wise resampler (only pairs above the
threshold, continues from a random candidate, resumable, several processes)."""

import json
import math

import pytest
import torch

from mmalign.selfgen.spo import SPOSamplingConfig, build_step_pairs, resample
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

SD15, SDXL = "assets/tiny/sd15", "assets/tiny/sdxl"
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the center",
           "a yellow circle on the right"]


def _adapter(pretrained=SD15, resolution=32):
    from mmalign.t2i.adapter import T2IAdapter, load_t2i_components

    return T2IAdapter(load_t2i_components(pretrained, resolution=resolution), reference="none",
                      resolution=resolution)


def _rows(folder):
    from mmalign.data.collate import collate_step_pairs
    from mmalign.data.dataset import StepPairDataset

    data = StepPairDataset(str(folder), shuffle=False, rank=0, world_size=1)
    return collate_step_pairs(list(data))


def test_the_transition_surrogate_is_the_ddim_log_density_with_guidance():
    from diffusers import DDIMScheduler

    from mmalign.t2i.spo import TransitionScorer

    adapter = _adapter()
    batch = _rows("assets/tiny/step_pairs")
    batch = {k: (v[:3] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
    unet = adapter.c.unet
    got = TransitionScorer(adapter).logps(unet, batch, adapter.encode_text(batch["captions"]),
                                          adapter.encode_text([""] * 3), None)
    # by hand: the pipeline's scheduler config as DDIM, CFG eps_u + g (eps_c - eps_u), Normal log-density, mean
    sched = DDIMScheduler.from_pretrained(SD15, subfolder="scheduler")
    sched.set_timesteps(int(batch["num_inference_steps"][0]))
    cond, uncond = adapter.encode_text(batch["captions"]).prompt_embeds, adapter.encode_text([""] * 3).prompt_embeds
    for i in range(3):
        x, t = batch["x_t"][i:i + 1], int(batch["timesteps"][i])
        with torch.no_grad():
            eps_c = unet(x, t, cond[i:i + 1]).sample
            eps_u = unet(x, t, uncond[i:i + 1]).sample
        eps = eps_u + float(batch["guidance_scale"][i]) * (eps_c - eps_u)
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        abar = sched.alphas_cumprod[t]
        abar_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        std = float(batch["eta"][i]) * var.sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std ** 2).sqrt() * eps
        for row, name in enumerate(("x_w", "x_l")):
            want = torch.distributions.Normal(mean, std).log_prob(batch[name][i:i + 1]).mean()
            torch.testing.assert_close(got[row, i], want, rtol=1e-4, atol=1e-4)


def _spo_cfg(tmp_path, *overrides):
    return load_train_config("configs/tiny/t2i_spo.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                           "train.progress=false", *overrides])


def test_tiny_spo_starts_at_ln2_and_its_lora_reproduces_the_trained_unet_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(_spo_cfg(tmp_path, "optim.lr=1e-2"))  # a large lr: the LoRA must move visibly
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"rewards/accuracies", "spo/clip_fraction", "logps/chosen", "logps/rejected"} <= set(rows[0])
    assert rows[-1]["step"] == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert any(r["loss"] != pytest.approx(math.log(2), abs=1e-6) for r in rows[1:])
    pipe = StableDiffusionPipeline.from_pretrained(SD15, safety_checker=None)
    pipe.load_lora_weights(result.outputs["lora"])
    trained = result.module.eval()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, trained.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 500, text).sample, trained(x, 500, text).sample,
                                   rtol=1e-4, atol=1e-5)
        base = StableDiffusionPipeline.from_pretrained(SD15, safety_checker=None).unet(x, 500, text).sample
    assert not torch.allclose(base, trained(x, 500, text).sample, atol=1e-5)


def test_spo_resume_matches_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(_spo_cfg(full, "train.checkpoint_every=3"))
    train(_spo_cfg(part, "train.checkpoint_every=3", "train.max_steps=4"))
    train(_spo_cfg(part, "train.checkpoint_every=3", "run.resume=latest"))

    def losses(folder):
        return {r["step"]: r["loss"] for r in
                (json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines())}

    a, b = losses(full), losses(part)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]


def test_spo_configs_refuse_mismatched_schema_and_method(tmp_path):
    with pytest.raises(Exception, match="step_pair"):
        _spo_cfg(tmp_path, "data.schema=pair")
    with pytest.raises(Exception, match="step_pair"):
        _spo_cfg(tmp_path, "method.name=dpo")


class _Scores:
    """A scorer stand-in: the mean red minus mean blue of the clean estimate, scaled (distinct per candidate)."""

    name, version, step_aware = "redness", "test", False

    def __call__(self, images, prompts, t):
        return 10 * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))


def test_the_resampler_keeps_pairs_above_the_threshold_and_continues_from_a_random_candidate():
    adapter = _adapter()
    cfg = SPOSamplingConfig(num_inference_steps=8, guidance_scale=3.0, k=2, divert_start=1, threshold=0.0,
                            score_scale=1.0, seed=0)
    rows = resample(adapter, _Scores(), PROMPTS, [11, 12, 13, 14], cfg)  # threshold 0: every decided step
    assert rows and all(r["scores_w"] > r["scores_l"] for r in rows)
    assert {r["step_index"] for r in rows} <= set(range(1, 8))
    # k = 2: both candidates are stored, and the next state is one of them, not always the winner
    followed = {"winner": 0, "loser": 0}
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], {})[r["step_index"]] = r
    for steps in by_prompt.values():
        for i, r in steps.items():
            nxt = steps.get(i + 1)
            if nxt is None:
                continue
            if torch.equal(nxt["x_t"], r["x_w"]):
                followed["winner"] += 1
            else:
                assert torch.equal(nxt["x_t"], r["x_l"])
                followed["loser"] += 1
    assert followed["winner"] > 0 and followed["loser"] > 0
    # a higher threshold keeps a subset: exactly the rows whose probability gap exceeds it
    strict = resample(adapter, _Scores(), PROMPTS, [11, 12, 13, 14],
                      SPOSamplingConfig(**{**cfg.__dict__, "threshold": 0.2}))
    assert {(r["prompt_index"], r["step_index"]) for r in strict} == \
        {(r["prompt_index"], r["step_index"]) for r in rows if r["gap"] > 0.2}


def test_the_resampler_reuses_the_picked_candidates_prediction_and_changes_nothing_by_it():
    from mmalign.selfgen.spo import _resample
    from mmalign.toy.sweep import UNetPasses

    adapter = _adapter()
    cfg = SPOSamplingConfig(num_inference_steps=8, guidance_scale=3.0, k=3, divert_start=2, threshold=0.0,
                            score_scale=1.0, seed=0)
    seeds, runs = [11, 12, 13, 14], {}
    for reuse in (True, False):
        with torch.no_grad(), UNetPasses() as passes:
            runs[reuse] = (_resample(adapter, _Scores(), PROMPTS, seeds, cfg, None, reuse_picked=reuse), passes)
    (reused, fewer), (full, more) = runs[True], runs[False]
    assert [(r["prompt_index"], r["step_index"]) for r in reused] == [(r["prompt_index"], r["step_index"])
                                                                     for r in full]
    for a, b in zip(reused, full):
        for key in ("x_t", "x_w", "x_l"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # branching steps 2..6 (step 7's next timestep is below 0); each saves one guided pass of 4 prompts (x2: CFG)
    branching = len({r["step_index"] for r in full})
    assert branching == 5 and more.no_grad - fewer.no_grad == branching * len(PROMPTS) * 2


def test_selfgen_spo_resumes_and_writes_the_same_shards(tmp_path, monkeypatch):
    import mmalign.selfgen.spo as spo

    cfg = SPOSamplingConfig(num_inference_steps=6, guidance_scale=2.0, k=3, divert_start=1, threshold=0.05,
                            score_scale=50.0, batch_size=2)
    build_step_pairs(SD15, "toy_color_soft", PROMPTS, tmp_path / "full", cfg, resolution=32, device="cpu",
                     progress=False)
    calls = {"n": 0}
    real = spo.resample

    def crash_after_one(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(spo, "resample", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_step_pairs(SD15, "toy_color_soft", PROMPTS, tmp_path / "part", cfg, resolution=32, device="cpu",
                         progress=False)
    assert len(list((tmp_path / "part" / ".staging").glob("0*.json"))) == 2  # the first batch is staged
    monkeypatch.setattr(spo, "resample", real)
    with pytest.raises(ValueError, match="other settings"):
        build_step_pairs(SD15, "toy_color_soft", PROMPTS, tmp_path / "part",
                         SPOSamplingConfig(**{**cfg.__dict__, "k": 2}), resolution=32, device="cpu", progress=False)
    summary = build_step_pairs(SD15, "toy_color_soft", PROMPTS, tmp_path / "part", cfg, resolution=32, device="cpu",
                               progress=False)
    assert summary["rows"] > 0
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert a["keys"] == b["keys"] and all(torch.equal(a[n], b[n]) for n in ("x_t", "x_w", "x_l", "timesteps"))


def test_sdxl_step_pairs_train(tmp_path):
    cfg = SPOSamplingConfig(num_inference_steps=4, guidance_scale=2.0, k=2, divert_start=1, threshold=0.0,
                            score_scale=50.0)
    build_step_pairs(SDXL, "toy_color_soft", PROMPTS, tmp_path / "pairs", cfg, resolution=64, device="cpu",
                     progress=False)
    raw = {"task": "t2i", "run": {"output_dir": str(tmp_path / "run")},
           "model": {"pretrained": SDXL, "lora": {"rank": 4, "alpha": 8}},
           "method": {"name": "spo"}, "data": {"shards": str(tmp_path / "pairs"), "schema": "step_pair",
                                               "resolution": 64},
           "train": {"max_steps": 2, "batch_size": 2, "progress": False, "checkpoint_every": 0}}
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    train(load_train_config(str(tmp_path / "cfg.json"), []))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", ["configs/spo/sd15_spo_lora.yaml", "configs/spo/sdxl_spo_lora.yaml",
                                  "configs/reward/step_aware_sd15.yaml"])
def test_published_spo_recipes_validate_and_state_their_sources(name):
    from pathlib import Path

    cfg = load_train_config(name, [])
    text = Path(name).read_text()
    if cfg.task == "t2i":
        assert "β" in text
        assert cfg.method.name == "spo" and cfg.method.resolved_beta() == 10 and cfg.data.schema_name == "step_pair"
        assert "RockeyCoss/SPO" in text or "paper" in text


def _online(tmp_path, *overrides):
    return load_train_config("configs/tiny/t2i_spo_online.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                                  "train.progress=false", *overrides])


def test_online_spo_samples_with_the_policy_and_trains_from_ln2(tmp_path):
    result = train(_online(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(r["spo/pairs"] >= 1 and r["spo/gap"] > 0.2 for r in rows)
    assert rows[-1]["step"] == 4 and "lora" in result.outputs


def test_online_spo_resume_repeats_the_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(_online(full))
    train(_online(part, "train.max_steps=3"))
    train(_online(part, "run.resume=latest"))

    def rows(folder):
        return {r["step"]: (r["loss"], r["spo/pairs"]) for r in
                (json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines())}

    assert rows(full)[3] == rows(part)[3] and rows(full)[4] == rows(part)[4]


def test_online_spo_skips_and_counts_batches_without_pairs_and_checks_its_config(tmp_path):
    train(_online(tmp_path, "online.threshold=0.999", "train.max_steps=2"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped/spo_no_pairs"] == 2
    with pytest.raises(Exception, match="data.shards: null"):
        _online(tmp_path, "data.shards=assets/tiny/step_pairs")
    with pytest.raises(Exception, match="method.name: spo"):
        _online(tmp_path, "method.name=dpo", "data.schema=pair")
    with pytest.raises(Exception, match="online.scorer"):
        train(_online(tmp_path / "x", "online.scorer=no_such_scorer"))


@pytest.mark.distributed
def test_selfgen_spo_on_two_processes_writes_what_one_process_writes(tmp_path):
    from dist_helpers import torchrun2

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--model", SD15, "--scorer", "toy_color_soft", "--prompts", str(prompts), "--resolution", "32",
            "--steps", "6", "--guidance-scale", "2", "--k", "3", "--divert-start", "1", "--threshold", "0.05",
            "--score-scale", "50", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    from mmalign.cli import main

    assert main(["selfgen", "spo", *args, "--out", str(tmp_path / "one")]) == 0
    script = tmp_path / "run.py"
    script.write_text("import sys\nimport torch\nfrom mmalign.cli import main\ncode = main(sys.argv[1:])\n"
                      "if torch.distributed.is_initialized():\n    torch.distributed.destroy_process_group()\n"
                      "sys.exit(code)\n")
    torchrun2(script, "selfgen", "spo", *args, "--out", str(tmp_path / "two"), timeout=600)
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert a["keys"] == b["keys"] and all(torch.equal(a[n], b[n]) for n in ("x_t", "x_w", "x_l"))
