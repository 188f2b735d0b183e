"""`mmalign bench toy-video-sweep` (the video world's fair method table) at a tiny size: settings are chosen on the
validation split and reported on held-out seeds, each method sweeps its own knob, transformer passes are counted,
and finished runs are reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmalign.cli import main


def test_video_splits_never_share_a_seed_and_cycle_all_prompts():
    from mmalign.toy.video import all_video_prompts, video_prompt_seed_pairs

    n = 600
    seeds = {s: {seed for _, seed in video_prompt_seed_pairs(s, n)} for s in ("train", "heldout", "val")}
    assert all(len(v) == n for v in seeds.values())
    assert not seeds["train"] & seeds["val"] and not seeds["heldout"] & seeds["val"]
    assert [p for p, _ in video_prompt_seed_pairs("val", 60)] == all_video_prompts()
    with pytest.raises(ValueError, match="'train', 'heldout' or 'val'"):
        video_prompt_seed_pairs("test", 1)


def test_model_passes_counts_only_the_named_classes():
    import torch

    from mmalign.toy.sweep import ModelPasses

    lin, conv = torch.nn.Linear(2, 2), torch.nn.Conv1d(1, 1, 1)
    with ModelPasses(torch.nn.Conv1d) as passes:
        lin(torch.randn(4, 2))
        conv(torch.randn(3, 1, 5)).sum().backward()
        with torch.no_grad():
            conv(torch.randn(2, 1, 5))
    assert (passes.grad, passes.no_grad, passes.forward_equivalents) == (3, 2, 2 + 9)


def test_tiny_video_sweep_chooses_on_validation_and_reports_held_out_seeds(toy_video, tmp_path):
    from mmalign.flow.sweep import LRS

    out = tmp_path / "sweep"
    args = ["bench", "toy-video-sweep", "--out", str(out), "--base", toy_video, "--methods", "sft,flow_rwr",
            "--seeds", "2", "--pairs", "8", "--val-prompts", "4", "--eval-prompts", "5", "--sample-steps", "3",
            "--no-progress", "train.max_steps=2", "train.batch_size=2"]
    assert main(args) == 0
    report = json.loads((out / "sweep.json").read_text())
    runs = report["runs"]
    val = [r for r in runs if r["split"] == "val"]
    assert [(r["method"], r["lr"]) for r in val if r["method"] == "sft"] == [("sft", lr) for lr in LRS]
    rwr = [r for r in val if r["method"] == "flow_rwr"]
    assert sorted({r["temperature"] for r in rwr}) == [0.03, 0.1, 0.3] and len(rwr) == 6
    cfg = (out / "runs" / "flow_rwr-temperature0.3-lr0.0005-seed0" / "train" / "config.yaml").read_text()
    assert "temperature: 0.3" in cfg and "lr: 0.0005" in cfg and "flow_rwr" in cfg
    for method in ("sft", "flow_rwr"):
        rows = [r for r in val if r["method"] == method]
        best = max(rows, key=lambda r: r["reward_gain"])
        assert report["chosen"][method] == {k: best[k] for k in report["chosen"][method]}
        held = [r for r in runs if r["method"] == method and r["split"] == "heldout"]
        assert [r["seed"] for r in held] == [0, 1]
        assert held[0]["lora"] == best["lora"]  # seed 0 is the validation run itself, evaluated on held-out
        assert all(r["lr"] == report["chosen"][method]["lr"] for r in held)
        assert report["summary"][method]["reward_gain"][0] == pytest.approx(np.mean([r["reward_gain"]
                                                                                    for r in held]))
        assert report["summary"][method]["win_rate_pooled"]["n"] == 2 * 5
    # Flow-RWR trains on every clip: 2 steps x 2 pairs x 2 clips policy passes with autograd, none without
    # (the untrained tiny base ties every pair, so SFT, on decided pairs only, skips every step)
    assert all((r["transformer_grad"], r["transformer_no_grad"]) == (8, 0) for r in runs if r["method"] == "flow_rwr")
    table = (out / "sweep.md").read_text()
    assert "| flow_rwr | τ " in table and "| sft | lr 0.0002" in table and "transformer fwd-equiv." in table
    assert (out / "compute.png").is_file() and (out / "samples.gif").stat().st_size > 0
    # a second call reuses every finished run and evaluation; other settings over the same folder are refused
    stamp = (out / "runs" / "sft-lr0.0002-seed0" / "row_val.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "sft-lr0.0002-seed0" / "row_val.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="other settings"):
        main([a if a != "8" else "10" for a in args])
    assert main(["bench", "toy-video-sweep", "--methods", "dpo"]) == 2
