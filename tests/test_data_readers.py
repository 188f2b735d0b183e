"""Readers: splitting across ranks and workers, shuffling, resume, resampling, bad samples, pair collation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from dist_helpers import torchrun2
import torch
from data_helpers import image_array, jpeg, solid_jpeg, write_pairs
from PIL import Image
from torch.utils.data import DataLoader

from mmalign.data import (
    CorruptSampleError, DataCursor, ImageTransforms, PairDataset, ShardSetWriter, collate_pairs, pair_sample,
)
from mmalign.data.transforms import sample_rng, to_pixel_values, transform_images


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


# ------------------------------------------------------------------------------------------------ splitting


@pytest.mark.parametrize("n, max_count, split", [(22, 3, "auto"), (7, 4, "auto"), (9, 2, "sample")],
                         ids=["shard-level (8 shards)", "sample-level (2 shards)", "forced sample-level"])
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, n, max_count, split):
    write_pairs(tmp_path, n, max_count=max_count)
    all_keys = [f"s-{i:05d}" for i in range(n)]
    seen: list[str] = []
    for rank in (0, 1):
        ds = PairDataset(tmp_path, rank=rank, world_size=2, shuffle=True, shuffle_buffer=3, seed=5, ties="keep",
                         decode_images=False, split=split)
        ds.set_epoch(3)
        got = keys_of(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_pairs))
        assert len(got) == len(ds)  # the manifest-based length is this rank's exact share
        seen += got
    assert sorted(seen) == all_keys


_RANK_SCRIPT = """
import json, sys
import torch
from torch.utils.data import DataLoader
from mmalign.data import PairDataset, collate_pairs

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
for split in ("auto", "sample"):
    ds = PairDataset(sys.argv[1], shuffle=True, shuffle_buffer=3, seed=5, ties="keep", decode_images=False,
                     split=split)
    ds.set_epoch(1)
    keys = [k for b in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_pairs) for k in b["keys"]]
    with open(f"{sys.argv[2]}/{split}-{rank}.json", "w") as fh:
        json.dump({"keys": keys, "len": len(ds), "world": torch.distributed.get_world_size()}, fh)
torch.distributed.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_torchrun_ranks_two_workers_see_every_sample_once(tmp_path):
    """The real thing: rank and world size from an initialised gloo process group under torchrun."""
    data = write_pairs(tmp_path / "data", 13, max_count=3)  # 5 shards: unequal shares per rank
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    torchrun2(tmp_path / "rank.py", data, tmp_path)
    for split in ("auto", "sample"):
        ranks = [json.loads((tmp_path / f"{split}-{r}.json").read_text()) for r in (0, 1)]
        assert [r["world"] for r in ranks] == [2, 2]
        assert [len(r["keys"]) for r in ranks] == [r["len"] for r in ranks]  # len() is the rank's exact share
        assert sorted(ranks[0]["keys"] + ranks[1]["keys"]) == [f"s-{i:05d}" for i in range(13)], split


def test_shuffle_is_seeded_per_epoch_and_length_needs_no_scan(tmp_path, monkeypatch):
    write_pairs(tmp_path, 12, max_count=3, tie_every=5)  # ties at 0, 5, 10

    def order(epoch, seed=0):
        ds = PairDataset(tmp_path, shuffle=True, shuffle_buffer=4, seed=seed, decode_images=False)
        ds.set_epoch(epoch)
        return [s["__key__"] for s in ds]

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=1)
    assert sorted(order(1)) == sorted(f"s-{i:05d}" for i in range(12) if i % 5)
    import mmalign.data.dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "read_shard", lambda *a: (_ for _ in ()).throw(AssertionError("scanned")))
    assert len(PairDataset(tmp_path)) == 9 and len(PairDataset(tmp_path, ties="keep")) == 12
    assert len(PairDataset(tmp_path, rank=1, world_size=2, ties="keep")) == 6


