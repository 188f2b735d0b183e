"""Online flow training: the sampler equals the pipeline's own sampling, groups become [best; worst] pairs (argmax /
argmin of the weighted rewards; equal groups skipped and counted), the reference refreshes every K steps and is
restored on resume, and a tiny online run trains end to end from a prompt file."""

import json
import math

import pytest
import torch

from mmalign.flow.adapter import FlowAdapter, load_flow_components
from mmalign.flow.online import FlowOnlineConfig, OnlineSampler, decode, latent_shape, sample_latents
from mmalign.rewards.combine import RewardSet, RewardTerm
from mmalign.models.reference import RefreshedReference
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import TrainingError, train

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down"]


def clip_redness(videos, prompts):
    """A video reward for the tests: mean red minus mean green of float (N, T, 3, H, W) clips in [0, 1]."""
    return (videos[:, :, 0] - videos[:, :, 1]).mean(dim=(1, 2, 3))


clip_redness.modality = "video"


class _FixedScores(torch.nn.Module):
    """A scorer that returns a given table and records what it scored."""

    def __init__(self, table):
        super().__init__()
        self.table, self.seen = torch.tensor(table, dtype=torch.float32), []

    def score(self, images, prompts):
        self.seen.append(images.clone())
        return self.table


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_the_sampler_equals_the_pipelines_own_sampling(toy_video, guidance_scale):
    comps = load_flow_components(toy_video)
    adapter = FlowAdapter(comps, reference="none")
    cond = adapter.encode_text(PROMPTS[:2])
    uncond = adapter.encode_text(["", ""])
    shape = latent_shape(adapter, 2, 9, 32)
    latents = sample_latents(adapter, comps.transformer, cond, uncond, shape, torch.Generator().manual_seed(5),
                             steps=4, guidance_scale=guidance_scale)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    frames = comps.pipe(PROMPTS[:2], num_inference_steps=4, latents=noise, guidance_scale=guidance_scale,
                        output_type="pt").frames
    torch.testing.assert_close(decode(adapter, latents), frames, rtol=0, atol=1e-6)


def test_groups_are_best_against_worst_and_equal_groups_are_skipped(toy_video):
    adapter = FlowAdapter(load_flow_components(toy_video), reference="none")
    scorer = _FixedScores([1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.5, -1.0, 0.25])  # 3 prompts x N = 3
    rewards = RewardSet([RewardTerm("fixed", "fixed", 2.0, scorer, False, None, (1.0,))])
    cfg = FlowOnlineConfig(prompts="unused.txt", num_samples=3, steps=2, rewards=[{"scorer": "toy_video"}])
    sampler = OnlineSampler(adapter, cfg, rewards, num_frames=9, resolution=32)
    out = sampler.groups(adapter.c.transformer, PROMPTS[:3], "flow_dpo", torch.Generator().manual_seed(0))
    pixels = scorer.seen[0]  # (9, F, 3, H, W): the decoded samples, prompt-major
    assert out["kept"].tolist() == [True, False, True]
    for group, (best, worst) in enumerate([(1, 0), (0, 0), (0, 1)]):
        got = decode(adapter, out["latents"][:, group])
        torch.testing.assert_close(got[0], pixels[3 * group + best])
        torch.testing.assert_close(got[1], pixels[3 * group + worst])
    torch.testing.assert_close(out["item_rewards"][:, 0], torch.tensor([6.0, 2.0]))  # weight 2 x table
    assert out["metrics"]["online/groups_skipped"].item() == 1
    # each group is conditioned on its own prompt
    torch.testing.assert_close(out["cond"].prompt_embeds, adapter.encode_text(PROMPTS[:3]).prompt_embeds)
    rwr = sampler.groups(adapter.c.transformer, PROMPTS[:3], "flow_rwr", torch.Generator().manual_seed(0))
    assert rwr["latents"].shape[:2] == (3, 3) and rwr["item_rewards"].shape == (3, 3)


def test_min_gap_skips_groups_whose_rewards_differ_too_little(toy_video):
    adapter = FlowAdapter(load_flow_components(toy_video), reference="none")
    scorer = _FixedScores([1.0, 1.05, 0.0, 1.0])
    rewards = RewardSet([RewardTerm("fixed", "fixed", 1.0, scorer, False, None, (1.0,))])
    cfg = FlowOnlineConfig(prompts="unused.txt", num_samples=2, steps=1, min_gap=0.1, rewards=[{"scorer": "x"}])
    out = OnlineSampler(adapter, cfg, rewards, num_frames=9, resolution=32).groups(
        adapter.c.transformer, PROMPTS[:2], "flow_dpo", torch.Generator().manual_seed(0))
    assert out["kept"].tolist() == [False, True]


def _lora_net():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                          LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))


