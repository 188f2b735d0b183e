"""Video reward model on mp4 files the test writes: scoring, normalisation, export/load, loss, shard evaluation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from mmalign.rewards.video import DIMENSIONS, VideoRewardModel, VideoScorer, frames_to_batch, video_pair_loss


def mp4(num_frames: int, seed: int, size: tuple[int, int] = (24, 32), fps: int = 4) -> bytes:
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*size, 3))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(num_frames):
            frame = np.roll(base, 3 * i * (seed % 3 + 1), axis=1).astype(np.uint8)  # motion differs per seed
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mmalign.rewards.tiny import build_tiny_clip

    root = tmp_path_factory.mktemp("video_rm")
    clip = build_tiny_clip(root / "clip")
    torch.manual_seed(0)
    model = VideoRewardModel.from_clip(str(clip), {"max_frames": 4, "fps": None, "head_hidden": 16,
                                                  "overall_weights": {"VQ": 1.0, "MQ": 0.5, "TA": 2.0}})
    return model, root


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    paths = []
    for i, n in enumerate((4, 3, 4, 2)):
        path = folder / f"v{i}.mp4"
        path.write_bytes(mp4(n, seed=i))
        paths.append(str(path))
    return paths


PROMPTS = ["a red circle on the left", "a blue square on the right", "a red circle on the left",
           "a green triangle on the center"]


def test_scores_normalisation_and_overall(model_dir, videos):
    model, _ = model_dir
    scorer = VideoScorer(model)
    with torch.no_grad():
        from mmalign.data.video import read_frames

        frames, mask = frames_to_batch([read_frames(p, max_frames=4) for p in videos])
        raw = model(frames, mask, PROMPTS)
        model.calibrate(raw)
        out = scorer.score(videos, PROMPTS)
    assert scorer.dims == ("VQ", "MQ", "TA", "Overall") and out.shape == (4, 4)
    z = (raw - raw.mean(0)) / raw.std(0)
    torch.testing.assert_close(out[:, :3], z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3], z[:, 0] + 0.5 * z[:, 1] + 2.0 * z[:, 2], atol=1e-5, rtol=1e-5)
    assert mask.sum(1).tolist() == [4, 3, 4, 2]
    # padding frames do not change a video's score: score video 1 (3 frames) alone
    with torch.no_grad():
        alone = scorer.score([videos[1]], [PROMPTS[1]])
    torch.testing.assert_close(alone[0], out[1], atol=1e-5, rtol=1e-5)
    # only TA sees the text
    with torch.no_grad():
        other = scorer.score(videos, ["a yellow square on the left"] * 4)
    torch.testing.assert_close(other[:, :2], out[:, :2])
    assert not torch.allclose(other[:, 2], out[:, 2])


def test_export_load_round_trip(model_dir, videos, tmp_path):
    from mmalign.rewards import load_scorer

    model, _ = model_dir
    model.save_pretrained(tmp_path / "export")
    loaded = load_scorer(str(tmp_path / "export"))
    assert isinstance(loaded, VideoScorer) and loaded.modality == "video"
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(videos, PROMPTS), VideoScorer(model).score(videos, PROMPTS))
    assert torch.equal(loaded.model.dim_std, model.dim_std)


def _btt_by_hand(d: float, label: int, k: float) -> float:
    def logsig(x):
        return -math.log1p(math.exp(-x))

    c = math.log(k)
    if label == 0:
        return -logsig(d - c) - logsig(-d - c) - math.log(k * k - 1)
    return -logsig(label * d - c)


def test_video_pair_loss_and_shard_evaluation(model_dir, videos, tmp_path):
    from mmalign.data.collate import collate_video_pairs
    from mmalign.data.dataset import VideoPairDataset
    from mmalign.data.schemas import video_pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.rewards.evaluate import evaluate_reward

    model, _ = model_dir
    blobs = [open(p, "rb").read() for p in videos]
    labels = [{"VQ": "A", "MQ": "B", "TA": "same"}, {"VQ": "same", "MQ": "A", "TA": "B"}]
    with ShardSetWriter(tmp_path / "vp", "video_pair") as writer:
        for i, (a, b) in enumerate([(0, 1), (2, 3)]):
            writer.write(video_pair_sample(f"v{i}", blobs[a], blobs[b], prompt=PROMPTS[a], labels=labels[i],
                                           fps_a=4, fps_b=4, num_frames_a=4, num_frames_b=3))
    ds = VideoPairDataset(tmp_path / "vp", frames={"max_frames": 4})
    batch = collate_video_pairs(list(ds))
    model.train()
    loss, metrics = video_pair_loss(model, batch, k=5.0)
    with torch.no_grad():
        fa, ma = frames_to_batch(batch["frames_a"])
        fb, mb = frames_to_batch(batch["frames_b"])
        ra, rb = model(fa, ma, batch["prompts"]), model(fb, mb, batch["prompts"])
    expected = []
    for j, dim in enumerate(DIMENSIONS):
        h = [{"A": 1, "B": -1, "same": 0}[lab[dim]] for lab in labels]
        expected.append(np.mean([_btt_by_hand(float(ra[i, j] - rb[i, j]), h[i], 5.0) for i in range(2)]))
    assert loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-5)
    loss.backward()
    # every head weight learns (the output biases cancel in r_a - r_b, so their gradient is 0 by design)
    grads = {n: p.grad.abs().sum().item() for n, p in model.heads.named_parameters() if n.endswith("weight")}
    assert all(g > 0 for g in grads.values()), grads
    model.zero_grad(set_to_none=True)
    model.eval()

    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    result = evaluate_reward(tmp_path / "vp", [str(folder)], scores_dir=tmp_path / "scores", progress=False)
    metrics = result["scorers"]["video"]["metrics"]
    assert set(metrics) == {"VQ", "MQ", "TA"}  # Overall has no label in the schema
    z = torch.stack([VideoScorer(model).score([videos[a], videos[b]], [PROMPTS[a]] * 2).detach()
                     for a, b in [(0, 1), (2, 3)]])
    for j, dim in enumerate(DIMENSIONS):
        h = [{"A": 1, "B": -1, "same": 0}[lab[dim]] for lab in labels]
        m = (z[:, 0, j] - z[:, 1, j]).tolist()
        from mmalign.rewards.metrics import pairwise_accuracy

        assert metrics[dim]["accuracy"] == pytest.approx(pairwise_accuracy(h, m)["accuracy"], nan_ok=True)