def test_resample_gives_fixed_epoch_length(tmp_path):
    write_pairs(tmp_path, 5, max_count=2)
    ds = PairDataset(tmp_path, resample=True, epoch_length=13, seed=1, ties="keep", decode_images=False)
    got = keys_of(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_pairs))
    assert len(got) == 13 == len(ds)
    assert set(got) <= {f"s-{i:05d}" for i in range(5)} and len(set(got)) < 13  # with replacement
    again = keys_of(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_pairs))
    assert sorted(again) == sorted(got)
    with pytest.raises(ValueError, match="resample"):
        PairDataset(tmp_path, epoch_length=3)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_mid_epoch_continues_exactly(tmp_path):
    write_pairs(tmp_path, 21, max_count=3)

    def make():
        ds = PairDataset(tmp_path, shuffle=True, shuffle_buffer=4, seed=3, ties="keep",
                         transforms=ImageTransforms(resolution=16, crop="random", random_flip=True))
        ds.set_epoch(2)
        return ds

    def loader(ds):
        return DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_pairs)

    full = list(loader(make()))
    cursor = DataCursor()
    for i, batch in enumerate(loader(make())):
        cursor.update(batch)
        if i == 2:  # an odd number of batches: the next batch comes from worker 1
            break
    state = json.loads(json.dumps(cursor.state_dict()))  # checkpoints store it as JSON
    resumed_ds = make()
    resumed_ds.load_state_dict(state)
    resumed = list(loader(resumed_ds))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[3:]]
    for a, b in zip(resumed, full[3:]):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])  # same random crops and flips
        assert a["crop_top_lefts"].tolist() == b["crop_top_lefts"].tolist()
    with pytest.raises(ValueError, match="num_workers"):
        again = make()
        again.load_state_dict(state)
        next(iter(DataLoader(again, batch_size=2, num_workers=0, collate_fn=collate_pairs)))


# ------------------------------------------------------------------------------------------------ bad samples


def _write_bad_shards(tmp_path):
    """Two bare shards (no manifest): a missing member, an undecodable image, a truncated tail."""
    from webdataset import TarWriter

    good = [pair_sample(f"g-{i}", jpeg(i), jpeg(i + 10), caption=f"c{i}", label_0=1) for i in range(6)]
    broken = dict(good[1], **{"0.jpg": jpeg(1)[:300]})
    missing = {k: v for k, v in good[3].items() if k != "1.jpg"}
    first = tmp_path / "a.tar"
    with TarWriter(str(first), encoder=False) as tw:
        for s in (good[0], broken, good[2], missing):
            tw.write(s)
    second = tmp_path / "b.tar"
    with TarWriter(str(second), encoder=False) as tw:
        for s in (good[4], good[5]):
            tw.write(s)
    import tarfile

    with tarfile.open(second) as tf:
        cut = tf.getmember("g-5.0.jpg").offset_data + 100
    second.write_bytes(second.read_bytes()[:cut])  # g-4 whole, g-5 cut inside its first image
    return [str(first), str(second)]


def test_corrupt_samples_are_skipped_counted_and_named(tmp_path, caplog):
    shards = _write_bad_shards(tmp_path)
    ds = PairDataset(shards, transforms=ImageTransforms(resolution=16))
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        batches = list(DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate_pairs))
    assert [k for b in batches for k in b["keys"]] == ["g-0", "g-2", "g-4"]
    assert sum(b["skipped"] for b in batches) == 2  # g-1, g-3; g-5 comes after the last sample
    assert ds.stats.skipped == 3 and dict(ds.stats.reasons) == {"decode": 1, "schema": 1, "unreadable": 1}
    text = caplog.text
    assert "'g-1' in a.tar" in text and "'g-3' in a.tar" in text and "missing member" in text
    assert "b.tar" in text and "g-5" in text
    cursor = DataCursor()
    for b in batches:
        cursor.update(b)
    assert cursor.skipped == 2 and cursor.skip_reasons == {"decode": 1, "schema": 1}  # g-5 is after the last sample

    with pytest.raises(CorruptSampleError, match="a.tar: sample 'g-1'"):
        list(PairDataset(shards, strict=True, transforms=ImageTransforms(resolution=16)))


def test_skip_counts_reach_the_trainer_through_worker_batches(tmp_path):
    shards = _write_bad_shards(tmp_path)
    ds = PairDataset(shards, decode_images=True)
    batches = list(DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_pairs))
    assert sorted(k for b in batches for k in b["keys"]) == ["g-0", "g-2", "g-4"]
    # workers split the 2 shards: worker 0 skips g-1 (before g-2, so in a batch) and g-3 (after its last sample),
    # worker 1 skips the cut tail of b.tar (after g-4); the dataset's shared counters see all three
    assert sum(b["skipped"] for b in batches) == 1
    assert ds.stats.skipped == 3 and ds.stats.reasons == {"decode": 1, "schema": 1, "unreadable": 1}


# ------------------------------------------------------------------------------------------------ collation


