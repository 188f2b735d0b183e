"""`mmalign bench toy-sweep` (the fair method table): its splits, its UNet-pass counter, its compute interpolation,
and a tiny end-to-end run that checks the selection is made on the validation split and reported on held-out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_the_three_prompt_splits_never_share_a_seed_and_cycle_all_prompts():
    from mmalign.toy.scenes import all_prompts, prompt_seed_pairs

    n = 720
    splits = {s: prompt_seed_pairs(s, n) for s in ("train", "heldout", "val")}
    seeds = {s: {seed for _, seed in pairs} for s, pairs in splits.items()}
    assert all(len(v) == n for v in seeds.values())
    assert not seeds["train"] & seeds["heldout"] and not seeds["train"] & seeds["val"]
    assert not seeds["heldout"] & seeds["val"]
    for pairs in splits.values():
        assert [p for p, _ in pairs[:36]] == all_prompts()
    assert splits["val"][0][1] == 2**32 - 1  # a valid 32-bit seed for numpy and torch
    np.random.default_rng(splits["val"][0][1])
    with pytest.raises(ValueError, match="'train', 'heldout' or 'val'"):
        prompt_seed_pairs("test", 1)


def test_unet_passes_counts_samples_with_and_without_autograd_only_while_open():
    from diffusers import UNet2DConditionModel
    from mmalign.toy.sweep import UNetPasses

    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)
    x, cond = torch.randn(5, 3, 8, 8), torch.randn(5, 2, 8)
    counter = UNetPasses()
    with counter:
        unet(x, 10, cond).sample.sum().backward()
        with torch.no_grad():
            unet(x[:3], 10, cond[:3], return_dict=False)
        torch.nn.Linear(2, 2)(torch.randn(7, 2))  # not a UNet: not counted
    unet(x, 10, cond)  # closed: not counted
    assert (counter.grad, counter.no_grad) == (5, 3)
    assert counter.forward_equivalents == 3 + 3 * 5


def test_compute_to_reach_interpolates_from_the_origin_and_between_stages():
    from mmalign.toy.sweep import compute_to_reach

    curve = [{"forward_equivalents": 100, "reward_gain": 0.1}, {"forward_equivalents": 300, "reward_gain": 0.3}]
    assert compute_to_reach(curve, 0.05) == pytest.approx(50)
    assert compute_to_reach(curve, 0.2) == pytest.approx(200)
    assert compute_to_reach(curve, 0.31) is None


def test_tiny_sweep_chooses_on_validation_and_reports_held_out_seeds(tmp_path):
    from mmalign.cli import main
    from mmalign.toy.sweep import LRS

    out = tmp_path / "sweep"
    rc = main(["bench", "toy-sweep", "--out", str(out), "--methods", "sft,spo", "--seeds", "2", "--prompts", "6",
               "--images-per-prompt", "3", "--val-prompts", "4", "--eval-prompts", "5", "--sample-steps", "6",
               "--curve-methods", "spo", "--curve-steps", "1", "--spm-steps", "2", "--spo-steps", "2",
               "train.max_steps=2", "train.batch_size=2", "train.progress=false"])
    assert rc == 0
    report = json.loads((out / "sweep.json").read_text())
    runs = report["runs"]
    val = [r for r in runs if r["split"] == "val"]
    assert [(r["method"], r["beta"], r["lr"]) for r in val if r["method"] == "sft"] == [("sft", None, lr)
                                                                                        for lr in LRS]
    assert len([r for r in val if r["method"] == "spo"]) == 6
    for method in ("sft", "spo"):
        rows = [r for r in val if r["method"] == method]
        best = max(rows, key=lambda r: r["reward_gain"])
        assert report["chosen"][method] == {"beta": best["beta"], "lr": best["lr"]}
        held = [r for r in runs if r["method"] == method and r["split"] == "heldout"]
        assert [r["seed"] for r in held] == [0, 1]
        assert all({"beta": r["beta"], "lr": r["lr"]} == report["chosen"][method] for r in held)
        assert held[0]["lora"] == best["lora"]  # seed 0 is the validation run itself, evaluated on held-out
        assert report["summary"][method]["reward_gain"][0] == pytest.approx(np.mean([r["reward_gain"]
                                                                                    for r in held]))
        assert report["summary"][method]["win_rate_pooled"]["n"] == 2 * 5
    spo1 = next(r for r in runs if r["method"] == "spo" and r["split"] == "heldout" and r["seed"] == 1)
    assert [p["step"] for p in spo1["curve"]] == [1, 2]  # trained in stages, resumed
    assert 0 < spo1["curve"][0]["forward_equivalents"] < spo1["curve"][1]["forward_equivalents"]
    assert spo1["unet_no_grad"] > 0  # sampling is counted
    cfg = (out / "runs" / "spo-beta10-lr0.0005-seed0" / "train" / "config.yaml").read_text()
    assert "spo_online" in cfg and str(out / "spm" / "reward_model") in cfg
    assert (out / "compute.png").stat().st_size > 1000 and (out / "bench.png").stat().st_size > 1000
    table = (out / "sweep.md").read_text()
    assert "| spo |" in table and "| sft | lr 0.0001" in table
    assert main(["bench", "toy-sweep", "--methods", "ppo"]) == 2
    assert main(["bench", "toy-sweep", "--curve-steps", "a,b"]) == 2
