"""Reward-model training as a task of the generic loop: losses from mmalign.losses, export, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(out: Path, *overrides: str):
    return load_train_config(ROOT / "configs/reward/toy_clip.yaml",
                             [f"run.output_dir={out}", f"data.shards={ROOT / 'assets/tiny/pairs'}",
                              "train.progress=false", "train.batch_size=4", "data.shuffle_buffer=16", *overrides])


def test_recipes_validate():
    for name in ("toy_clip", "pickscore", "hps", "video"):
        cfg = load_train_config(ROOT / f"configs/reward/{name}.yaml")
        assert cfg.task == "reward" and cfg.model.kind in ("clip", "hps", "video")


def test_image_pair_loss_is_the_loss_core_on_scorer_rewards():
    from mmalign.losses import soft_ce_loss
    from mmalign.rewards.train import image_pair_loss

    class Fixed(torch.nn.Module):
        def forward(self, images, prompts):
            return images.mean((1, 2, 3)) * 10

    x = torch.rand(6, 3, 8, 8) * 2 - 1
    batch = {"pixel_values": x, "captions": ["a", "b", "c"], "label": torch.tensor([1.0, 0.5, 1.0])}
    loss, metrics = image_pair_loss(Fixed(), batch, "soft_ce")
    r = ((x + 1) / 2).mean((1, 2, 3)) * 10
    expected, _ = soft_ce_loss(r[:3], r[3:], torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(loss, expected)
    bt, m = image_pair_loss(Fixed(), batch, "bt")
    assert m["reward/num_ties"] == 1 and m["reward/num_pairs"] == 2


def test_toy_recipe_trains_exports_and_resumes_exactly(tmp_path):
    from mmalign.rewards import load_scorer

    common = ["train.max_steps=4", "train.checkpoint_every=2"]
    straight = train(cfg_for(tmp_path / "a", *common))
    first = train(cfg_for(tmp_path / "b", *common, "train.max_steps=2"))
    resumed = train(cfg_for(tmp_path / "b", *common, "run.resume=latest"))
    assert first.keys_seen + resumed.keys_seen == straight.keys_seen
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    scorer = load_scorer(straight.outputs["reward_model"])
    assert scorer.name == "toy_reward" and scorer.scale == "logit_scale"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scorer.score(x, ["a red circle on the left"] * 2),
                                   straight.module(x, ["a red circle on the left"] * 2))
    assert straight.module.model.logit_scale.exp() <= 100 + 1e-4


def test_kind_must_match_the_shards(tmp_path):
    from mmalign.rewards.train import RewardTask

    cfg = cfg_for(tmp_path, "model.kind=video")
    with pytest.raises(ValueError, match="trains on 'video_pair' shards"):
        RewardTask(cfg).check_inputs()