def test_pair_batch_is_winners_then_losers_with_the_winner_geometry(tmp_path):
    red, blue = solid_jpeg((250, 0, 0), size=(40, 56)), solid_jpeg((0, 0, 250), size=(48, 64))
    with ShardSetWriter(tmp_path, "pair") as w:
        w.write(pair_sample("a", red, blue, caption="0 wins", label_0=1))
        w.write(pair_sample("b", red, blue, caption="1 wins", label_0=0))
        w.write(pair_sample("c", red, blue, caption="tie", label_0=0.5))
    ds = PairDataset(tmp_path, transforms=ImageTransforms(resolution=32), ties="keep")
    batch = collate_pairs(list(ds))
    pv = batch["pixel_values"]
    assert pv.shape == (6, 3, 32, 32) and pv.min() >= -1 and pv.max() <= 1
    is_red = (pv[:, 0].mean((1, 2)) > 0.5).tolist()
    assert is_red == [True, False, True, False, True, False]  # winners a, b, c(tie: stored order); then losers
    assert batch["label"].tolist() == [1.0, 1.0, 0.5] and batch["winner_index"].tolist() == [0, 1, 0]
    assert batch["original_sizes"].tolist() == [[40, 56], [48, 64], [40, 56]]
    # center crop after a cover-resize to 32: 40x56 -> 32x45 (left 6), 48x64 -> 32x43 (left 6)
    assert batch["crop_top_lefts"].tolist() == [[0, 6], [0, 6], [0, 6]]
    assert len(list(PairDataset(tmp_path))) == 2  # ties dropped by default


def test_winner_and_loser_share_one_random_transform(tmp_path):
    arr = image_array(0, size=(40, 60))
    with ShardSetWriter(tmp_path, "pair") as w:
        for i in range(12):
            a = np.roll(arr, 5 * i, axis=1)
            w.write(pair_sample(f"k-{i:02d}", a, 255 - a, caption="c", label_0=float(i % 2)))
    cfg = ImageTransforms(resolution=24, crop="random", random_flip=True)
    ds = PairDataset(tmp_path, transforms=cfg, seed=4)
    batch = collate_pairs(list(ds))
    pv, b = batch["pixel_values"], 12
    # the loser is the inverted winner, so with one shared resize/flip/crop they sum to zero
    assert (pv[:b] + pv[b:]).abs().max() < 0.02
    tops, lefts = batch["crop_top_lefts"][:, 0], batch["crop_top_lefts"][:, 1]
    assert (tops == 0).all() and lefts.min() >= 0 and lefts.max() <= 36 - 24  # 40x60 covers 24x24 as 24x36
    assert len(set(map(tuple, batch["crop_top_lefts"].tolist()))) > 1  # random, not constant
    # the transform is a function of (seed, epoch, key): recompute sample k-03 by hand
    w3 = Image.fromarray(np.roll(arr, 15, axis=1))  # label_0 = 1: image 0 wins
    l3 = Image.fromarray(255 - np.roll(arr, 15, axis=1))
    ref, size, crop, _ = transform_images([w3, l3], cfg, sample_rng(4, 0, "k-03"))
    torch.testing.assert_close(pv[3], to_pixel_values(ref[0]))
    torch.testing.assert_close(pv[b + 3], to_pixel_values(ref[1]))
    assert tuple(batch["crop_top_lefts"][3].tolist()) == crop and size == (40, 60)