def test_a_refreshed_lora_reference_follows_the_policy_and_survives_a_checkpoint():
    net = _lora_net()
    x = torch.randn(3, 4)
    ref = RefreshedReference("lora", every=2)
    with torch.no_grad(), ref.weights(net) as m:  # before a refresh: the base model
        base = m(x)
    torch.testing.assert_close(base, net.base_model.model[0].base_layer(x))
    ref.after_step(net)
    assert ref.refreshes == 0
    ref.after_step(net)  # step 2: the snapshot is the policy now
    before = net(x).detach()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)  # the policy moves on
    with torch.no_grad(), ref.weights(net) as m:
        torch.testing.assert_close(m(x), before)
    assert not torch.allclose(net(x), before)  # and the policy's own weights are back
    assert all(p.requires_grad for n, p in net.named_parameters() if "lora" in n)
    state = ref.state_dict()
    again = RefreshedReference("lora", every=2)
    again.load_state_dict(state)
    with torch.no_grad(), again.weights(net) as m:
        torch.testing.assert_close(m(x), before)
    assert again.steps == 2 and again.refreshes == 1


def test_the_lora_swap_is_safe_under_autocast_and_a_pending_backward():
    net = _lora_net()
    ref = RefreshedReference("lora", every=1)
    ref.refresh(net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_ref = None
        with torch.no_grad(), ref.weights(net) as m:
            expected_ref = m(x).float()
        out = net(x).float()  # the policy forward, cached casts and all
        with torch.no_grad(), ref.weights(net) as m:
            ref_out = m(x).float()
    torch.testing.assert_close(ref_out, expected_ref)
    assert not torch.allclose(out, ref_out)
    out.sum().backward()  # the policy's graph still holds its own weights
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    net(x).float().sum().backward()
    for n, p in net.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=2e-2, atol=2e-2)


def _online_cfg(toy_video, tmp_path, *overrides, prompts=PROMPTS):
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    raw = {"task": "flow", "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
           "model": {"pretrained": toy_video, "lora": {"rank": 2, "alpha": 4}},
           "method": {"name": "flow_dpo", "beta": 500.0},
           "data": {"resolution": 32, "num_frames": 9},
           "online": {"prompts": str(tmp_path / "prompts.txt"), "num_samples": 3, "steps": 2,
                      "rewards": [{"scorer": "test_flow_online:clip_redness"}], "ref_update_every": 2},
           "optim": {"lr": 1e-3},
           "train": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "progress": False}}
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    return load_train_config(str(tmp_path / "cfg.json"), list(overrides))


def test_online_flow_dpo_trains_from_prompts_and_refreshes_its_reference(toy_video, tmp_path):
    result = train(_online_cfg(toy_video, tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert rows[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert {"online/reward_best", "online/reward_worst", "online/groups_skipped"} <= set(rows[0])
    assert all(r["online/reward_best"] >= r["online/reward_worst"] for r in rows)
    # the reference moved to the policy after step 2: step 3 starts at policy == reference again
    assert rows[2]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "run" / "lora").is_dir() and "lora" in result.outputs


def test_online_resume_repeats_the_uninterrupted_run(toy_video, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    train(_online_cfg(toy_video, full))
    part = tmp_path / "part"
    part.mkdir()
    train(_online_cfg(toy_video, part, "train.max_steps=3"))  # a checkpoint at step 2, then one more step
    train(_online_cfg(toy_video, part, "run.resume=latest"))

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["online/reward_mean"]) for r in rows}

    a, b = losses(full), losses(part)
    for step in (3, 4):
        assert a[step] == b[step]


def test_online_configs_are_checked_before_loading(toy_video, tmp_path):
    with pytest.raises(Exception, match="data.shards and online are exclusive"):
        _online_cfg(toy_video, tmp_path, "data.shards=assets/tiny/video_pairs")
    cfg = _online_cfg(toy_video, tmp_path, "online.rewards=[{scorer: toy_color}]")
    with pytest.raises(TrainingError, match=r"online.rewards\[0\] 'toy_color' scores image"):
        train(cfg)
    cfg = _online_cfg(toy_video, tmp_path, f"online.prompts={tmp_path / 'missing.txt'}")
    with pytest.raises(Exception, match="missing.txt"):
        train(cfg)
    with pytest.raises(Exception, match="ref_update_every"):
        _online_cfg(toy_video, tmp_path, "method.name=sft", "method.beta=null")


def test_a_micro_batch_with_no_reward_gap_is_skipped_and_counted(toy_video, tmp_path):
    cfg = _online_cfg(toy_video, tmp_path, "online.rewards=[{scorer: 'test_flow_online:clip_redness', weight: 0}]",
                      "online.ref_update_every=0", "train.max_steps=2")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped/online_no_gap"] == 2 and all(r["loss"] is None for r in rows)  # NaN: no step ran


def test_the_tiny_online_recipe_on_the_shipped_toy_video_base(tmp_path):
    cfg = load_train_config("configs/tiny/flow_dpo_online_toy_video.yaml",
                            [f"run.output_dir={tmp_path / 'run'}", "train.progress=false"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # ln 2 at the start and right after the reference moved to the policy (after optimizer step 3)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[3]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(r["online/reward_best"] > r["online/reward_worst"] for r in rows)
    assert {"online/toy_video/VQ", "online/toy_video/MQ", "online/toy_video/TA"} <= set(rows[0])
