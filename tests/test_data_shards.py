"""Shard schemas, writing, manifests, validation, safety, caches and video decoding."""

from __future__ import annotations

import io
import json
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import image_array, jpeg, mp4, png, tar_members, wav, write_pairs
from PIL import Image

from mmalign.cli import main as cli_main
from mmalign.data import (
    CacheWriter, ManifestError, MusicPairDataset, PairDataset, RankedDataset, SampleError, ShardSetWriter,
    StaleCacheError, UnsafeSourceError, VideoPairDataset, VLMPairDataset, collate_music_pairs, collate_pairs,
    collate_ranked, collate_video_pairs, collate_vlm_pairs, load_manifest, music_pair_sample, pair_sample,
    ranked_sample, read_frames, sanitize_key, validate_shards, video_pair_sample, vlm_pair_sample, winners_losers,
)
from mmalign.data.schemas import check_key
from mmalign.data.transforms import to_pixel_values
from mmalign.data.video import sample_indices


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------------------ round trips


def test_pair_round_trip_keeps_original_bytes_and_metadata(tmp_path):
    originals = {i: (jpeg(i), png(100 + i)) for i in range(3)}
    with ShardSetWriter(tmp_path, "pair") as w:
        for i, (a, b) in originals.items():
            w.write(pair_sample(f"p-{i}", a, b, caption=f"cap {i}", label_0=[1, 0, 0.5][i],
                                provenance={"dataset": "d", "ids": {"row": i}, "generators": ["g0", "g1"]}))
    members = tar_members(tmp_path / "shard-000000.tar")
    assert sorted(members) == sorted(f"p-{i}.{s}" for i in range(3) for s in ("0.jpg", "1.png", "json"))
    for i, (a, b) in originals.items():
        assert members[f"p-{i}.0.jpg"] == a and members[f"p-{i}.1.png"] == b  # never re-encoded
    samples = list(PairDataset(tmp_path, ties="keep"))
    assert [s["__key__"] for s in samples] == ["p-0", "p-1", "p-2"]
    assert [s["label_0"] for s in samples] == [1.0, 0.0, 0.5]
    assert samples[1]["provenance"] == {"dataset": "d", "ids": {"row": 1}, "generators": ["g0", "g1"]}
    np.testing.assert_array_equal(np.asarray(samples[2]["images"][0]), decoded(originals[2][0]))
    np.testing.assert_array_equal(np.asarray(samples[2]["images"][1]), decoded(originals[2][1]))
    man = load_manifest(tmp_path)
    assert (man.schema_name, man.schema_version, man.num_samples, man.shards[0].ties) == ("pair", 1, 3, 1)


