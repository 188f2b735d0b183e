"""Flow matching (`task: flow`) on bad video data: in a run over `video_pair` shards, a clip whose mp4 is corrupt and
a clip with fewer frames than `data.num_frames` are each skipped and counted in the metrics, and `data.strict=true`
turns either into an error naming the sample; a VideoAlign CSV row whose videos are missing is dropped and counted,
or under strict conversion an error naming the row."""

import csv
import json

import numpy as np
import pytest

from mmalign.data.dataset import CorruptSampleError
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import DataError, train

CORRUPT, SHORT = "clip-002", "clip-004"


def _write_pairs(out, bad: tuple[str, ...]) -> None:
    """7 decided toy video pairs (9 frames, 32x32); `CORRUPT`'s A video is cut to half its bytes, `SHORT`'s B clip
    has 5 frames. The 6 readable pairs fill exactly 3 micro-batches of 2, so one pass reads each bad one once."""
    from mmalign.data.schemas import video_pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.video import sample_clip
    from mmalign.toy.video_annotator import encode_mp4

    rng = np.random.default_rng(0)
    with ShardSetWriter(out, "video_pair") as writer:
        for i in range(7):
            key = f"clip-{i:03d}"
            a, b = sample_clip(rng).render(), sample_clip(rng).render()
            if key == SHORT and key in bad:
                b = b[:5]
            video_a, video_b = encode_mp4(a), encode_mp4(b)
            if key == CORRUPT and key in bad:
                video_a = video_a[: len(video_a) // 2]  # still starts with the ftyp box: only decoding fails
            labels = {"VQ": "A", "MQ": "B" if i % 2 else "A", "TA": "A"}  # every vote decided
            writer.write(video_pair_sample(key, video_a, video_b, prompt=f"clip {i}", labels=labels, fps_a=8.0,
                                           fps_b=8.0, num_frames_a=len(a), num_frames_b=len(b)))


def _cfg(tmp_path, shards, name, *overrides):
    return load_train_config("configs/tiny/flow_dpo_wan.yaml", [
        f"run.output_dir={tmp_path / name}", f"data.shards={shards}", "data.shuffle_buffer=0", "train.batch_size=2",
        "train.max_steps=3", "train.checkpoint_every=0", "train.progress=false", *overrides])


def test_a_corrupt_and_a_short_clip_are_skipped_and_counted_and_strict_names_them(tmp_path):
    shards = tmp_path / "pairs"
    _write_pairs(shards, bad=(CORRUPT, SHORT))
    result = train(_cfg(tmp_path, shards, "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows) and result.nonfinite_steps == 0
    assert CORRUPT not in result.keys_seen and SHORT in result.keys_seen  # the short pair was read, then dropped
    # One corrupt sample (the reader) and one short clip (the flow task), both in the run's skip count.
    assert result.skipped_samples == 2 and rows[-1]["skipped_samples"] == 2
    assert [r["skipped_samples"] for r in rows] == [0, 2, 2]  # counted at the micro-batch that passed them
    assert not any(k.startswith("skipped/") for k in rows[-1])  # no whole micro-batch had to be dropped
    assert "lora" in result.outputs

    with pytest.raises(CorruptSampleError, match=f"sample '{CORRUPT}': InvalidDataError"):
        train(_cfg(tmp_path, shards, "strict", "data.strict=true"))
    only_short = tmp_path / "short"
    _write_pairs(only_short, bad=(SHORT,))
    with pytest.raises(DataError, match=f"{SHORT}: clips of 9 and 5 frames, fewer than data.num_frames 9"):
        train(_cfg(tmp_path, only_short, "strict_short", "data.strict=true"))


def test_a_short_clip_adds_to_the_readers_skip_counts_of_its_batch():
    from mmalign.flow.task import video_pair_batch

    g = np.random.default_rng(0)
    clips = [g.integers(0, 255, (t, 32, 32, 3), dtype=np.uint8) for t in (9, 9, 9, 5)]
    batch = {"prompts": ["p0", "p1"], "labels": {"VQ": np.array([1.0, 0.0])}, "keys": ["k0", "k1"],
             "frames_a": clips[:2], "frames_b": clips[2:], "skipped": 1, "skip_reasons": {"decode": 1}}
    out = video_pair_batch(batch, {"VQ": 1.0}, 9, 16)
    assert out["captions"] == ["p0"] and out["short_dropped"] == 1
    assert out["skipped"] == 2 and out["skip_reasons"] == {"decode": 1, "short_clip": 1}
    assert batch["skip_reasons"] == {"decode": 1}  # the reader's batch is not changed in place
    whole = video_pair_batch({**batch, "frames_b": clips[2:3] * 2}, {"VQ": 1.0}, 9, 16)
    assert "skipped" not in whole and whole["short_dropped"] == 0  # nothing short: the reader's counts stand


def test_a_videoalign_row_with_missing_videos_is_counted_or_under_strict_an_error_naming_the_row(tmp_path, caplog):
    from mmalign.data import ConvertOptions, convert_videoalign
    from mmalign.data.convert import ConversionError
    from mmalign.toy.video import sample_clip
    from mmalign.toy.video_annotator import encode_mp4

    (tmp_path / "videos").mkdir()
    rng = np.random.default_rng(1)
    for name in ("0_A", "0_B", "1_A"):  # row 2's B video was never downloaded
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(encode_mp4(sample_clip(rng).render()))
    header = ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B"]
    rows = [[f"videos/{i}_A.mp4", f"videos/{i}_B.mp4", f"clip {i}", "A", "B", "same", 8, 9, 8, 9] for i in range(2)]
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])

    with pytest.raises(ConversionError, match=r"train.csv row 2: missing_file: .*videos/1_B.mp4"):
        convert_videoalign(tmp_path / "train.csv", tmp_path / "strict",
                           options=ConvertOptions(progress=False, strict=True))
    assert not (tmp_path / "strict" / "manifest.json").exists()
    with caplog.at_level("WARNING", logger="mmalign.data"):
        man = convert_videoalign(tmp_path / "train.csv", tmp_path / "out", options=ConvertOptions(progress=False))
    assert man.num_samples == 1 and man.conversion["counts"]["dropped_reasons"] == {"missing_file": 1}
    assert any("train.csv row 2" in r.getMessage() and "1_B.mp4" in r.getMessage() for r in caplog.records)
