"""`mmalign score` (per-shard score files, resume, bad samples, 2 processes) and `mmalign eval reward`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import torchrun2
import torch
from PIL import Image

from mmalign.data.schemas import pair_sample
from mmalign.data.writer import ShardSetWriter
from mmalign.rewards.scoring import ScoreError, read_scores, score_path, score_shards
from mmalign.toy import COLORS, sample_scenes


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def toy_pairs(n: int, seed: int = 0):
    """Pairs labelled by the toy colour reward: the true-colour image wins, two wrong colours tie."""
    import dataclasses

    out = []
    for i, scene in enumerate(sample_scenes(n, seed)):
        wrong = [dataclasses.replace(scene, color=c).render() for c in COLORS if c != scene.color]
        if i % 3 == 2:
            a, b, label = wrong[0], wrong[1], 0.5
        elif i % 2:
            a, b, label = wrong[0], scene.render(), 0.0
        else:
            a, b, label = scene.render(), wrong[0], 1.0
        out.append((f"p{i:04d}", a, b, scene.caption, label))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 3 pairs; the 5th sample has a truncated PNG (readable header, undecodable pixels)."""
    root = tmp_path_factory.mktemp("score_shards") / "pairs"
    pairs = toy_pairs(12)
    with ShardSetWriter(root, "pair", max_count=3) as writer:
        for j, (key, a, b, caption, label) in enumerate(pairs):
            img_a = png(a)[:80] if j == 4 else png(a)
            writer.write(pair_sample(key, img_a, png(b), caption=caption, label_0=label))
    return root, pairs


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from mmalign.rewards.tiny import build_tiny_clip

    return str(build_tiny_clip(tmp_path_factory.mktemp("score_models") / "clip"))


def test_score_files_resume_and_skip(shards, tiny_clip, tmp_path):
    from mmalign.rewards import load_scorer
    from mmalign.toy import color_adherence

    root, pairs = shards
    out = tmp_path / "scores"
    specs = ["toy_color", f"pickscore={tiny_clip}"]
    report = score_shards(root, out, specs, batch_size=4, progress=False)
    assert (report.shards_scored, report.samples, report.skipped) == (4, 11, 1)
    assert report.skip_reasons["decode"] == 1
    header = json.loads(score_path(out, "toy_color", "shard-000001.tar").read_text().splitlines()[0])
    assert header["count"] == 2 and header["skipped"] == 1 and header["shard"] == "shard-000001.tar"
    toy, info = read_scores(out, "toy_color", root)
    assert "p0004" not in toy and len(toy) == 11 and info["version"].startswith("toy-")
    for key, a, b, caption, _ in pairs:
        if key != "p0004":
            np.testing.assert_allclose(toy[key], color_adherence(np.stack([a, b]), [caption] * 2), atol=1e-6)
    ps, _ = read_scores(out, "pickscore", root)
    direct = load_scorer(f"pickscore={tiny_clip}")
    with torch.no_grad():
        expected = direct.score([pairs[0][1], pairs[0][2]], pairs[0][3])
    np.testing.assert_allclose(ps["p0000"], expected.numpy(), atol=1e-5)

    # resume: finished shards are skipped and left untouched; a removed file is redone
    before = score_path(out, "pickscore", "shard-000000.tar").stat().st_mtime_ns
    score_path(out, "toy_color", "shard-000002.tar").unlink()
    again = score_shards(root, out, specs, batch_size=4, progress=False)
    assert (again.shards_scored, again.shards_already_done) == (1, 3)
    assert score_path(out, "pickscore", "shard-000000.tar").stat().st_mtime_ns == before
    assert read_scores(out, "toy_color", root)[0] == toy

    # another version of a scorer never mixes with stored scores
    (out / "toy_color" / "scorer.json").write_text(json.dumps({"name": "toy_color", "version": "toy-old",
                                                               "dims": None}))
    with pytest.raises(ScoreError, match="version toy-old"):
        score_shards(root, out, ["toy_color"], progress=False)


def test_strict_raises_on_bad_sample(shards, tmp_path):
    from mmalign.data.dataset import CorruptSampleError

    root, _ = shards
    with pytest.raises(CorruptSampleError, match="p0004"):
        score_shards(root, tmp_path / "s", ["toy_color"], strict=True, progress=False)


def test_video_scorer_refused_for_image_shards(shards, tmp_path):
    root, _ = shards
    with pytest.raises(ScoreError, match="image"):
        from mmalign.rewards.base import Scorer

        class FakeVideo(Scorer):
            name, modality = "fake", "video"

        score_shards(root, tmp_path / "s", [FakeVideo()], progress=False)


