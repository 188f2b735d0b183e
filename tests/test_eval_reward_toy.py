"""`mmalign eval reward-toy` on tiny sizes: reward-model data, ranked sets by the learned model and the truth,
RankDPO runs and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.cli import main


def test_perturb_changes_exactly_one_attribute():
    from mmalign.eval.reward_toy import perturb
    from mmalign.toy.scenes import allowed_cx, sample_scenes

    rng = np.random.default_rng(0)
    for scene in sample_scenes(30, 3):
        for attribute in ("color", "shape", "position"):
            new = perturb(scene, attribute, rng)
            assert getattr(new, attribute) != getattr(scene, attribute)
            same = {"color", "shape", "position"} - {attribute}
            assert all(getattr(new, a) == getattr(scene, a) for a in same)
            assert new.cx in allowed_cx(new.position, new.size)


def test_reward_toy_tiny_end_to_end(tmp_path, capsys):
    from mmalign.data.dataset import PairDataset, RankedDataset
    from mmalign.rewards import load_scorer
    from mmalign.toy import experiment as ex

    out = tmp_path / "proof"
    args = ["eval", "reward-toy", "--out", str(out), "--rm-pairs", "32", "--rm-heldout", "16", "--rm-steps", "2",
            "--rm-batch-size", "8", "--prompts", "4", "--images-per-prompt", "3", "--eval-prompts", "4",
            "--sample-steps", "2", "--no-progress", "train.max_steps=2", "train.checkpoint_every=0",
            "train.batch_size=2", "validation.prompts=[]"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # reward-model data: labels agree with the ground truth as the annotator's agreement says
    pairs = list(PairDataset(str(out / "rm_data" / "heldout"), ties="keep", decode_images=False, rank=0,
                             world_size=1))
    assert len(pairs) == 16
    rm = report["reward_model"]
    assert 0.0 <= rm["heldout_accuracy"] <= 1.0
    assert rm["truth_agreement_with_labels"] == pytest.approx(rm["data"]["heldout"]["annotator_agreement"])
    # the ground-truth ranking orders every pair of distinct true rewards correctly; the learned one stores the
    # exported reward model's scores of the very same images
    assert report["ranking_vs_truth"]["truth"]["pairwise_accuracy"] == 1.0
    scorer = load_scorer(rm["folder"])
    learned = list(RankedDataset(str(out / "learned" / "data" / "ranked"), rank=0, world_size=1))
    truth = list(RankedDataset(str(out / "truth" / "data" / "ranked"), rank=0, world_size=1))
    assert len(learned) == len(truth) == 4
    stats = {c: json.loads((out / c / "data" / "ranked" / "manifest.json").read_text())["conversion"]["scorers"]
             for c in ("learned", "truth")}
    for a, b in zip(learned, truth):
        images = np.stack([np.asarray(im) for im in a["images"]])
        assert np.array_equal(images, np.stack([np.asarray(im) for im in b["images"]]))
        with torch.no_grad():
            raw = scorer.score(images, a["caption"]).numpy()
        z = (raw - stats["learned"][scorer.name]["mean"]) / stats["learned"][scorer.name]["std"]
        np.testing.assert_allclose(a["scores"].numpy(), z, rtol=1e-4, atol=1e-4)
        true = ex.rewards(images, [a["caption"]] * 3)["total"]
        z = (true - stats["truth"]["toy_total"]["mean"]) / stats["truth"]["toy_total"]["std"]
        np.testing.assert_allclose(b["scores"].numpy(), z, rtol=1e-5, atol=1e-6)
    assert [r["condition"] for r in report["runs"]] == ["learned", "truth"]
    for r in report["runs"]:
        assert r["reward_gain"] == pytest.approx(r["aligned"]["total"] - report["base"]["total"])
        assert 0.0 <= r["win_rate"] <= 1.0
    assert "| learned reward model |" in capsys.readouterr().out
    # a second run reuses every finished stage; other settings in the same folder are refused
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["runs"] == report["runs"]
    assert main([*args[:-1], "train.batch_size=1"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