def test_ranked_round_trip_and_collate(tmp_path):
    with ShardSetWriter(tmp_path, "ranked") as w:
        for i in range(4):
            w.write(ranked_sample(f"r-{i}", [jpeg(10 * i + k) for k in range(3)], caption=f"c{i}",
                                  scores=[0.1 * i, 0.5, -1.0], scorers=["pickscore"]))
    ds = RankedDataset(tmp_path, transforms={"resolution": 16})
    batch = collate_ranked(list(ds))
    assert batch["pixel_values"].shape == (4, 3, 3, 16, 16)
    small = collate_ranked(list(ds), pixels="uint8")
    assert small["pixels"].shape == (4, 3, 16, 16, 3) and small["pixels"].dtype == torch.uint8
    torch.testing.assert_close(to_pixel_values(small["pixels"]), batch["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(batch["scores"][2], torch.tensor([0.2, 0.5, -1.0]))
    assert batch["scorers"][0] == ["pickscore"] and batch["original_sizes"].tolist()[0] == [48, 64]
    with pytest.raises(SampleError, match="3 images but 2 scores"):
        ranked_sample("x", [jpeg(0), jpeg(1), jpeg(2)], caption="c", scores=[1, 2])


def test_video_pair_round_trip(tmp_path):
    va, vb = mp4(6, fps=6, seed=0), mp4(8, fps=8, seed=50)
    with ShardSetWriter(tmp_path, "video_pair") as w:
        w.write(video_pair_sample("v-0", va, vb, prompt="a cat", labels={"VQ": "A", "MQ": "same", "TA": "B"},
                                  fps_a=6, fps_b=8, num_frames_a=6, num_frames_b=8))
    (raw,) = list(VideoPairDataset(tmp_path))
    assert raw["video_a"] == va and raw["video_b"] == vb and raw["labels"]["MQ"] == "same"
    (dec,) = list(VideoPairDataset(tmp_path, frames={"max_frames": 3}))
    assert dec["frames_a"].shape == (3, 24, 32, 3) and dec["frames_a"].dtype == torch.uint8
    batch = collate_video_pairs([dec])
    assert batch["labels"]["VQ"].tolist() == [1.0] and batch["labels"]["MQ"].tolist() == [0.5]
    assert batch["labels"]["TA"].tolist() == [0.0] and batch["num_frames"].tolist() == [[6, 8]]
    assert validate_shards(tmp_path).ok


def test_vlm_pair_round_trip(tmp_path):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    with ShardSetWriter(tmp_path, "vlm_pair") as w:
        w.write(vlm_pair_sample("m-0", [jpeg(1), png(2)], prompt=prompt, chosen="A dog.", rejected="A cat.",
                                rejected_images=[jpeg(3)],
                                provenance={"origin": "self", "generator": "llava", "corruption": "blur",
                                            "similarity": 0.7}))
    (s,) = list(VLMPairDataset(tmp_path))
    assert s["prompt"] == prompt and (s["chosen"], s["rejected"]) == ("A dog.", "A cat.")
    assert len(s["images"]) == 2 and len(s["rejected_images"]) == 1
    assert s["provenance"]["similarity"] == 0.7
    batch = collate_vlm_pairs([s])
    assert batch["chosen"] == ["A dog."] and batch["images"][0][1].size == (64, 48)
    with pytest.raises(SampleError, match="origin is required"):
        vlm_pair_sample("m-1", [jpeg(1)], prompt="hi", chosen="a", rejected="b")


def test_music_pair_round_trip_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    codes = [(rng.integers(0, 2048, (4, 10)), rng.integers(0, 2048, (4, 12))) for _ in range(2)]
    with ShardSetWriter(tmp_path, "music_pair") as w:
        for i, (c, r) in enumerate(codes):
            w.write(music_pair_sample(f"mu-{i}", c, r, prompt=f"jazz {i}", chosen_audio=wav() if i == 0 else None))
    samples = list(MusicPairDataset(tmp_path))
    assert samples[0]["chosen_audio"] == wav() and samples[1]["chosen_audio"] is None
    batch = collate_music_pairs(samples, pad_value=2048)
    assert batch["codes"].shape == (4, 4, 12)
    torch.testing.assert_close(batch["codes"][1, :, :10], torch.from_numpy(codes[1][0]))  # chosen rows first
    torch.testing.assert_close(batch["codes"][3], torch.from_numpy(codes[1][1]))
    assert (batch["codes"][0, :, 10:] == 2048).all() and batch["lengths"].tolist() == [10, 10, 12, 12]
    assert validate_shards(tmp_path).ok


# ------------------------------------------------------------------------------------------------ writer rules


def test_keys_must_be_sortable_and_dotless(tmp_path):
    assert sanitize_key("train-00001.of.parquet") == "train_00001_of_parquet"
    with pytest.raises(SampleError, match="no dots"):
        check_key("a.b")
    with ShardSetWriter(tmp_path, "pair") as w:
        w.write(pair_sample("b", jpeg(0), jpeg(1), caption="c", label_0=1))
        with pytest.raises(ValueError, match="strictly increase"):
            w.write(pair_sample("a", jpeg(0), jpeg(1), caption="c", label_0=1))
    with pytest.raises(SampleError, match="label_0 must be 0"):
        pair_sample("c", jpeg(0), jpeg(1), caption="c", label_0=0.3)


def test_shards_roll_over_by_count_and_bytes(tmp_path):
    big = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(8)]
    with ShardSetWriter(tmp_path, "pair", max_count=3, max_bytes="40kB") as w:
        for i in range(8):
            w.write(pair_sample(f"k-{i}", big[i], big[(i + 1) % 8], caption="c", label_0=1))
    man = load_manifest(tmp_path)
    assert sum(s.count for s in man.shards) == 8
    assert all(s.count <= 3 for s in man.shards)
    assert all(s.bytes <= 40_000 or s.count == 1 for s in man.shards)
    assert len(man.shards) > 8 // 3  # the byte limit, not only the count, split shards


def test_interrupted_write_leaves_no_manifest_and_rerun_is_clean(tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    write_pairs(clean, 7, max_count=2)

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted):
        with ShardSetWriter(out, "pair", max_count=2) as w:
            for i in range(7):
                if i == 5:
                    raise Interrupted
                w.write(pair_sample(f"s-{i:05d}", jpeg(2 * i), png(2 * i + 1), caption=f"caption {i}",
                                    label_0=1.0 if i % 2 == 0 else 0.0, provenance={"dataset": "test",
                                                                                    "ids": {"i": i}}))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar"]  # finished shards only; no tmp, no manifest
    with pytest.raises(ManifestError, match="did not finish"):
        PairDataset(out)

    # a process killed in the middle of a shard leaves its temporary file behind
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from data_helpers import jpeg, png
from mmalign.data import ShardSetWriter, pair_sample
w = ShardSetWriter({str(out)!r}, "pair", max_count=2)
for i in range(7):
    if i == 5:  # shard 2 holds s-00004 and is open
        os.kill(os.getpid(), signal.SIGKILL)
    w.write(pair_sample(f"s-{{i:05d}}", jpeg(2 * i), png(2 * i + 1), caption=f"caption {{i}}",
                        label_0=1.0 if i % 2 == 0 else 0.0, provenance={{"dataset": "test", "ids": {{"i": i}}}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    names = sorted(p.name for p in out.iterdir())
    assert names == [".shard-000002.tar.tmp", "shard-000000.tar", "shard-000001.tar"]
    assert cli_main(["shards", "validate", str(out)]) == 1
    (out / "shard-000009.tar").write_bytes(b"stale")
    write_pairs(out, 7, max_count=2)  # re-running starts cleanly
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for p in clean.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardSetWriter(out, "pair")


# ------------------------------------------------------------------------------------------------ tar reading


def _tar_bytes(members: list[tuple[str, bytes | None]], fmt: int, mode: str = "w") -> bytes:
    """A tar made by Python's tarfile: (name, data) regular files, (name, None) directories, plus a symlink (with
    a long target, GNU writes a `K` header and PAX an extended header the reader must skip)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "x" * (50 if fmt == tarfile.USTAR_FORMAT else 150)
        tf.addfile(link)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_tar_reader_reads_what_tarfile_writes(fmt, compression):
    from mmalign.data.tario import iter_members

    long_dir = "d" * 90 + "/" + "e" * 60  # ustar stores it as prefix + name
    members = [("k-0.json", b"{}"), ("dir", None), ("k-0.0.jpg", jpeg(0)), ("k-1.empty", b""),
               ("k-1.block", b"b" * 512), ("k-1.odd", b"o" * 513), ("__meta__", b"skipped"),
               (f"{long_dir}.jpg", b"long path"), ("caf\u00e9-2.txt", "é".encode())]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("k" * 120 + ".txt", b"a name longer than 100 bytes"))
    data = _tar_bytes(members, fmt, f"w:{compression}" if compression else "w")
    got = list(iter_members(io.BytesIO(data)))
    expected = [(n, d) for n, d in members if d is not None and n != "__meta__"]
    assert got == expected
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # and it agrees with tarfile
        assert [m.name for m in tf.getmembers() if m.isreg() and m.name != "__meta__"] == [n for n, _ in got]


def test_tar_reader_reports_corruption_and_truncation():
    from mmalign.data.tario import iter_members, iter_samples

    data = _tar_bytes([("k-0.json", b"{}"), ("k-0.0.jpg", b"j" * 700), ("k-1.json", b"{}")], tarfile.PAX_FORMAT)
    second = 512 + 512  # header of k-0.0.jpg: after k-0.json's header and its one data block

    def error(raw: bytes) -> str:
        records = list(iter_samples(io.BytesIO(raw), "s.tar"))
        return records[-1].get("__error__", "")

    bad = bytearray(data)
    bad[second + 10] ^= 0x01  # a name byte: only the checksum can tell
    assert "checksum" in error(bytes(bad)) and "after key 'k-0'" in error(bytes(bad))
    assert "while reading member 'k-0.0.jpg': truncated: 300 of 700" in error(data[: second + 512 + 300])
    cut_at_boundary = data[: second + 512 + 1024 + 512 + 512]  # every member whole, end-of-archive blocks gone
    assert [n for n, _ in iter_members(io.BytesIO(data))] == ["k-0.json", "k-0.0.jpg", "k-1.json"]
    assert "end-of-archive" in error(cut_at_boundary)
    assert "truncated header" in error(data[: second + 100])
    assert "checksum" in error(b"this is not a tar file".ljust(2048, b"\0"))


# ------------------------------------------------------------------------------------------------ validation


def test_validate_reports_shard_key_reason_and_exit_code(tmp_path, capsys):
    good = write_pairs(tmp_path / "good", 5, max_count=2)
    assert cli_main(["shards", "validate", str(good)]) == 0
    assert "OK" in capsys.readouterr().out

    bad = tmp_path / "bad"
    broken = jpeg(7)[: len(jpeg(7)) // 2]  # header intact, pixels missing: passes the writer, fails decoding
    with ShardSetWriter(bad, "pair", max_count=2) as w:
        for i in range(4):
            w.write(pair_sample(f"b-{i}", broken if i == 2 else jpeg(i), jpeg(9), caption="c", label_0=1))
    shard = bad / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside b-0's first image: the checksum must catch it
    shard.write_bytes(bytes(data))
    assert cli_main(["shards", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar\tb-2\t0.jpg: image does not decode" in out
    assert "shard-000000.tar\t-\tsha256" in out
    assert "2 shard(s), 4 sample(s)" in out


def test_validate_flags_unknown_members_and_nothing_is_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shard = tmp_path / "evil.tar"
    from webdataset import TarWriter

    sample = pair_sample("e-0", jpeg(0), jpeg(1), caption="c", label_0=1)
    sample.update({"x.pyd": pickle.dumps(Exploit()), "y.pickle": pickle.dumps(Exploit())})
    with TarWriter(str(shard), encoder=False) as tw:
        tw.write(sample)
    (s,) = list(PairDataset(str(shard)))  # a shard list (no manifest): schema from the reader
    assert s["caption"] == "c" and not marker.exists()
    man_dir = tmp_path / "set"
    man_dir.mkdir()
    (man_dir / "evil.tar").write_bytes(shard.read_bytes())
    ok = write_pairs(tmp_path / "ok", 1)
    manifest = json.loads((ok / "manifest.json").read_text())
    manifest["shards"][0].update(name="evil.tar", bytes=shard.stat().st_size)
    (man_dir / "manifest.json").write_text(json.dumps(manifest))
    report = validate_shards(man_dir)
    assert any("unexpected members ['x.pyd', 'y.pickle']" in i.reason for i in report.issues)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ safety


def test_pipe_and_network_urls_are_refused_unless_allowed(tmp_path):
    write_pairs(tmp_path, 3, max_count=10)
    shard = tmp_path / "shard-000000.tar"
    with pytest.raises(UnsafeSourceError, match="pipe"):
        PairDataset(f"pipe:cat {shard}")
    with pytest.raises(UnsafeSourceError, match="network"):
        PairDataset("https://example.org/shards/shard-{000000..000003}.tar")
    with pytest.raises(UnsafeSourceError, match="network"):
        PairDataset("s3://bucket/manifest.json")
    allowed = PairDataset(f"pipe:cat {shard}", allow_pipe=True, ties="keep", decode_images=False)
    assert [s["__key__"] for s in allowed] == ["s-00000", "s-00001", "s-00002"]


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "pipe:touch x", "sub/../../x.tar"])
def test_manifest_paths_escaping_the_folder_are_refused(tmp_path, name):
    write_pairs(tmp_path, 1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeSourceError):
        PairDataset(tmp_path)
    assert not validate_shards(tmp_path).ok


# ------------------------------------------------------------------------------------------------ caches


def test_cache_keyed_by_producer_and_parent_shards(tmp_path):
    write_pairs(tmp_path, 6, max_count=4, tie_every=0)
    producer = {"model": "vae-tiny", "revision": "abc", "resolution": 16, "crop": "center"}
    with CacheWriter(tmp_path, "latents", producer) as cw:  # entries arrive in any order, as from workers
        for s in reversed(list(PairDataset(tmp_path, decode_images=False))):
            i = int(s["__key__"].split("-")[1])
            cw.add(s["__shard__"], s["__key__"], np.stack([np.full((4, 2, 2), i, np.float32),
                                                           np.full((4, 2, 2), -i, np.float32)]))
    ds = PairDataset(tmp_path, decode_images=False, caches={"latents": producer})
    batch = collate_pairs(list(ds)[:3])
    assert batch["cache"]["latents"].shape == (3, 2, 4, 2, 2)
    ordered = winners_losers(batch["cache"]["latents"], batch["winner_index"])
    # sample i: label_0 = 1 for even i (image 0, value i, wins), 0 for odd i (image 1, value -i, wins)
    assert ordered[:3, 0, 0, 0].tolist() == [0.0, -1.0, 2.0] and ordered[3:, 0, 0, 0].tolist() == [-0.0, 1.0, -2.0]

    with pytest.raises(StaleCacheError, match="resolution: 1024"):
        PairDataset(tmp_path, caches={"latents": {**producer, "resolution": 1024}})
    partial = CacheWriter(tmp_path, "text", {"model": "clip"})
    partial.add("shard-000000.tar", "s-00000", np.zeros(3))
    with pytest.raises(ValueError, match="incomplete"):
        partial.close()
    with pytest.raises(StaleCacheError):
        PairDataset(tmp_path, caches={"text": {"model": "clip"}})
    write_pairs(tmp_path, 6, max_count=4, start=1)  # the data changed under the cache
    with pytest.raises(StaleCacheError, match="different shards"):
        PairDataset(tmp_path, caches={"latents": producer})


def test_cache_safetensors_dict_values(tmp_path):
    write_pairs(tmp_path, 2, max_count=4)
    producer = {"model": "t5", "max_length": 8}
    with CacheWriter(tmp_path, "text_embeds", producer, storage="safetensors") as cw:
        for i in range(2):
            cw.add("shard-000000.tar", f"s-{i:05d}", {"embeds": torch.full((8, 4), float(i), dtype=torch.bfloat16),
                                                      "mask": torch.ones(8, dtype=torch.bool)})
    ds = PairDataset(tmp_path, decode_images=False, caches={"text_embeds": producer})
    batch = collate_pairs(list(ds))
    assert batch["cache"]["text_embeds"]["embeds"].dtype == torch.bfloat16
    assert batch["cache"]["text_embeds"]["embeds"][:, 0, 0].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ video


def test_read_frames_uniform_sampling_fps_and_pixels(tmp_path):
    data = mp4(16, fps=8, size=(24, 32))
    (tmp_path / "v.mp4").write_bytes(data)
    every = read_frames(data)
    assert every.shape == (16, 24, 32, 3) and every.dtype == torch.uint8
    means = every.float().mean(dim=(1, 2, 3))
    half = read_frames(tmp_path / "v.mp4", fps=4)
    torch.testing.assert_close(half.float().mean(dim=(1, 2, 3)), means[::2], atol=1.0, rtol=0)
    four = read_frames(data, max_frames=4, backend="pyav")
    torch.testing.assert_close(four.float().mean(dim=(1, 2, 3)), means[[0, 5, 10, 15]], atol=1.0, rtol=0)
    small = read_frames(data, max_frames=2, max_pixels=200)
    assert small.shape[0] == 2 and small.shape[1] * small.shape[2] <= 200 and small.shape[3] == 3
    assert sample_indices(10, 10.0, fps=5) == [0, 2, 4, 6, 8]
    assert sample_indices(10, 10.0, max_frames=3) == [0, 4, 9]
    with pytest.raises(ValueError, match="backend"):
        read_frames(data, backend="cv2")


def test_info_command_prints_manifest_summary(tmp_path, capsys):
    write_pairs(tmp_path, 5, max_count=2, tie_every=4)
    assert cli_main(["shards", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "schema pair v1, 5 samples, 3 shard(s)" in out and "ties (label_0 = 0.5): 2" in out
    assert cli_main(["shards", "info", str(tmp_path / "missing")]) == 1


def test_image_arrays_and_pil_images_are_stored_losslessly(tmp_path):
    arr = image_array(3)
    with ShardSetWriter(tmp_path, "pair") as w:
        w.write(pair_sample("a", arr, Image.fromarray(arr), caption="c", label_0=1))
    members = tar_members(tmp_path / "shard-000000.tar")
    np.testing.assert_array_equal(decoded(members["a.0.png"]), arr)
    np.testing.assert_array_equal(decoded(members["a.1.png"]), arr)
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        info = tf.getmember("a.json")
    assert (info.mtime, info.uname, info.mode) == (0, "mmalign", 0o444)