def test_uint8_batches_hold_the_same_pixels_in_less_memory(tmp_path):
    from functools import partial

    write_pairs(tmp_path, 6, max_count=3)
    ds = PairDataset(tmp_path, transforms=ImageTransforms(resolution=24, crop="random", random_flip=True), seed=2)
    (floats,) = DataLoader(ds, batch_size=6, num_workers=0, collate_fn=collate_pairs)
    (small,) = DataLoader(ds, batch_size=6, num_workers=1, collate_fn=partial(collate_pairs, pixels="uint8"))
    assert "pixel_values" not in small and small["pixels"].dtype == torch.uint8
    assert small["pixels"].shape == (12, 24, 24, 3) and small["keys"] == floats["keys"]
    torch.testing.assert_close(to_pixel_values(small["pixels"]), floats["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(small["crop_top_lefts"], floats["crop_top_lefts"])
    with pytest.raises(ValueError, match="pixels must be 'float' or 'uint8'"):
        collate_pairs(list(ds), pixels="half")


def test_reading_without_manifest_and_schema_mismatch(tmp_path):
    write_pairs(tmp_path / "set", 3)
    from mmalign.data import ManifestError, RankedDataset

    with pytest.raises(ManifestError, match="'pair' shards"):
        RankedDataset(tmp_path / "set")
    bare = PairDataset(str(tmp_path / "set" / "shard-{000000..000000}.tar"), ties="keep", decode_images=False)
    assert len(list(bare)) == 3
    with pytest.raises(TypeError, match="without a manifest"):
        len(bare)
    with pytest.raises(ManifestError, match="no such shard file or shard-set folder"):
        PairDataset(tmp_path / "typo")


def test_jpeg_draft_is_opt_in_and_close_to_full_decode(tmp_path):
    big = image_array(1, size=(256, 384))
    with ShardSetWriter(tmp_path, "pair") as w:
        w.write(pair_sample("x", big, jpeg(2, size=(256, 384)), caption="c", label_0=0))
    full = collate_pairs(list(PairDataset(tmp_path, transforms={"resolution": 64})))
    fast = collate_pairs(list(PairDataset(tmp_path, transforms={"resolution": 64, "jpeg_draft": True})))
    assert full["original_sizes"].tolist() == fast["original_sizes"].tolist() == [[256, 384]]
    assert (full["pixel_values"] - fast["pixel_values"]).abs().mean() < 0.05
    assert not torch.equal(full["pixel_values"][0], fast["pixel_values"][0])  # the JPEG winner took the fast path


@pytest.mark.parametrize("inline_bytes", [1 << 20, 64], ids=["all inline", "pixels through shared memory"])
def test_training_stream_with_workers_gives_the_dataloaders_batches(tmp_path, monkeypatch, inline_bytes):
    """`endless_batches` with workers sends small tensors pickled inline (no shared-memory segment each) and gives
    back exactly the batches a plain DataLoader gives: same order, same tensors, dtypes and shapes."""
    from functools import partial

    from mmalign.train import data as train_data

    monkeypatch.setattr(train_data, "INLINE_BYTES", inline_bytes)
    write_pairs(tmp_path, 12, max_count=3)
    kw = dict(transforms={"resolution": 16, "crop": "random", "random_flip": True}, shuffle=True, seed=3)
    collate = partial(collate_pairs, pixels="uint8")
    stream = train_data.endless_batches(PairDataset(tmp_path, **kw), collate, 2, num_workers=2)
    got = [next(stream) for _ in range(6)]  # one epoch
    ds = PairDataset(tmp_path, **kw)
    ds.set_epoch(0)
    expected = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate, drop_last=True))
    assert len(expected) == 6
    for a, b in zip(got, expected):
        assert a.pop("epoch") == 0 and a.keys() == b.keys()
        for name, value in b.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(a[name], torch.Tensor) and a[name].dtype == value.dtype, name
                assert torch.equal(a[name], value), name
            else:
                assert a[name] == value, name
    assert got[0]["pixels"].shape == (4, 16, 16, 3)


def test_video_to_tensor_keeps_the_first_frames_resizes_the_shorter_side_and_crops_the_centre():
    """The flow task's video pairs: (T, H, W, 3) uint8 -> (3, F, R, R) in [-1, 1], exact against hand-built crops."""
    import torch.nn.functional as F

    from mmalign.data.transforms import video_to_tensor

    # Height already 16: no resize, only the centre crop; column j holds the value j, frame t the value 100 + t.
    t, h, w = np.arange(11)[:, None, None], np.arange(16)[None, :, None], np.arange(40)[None, None, :]
    clip = np.stack(np.broadcast_arrays(100 + t, h, w + 0 * t), axis=-1).astype(np.uint8)  # (11, 16, 40, 3)
    out = video_to_tensor(torch.from_numpy(clip), 9, 16)
    assert out.shape == (3, 9, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()
    expect = torch.from_numpy(clip[:9, :, 12:28]).permute(3, 0, 1, 2).float() / 127.5 - 1  # left = (40 - 16) // 2
    assert torch.equal(out, expect)
    # Resized: a random 24x40 clip -> shorter side 16 (16x27, antialiased bilinear per frame), centre 16 columns.
    clip = np.random.default_rng(0).integers(0, 256, (11, 24, 40, 3), dtype=np.uint8)
    frames = torch.from_numpy(clip[:9]).permute(0, 3, 1, 2).float() / 127.5 - 1
    resized = F.interpolate(frames, size=(16, 27), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(video_to_tensor(clip, 9, 16), resized[..., 5:21].permute(1, 0, 2, 3), rtol=0, atol=0)
    white = video_to_tensor(np.full((9, 20, 20, 3), 255, np.uint8), 9, 8)  # 255 -> 1, also after resizing
    torch.testing.assert_close(white, torch.ones(3, 9, 8, 8), rtol=0, atol=1e-6)