@pytest.mark.distributed
def test_two_processes_split_shards(shards, tmp_path):
    root, _ = shards
    out = tmp_path / "scores"
    torchrun2("-m", "mmalign.cli", "score", "--scorers", "toy_color", "--in", root, "--out", out, "--no-progress")
    writers = {}
    for shard in sorted(p.name for p in root.glob("*.tar")):
        writers[shard] = json.loads(score_path(out, "toy_color", shard).read_text().splitlines()[0])["written_by"]
    assert writers == {"shard-000000.tar": "rank 0 of 2", "shard-000001.tar": "rank 1 of 2",
                       "shard-000002.tar": "rank 0 of 2", "shard-000003.tar": "rank 1 of 2"}
    single = tmp_path / "single"
    score_shards(root, single, ["toy_color"], progress=False)
    assert read_scores(out, "toy_color", root)[0] == read_scores(single, "toy_color", root)[0]


def test_eval_reward_cli(shards, tmp_path, capsys):
    from mmalign.cli import main

    root, pairs = shards
    report = tmp_path / "report.json"
    assert main(["eval", "reward", "--scorers", "toy_color,toy", "--in", str(root), "--out", str(report),
                 "--no-progress"]) == 0
    result = json.loads(report.read_text())
    color = result["scorers"]["toy_color"]["metrics"]["score"]
    # the labels are the colour reward's own preferences (ties: equal reward 0): both accuracies are exact
    n_ties = sum(p[4] == 0.5 for k, p in enumerate(pairs) if k != 4)
    assert color["accuracy"] == 1.0 and color["accuracy_with_ties"] == 1.0 and color["tie_epsilon"] == 0.0
    assert color["num_ties"] == n_ties and color["num_pairs"] == 11 - n_ties
    assert set(result["scorers"]["toy"]["metrics"]) == {"color", "shape", "position", "total"}
    # shape and position are equal within every pair: all model ties, so no non-tie pair is ranked right
    assert result["scorers"]["toy"]["metrics"]["shape"]["accuracy"] == 0.5
    table = capsys.readouterr().out
    assert "acc w/ ties" in table and "toy_color" in table


def test_score_cli_reports_and_rejects(shards, tmp_path, capsys):
    from mmalign.cli import main

    root, _ = shards
    assert main(["score", "--scorers", "toy_color", "--in", str(root), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert "4 shards scored" in capsys.readouterr().out
    assert main(["score", "--scorers", "nope", "--in", str(root), "--out", str(tmp_path / "o")]) == 2
    assert "unknown scorer 'nope'" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o")


def test_ray_backend_matches_the_process_backend(shards, tiny_clip, tmp_path):
    """`mmalign score --ray` on a local Ray (2 CPUs): same scores, skip counts and reasons as the process backend;
    finished shards are skipped on a second run."""
    ray = pytest.importorskip("ray")
    from mmalign.rewards.scoring import score_shards_ray

    root, _ = shards
    specs = ["toy_color", f"pickscore={tiny_clip}"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        report = score_shards_ray(root, tmp_path / "ray", specs, batch_size=4, num_actors=1, wave=3,
                                  progress=False)
        assert (report.shards_scored, report.samples, report.skipped) == (4, 11, 1)
        assert report.skip_reasons["decode"] == 1
        again = score_shards_ray(root, tmp_path / "ray", specs, progress=False)
        assert (again.shards_scored, again.shards_already_done) == (0, 4)
    finally:
        ray.shutdown()
    score_shards(root, tmp_path / "local", specs, batch_size=4, progress=False)
    for name in ("toy_color", "pickscore"):
        by_ray, info = read_scores(tmp_path / "ray", name, root)
        local, local_info = read_scores(tmp_path / "local", name, root)
        assert info["version"] == local_info["version"] and by_ray.keys() == local.keys() and len(local) == 11
        for key in local:
            np.testing.assert_allclose(by_ray[key], local[key], rtol=1e-5, atol=1e-6)
        for shard in sorted(p.name for p in root.glob("*.tar")):
            h_ray, h_local = (json.loads(score_path(d, name, shard).read_text().splitlines()[0])
                              for d in (tmp_path / "ray", tmp_path / "local"))
            assert (h_ray["count"], h_ray["skipped"], h_ray["skip_reasons"], h_ray["written_by"]) == \
                (h_local["count"], h_local["skipped"], h_local["skip_reasons"], "ray")
