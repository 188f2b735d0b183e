"""Converters from public formats, through the library and the `mmalign shards convert` command."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest
from data_helpers import jpeg, mp4, pickapic_rows, png, tar_members, write_jsonl, write_pickapic_parquet

from mmalign.cli import main as cli_main
from mmalign.data.convert import _pickapic_sample
from mmalign.data import (
    ConversionError, ConvertOptions, ManifestError, PairDataset, RankedDataset, ShardSetWriter, UnsafeSourceError,
    VideoPairDataset, VLMPairDataset, collate_pairs, convert_hpdv2, convert_jsonl, convert_pickapic, convert_trl,
    convert_videoalign, load_manifest, validate_shards,
)


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """Two Pick-a-Pic-style parquet files: 10 + 4 rows, ties at rows 2 and 5, unlabeled rows 3 and 8."""
    d = tmp_path_factory.mktemp("pickapic")
    rows = pickapic_rows(10, ties=(2, 5), unlabeled=(3, 8))
    rows[6]["jpg_1"] = png(99)  # the format follows the bytes, not the column name
    write_pickapic_parquet(d / "train-00000-of-00002.parquet", rows)
    write_pickapic_parquet(d / "train-00001-of-00002.parquet", pickapic_rows(4, seed=500))
    return d, rows


def test_pickapic_drop_ties_counts_and_original_bytes(pickapic, tmp_path, capsys):
    src, rows = pickapic
    out = tmp_path / "out"
    code = cli_main(["shards", "convert", "--from", "pickapic", str(src), "--out", str(out), "--max-count", "4",
                     "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "14 rows read, 10 kept, 4 dropped (tie 2, unlabeled 2)" in printed and "2 seen, 2 dropped" in printed
    man = load_manifest(out)
    counts = man.conversion["counts"]
    assert (counts["rows"], counts["kept"], counts["dropped"], counts["ties"]) == (14, 10, 4, 2)
    assert counts["dropped_reasons"] == {"tie": 2, "unlabeled": 2} and man.conversion["options"]["ties"] == "drop"
    assert man.num_samples == 10 and [s.count for s in man.shards] == [4, 4, 2]
    samples = list(PairDataset(out, decode_images=False))
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and keys[0] == "train_00000_of_00002-000000000"
    by_row = {int(k.split("-")[1]): s for k, s in zip(keys, samples) if k.startswith("train_00000")}
    assert sorted(by_row) == [0, 1, 4, 6, 7, 9]
    assert [by_row[r]["label_0"] for r in (0, 1, 6, 7)] == [1.0, 0.0, 1.0, 0.0]
    prov = by_row[7]["provenance"]
    assert prov["generators"] == ["sdxl", "sd21"] and prov["ids"]["ranking_id"] == 1007
    first, second = tar_members(out / "shard-000000.tar"), tar_members(out / "shard-000001.tar")
    assert first["train_00000_of_00002-000000006.1.png"] == rows[6]["jpg_1"]  # rows 0, 1, 4, 6
    assert second["train_00000_of_00002-000000007.0.jpg"] == rows[7]["jpg_0"]  # rows 7, 9, next file's 0, 1
    assert validate_shards(out).ok


@pytest.mark.parametrize("policy", ["keep", "coin"])
def test_pickapic_tie_policies(pickapic, tmp_path, policy):
    src, _ = pickapic
    out = tmp_path / "out"
    man = convert_pickapic([src / "train-00000-of-00002.parquet"], out,
                           options=ConvertOptions(ties=policy, seed=3, progress=False))
    counts = man.conversion["counts"]
    assert (counts["kept"], counts["ties"], counts["dropped_reasons"]) == (8, 2, {"unlabeled": 2})
    labels = {s["__key__"][-2:]: s["label_0"] for s in PairDataset(out, ties="keep", decode_images=False)}
    if policy == "keep":
        assert counts["ties_kept"] == 2 and labels["02"] == labels["05"] == 0.5
        assert sum(s.ties for s in man.shards) == 2
        batch = collate_pairs(list(PairDataset(out, ties="keep", decode_images=False)))
        assert batch["label"].tolist().count(0.5) == 2
        assert len(PairDataset(out)) == 6  # the reader drops kept ties unless asked for them
    else:
        assert counts["ties_coin"] == 2 and {labels["02"], labels["05"]} <= {0.0, 1.0}
        assert sum(s.ties for s in man.shards) == 0
        again = tmp_path / "again"
        convert_pickapic([src / "train-00000-of-00002.parquet"], again,
                         options=ConvertOptions(ties="coin", seed=3, progress=False))
        assert (again / "shard-000000.tar").read_bytes() == (out / "shard-000000.tar").read_bytes()


def test_conversion_is_deterministic(pickapic, tmp_path):
    src, _ = pickapic
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        convert_pickapic([src], out, options=ConvertOptions(max_count=3, progress=False))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "manifest.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_pickapic_rejects_wrong_columns_and_existing_output(pickapic, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"x"]}), bad)
    with pytest.raises(ConversionError, match=r"bad.parquet: not a Pick-a-Pic parquet: missing columns \['jpg_1'"):
        convert_pickapic([bad], tmp_path / "o1")
    src, _ = pickapic
    out = tmp_path / "o2"
    convert_pickapic([src], out, options=ConvertOptions(progress=False, limit=3))
    assert load_manifest(out).conversion["counts"]["rows"] == 3
    assert cli_main(["shards", "convert", "--from", "pickapic", str(src), "--out", str(out), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["shards", "convert", "--from", "pickapic", str(src), "--out", str(out), "--overwrite",
                     "--no-progress"]) == 0


def test_hpdv2_pairs_and_ranked(tmp_path):
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    for i in range(7):
        (root / "train" / f"{i:08d}.jpg").write_bytes(jpeg(i))
    entries = [
        {"prompt": "p0", "file_path": ["train/00000000.jpg", "train/00000001.jpg"], "human_preference": [0, 1],
         "user_hash": "u0"},
        {"prompt": "p1", "file_path": ["train/00000002.jpg", "train/00000003.jpg"], "human_preference": [1, 0]},
        {"prompt": "p2", "file_path": ["train/00000004.jpg", "train/00000005.jpg"], "human_preference": [1, 1]},
        {"prompt": "p3", "file_path": ["train/00000004.jpg", "train/00000005.jpg", "train/00000006.jpg"],
         "human_preference": [0, 1, 0]},
        {"prompt": "p4", "file_path": ["train/missing.jpg", "train/00000001.jpg"], "human_preference": [1, 0]},
    ]
    js = tmp_path / "train.json"
    js.write_text(json.dumps(entries))
    man = convert_hpdv2(js, tmp_path / "pairs", image_root=root, options=ConvertOptions(progress=False))
    assert man.conversion["counts"]["dropped_reasons"] == {"missing_file": 1, "not_a_pair": 1, "tie": 1}
    got = list(PairDataset(tmp_path / "pairs", decode_images=False))
    assert [(s["caption"], s["label_0"]) for s in got] == [("p0", 0.0), ("p1", 1.0)]
    assert got[0]["provenance"]["ids"]["user_hash"] == "u0"
    ranked = convert_hpdv2(js, tmp_path / "ranked", image_root=root, schema="ranked",
                           options=ConvertOptions(progress=False))
    assert ranked.num_samples == 4
    r = [s for s in RankedDataset(tmp_path / "ranked", decode_images=False) if s["caption"] == "p3"][0]
    assert r["scores"].tolist() == [0.0, 1.0, 0.0] and r["scorers"] == ["human"]


def test_jsonl_manifest_and_path_escape_refusal(tmp_path):
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    for i in range(4):
        (d / "img" / f"{i}.png").write_bytes(png(i))
    write_jsonl(d / "pairs.jsonl", [
        {"caption": "a", "images": ["img/0.png", "img/1.png"], "label_0": 1, "provenance": {"dataset": "mine"}},
        {"caption": "b", "images": ["img/2.png", "img/3.png"], "label_0": 0},
    ])
    man = convert_jsonl(d / "pairs.jsonl", tmp_path / "o", options=ConvertOptions(progress=False))
    assert man.schema_name == "pair" and man.num_samples == 2
    write_jsonl(d / "ranked.jsonl", [{"caption": "r", "images": [f"img/{i}.png" for i in range(4)],
                                      "scores": [1, 4, 2, 3], "scorers": ["hps"]}])
    assert cli_main(["shards", "convert", "--from", "jsonl", str(d / "ranked.jsonl"), "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 0
    assert load_manifest(tmp_path / "r").schema_name == "ranked"

    (tmp_path / "secret.png").write_bytes(png(9))
    for bad in ("../secret.png", str(tmp_path / "secret.png")):
        write_jsonl(d / "evil.jsonl", [{"caption": "x", "images": ["img/0.png", bad], "label_0": 1}])
        with pytest.raises(UnsafeSourceError, match="escapes its base folder|not a relative path"):
            convert_jsonl(d / "evil.jsonl", tmp_path / "evil", options=ConvertOptions(progress=False))
        assert not (tmp_path / "evil" / "manifest.json").exists()


def test_videoalign_csv(tmp_path):
    (tmp_path / "videos").mkdir()
    for i in range(3):
        (tmp_path / "videos" / f"{i}_A.mp4").write_bytes(mp4(4, fps=4, seed=i))
        (tmp_path / "videos" / f"{i}_B.mp4").write_bytes(mp4(6, fps=6, seed=100 + i))
    header = ["path_A", "path_B", "A_model", "B_model", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A",
              "fps_B", "num_frames_B"]
    rows = [[f"./videos/{i}_A.mp4", f"./videos/{i}_B.mp4", "wan", "ltx", f"prompt {i}",
             ["A", "B", "same"][i], "same", "Tie" if i == 2 else "A", 4, 4, 6.0, 6] for i in range(3)]
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    man = convert_videoalign(tmp_path / "train.csv", tmp_path / "out", options=ConvertOptions(progress=False))
    assert man.num_samples == 2 and man.conversion["counts"]["dropped_reasons"] == {"bad_label": 1}
    samples = list(VideoPairDataset(tmp_path / "out"))
    assert [s["labels"] for s in samples] == [{"VQ": "A", "MQ": "same", "TA": "A"}, {"VQ": "B", "MQ": "same",
                                                                                     "TA": "A"}]
    assert samples[1]["fps"] == (4.0, 6.0) and samples[1]["num_frames"] == (4, 6)
    assert samples[0]["provenance"]["generators"] == ["wan", "ltx"]
    assert samples[0]["video_a"] == (tmp_path / "videos" / "0_A.mp4").read_bytes()
    assert validate_shards(tmp_path / "out").ok


def test_trl_rows_jsonl_parquet_and_stic(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(1))
    conversational = {
        "images": ["img/a.jpg"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
        "similarity": 0.4,
    }
    implicit = {"images": [{"path": "img/a.jpg"}], "chosen": [{"role": "user", "content": "Hi?"},
                                                              {"role": "assistant", "content": "Yes."}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}
    no_image = {"prompt": "text only", "chosen": "a", "rejected": "b"}
    write_jsonl(tmp_path / "rows.jsonl", [conversational, implicit, no_image])
    stic = {"image": "img/a.jpg", "image_corruption": True, "hallu_prompt": "",
            "chosen": [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "Good."}],
            "rejected": [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "Bad."}]}
    write_jsonl(tmp_path / "stic.jsonl", [stic])
    pq.write_table(pa.Table.from_pylist([{"images": [{"bytes": png(5), "path": None}], "prompt": "Plain prompt",
                                          "chosen": "c", "rejected": "r"}]), tmp_path / "hf.parquet")
    code = cli_main(["shards", "convert", "--from", "trl", str(tmp_path / "rows.jsonl"), str(tmp_path / "stic.jsonl"),
                     str(tmp_path / "hf.parquet"), "--out", str(tmp_path / "out"), "--origin", "ai", "--generator",
                     "gpt", "--no-progress"])
    assert code == 0
    got = {s["__key__"]: s for s in VLMPairDataset(tmp_path / "out")}
    assert sorted(got) == ["hf-000000000", "rows-000000000", "rows-000000001", "stic-000000000"]
    conv = got["rows-000000000"]
    assert conv["prompt"] == conversational["prompt"] and conv["chosen"] == "A red square."
    assert conv["provenance"] == {"origin": "ai", "generator": "gpt", "similarity": 0.4}
    imp = got["rows-000000001"]
    assert imp["prompt"] == [{"role": "user", "content": "Hi?"}] and (imp["chosen"], imp["rejected"]) == ("Yes.", "No.")
    s = got["stic-000000000"]
    assert s["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    assert s["provenance"]["origin"] == "self" and s["provenance"]["corruption"] == "image_corruption"
    assert got["hf-000000000"]["prompt"] == [{"role": "user", "content": "Plain prompt"}]
    assert load_manifest(tmp_path / "out").conversion["counts"]["dropped_reasons"] == {"no_image": 1}
    (tmp_path / "stic_list.json").write_text(json.dumps([stic, stic]))  # STIC's JSON-list form
    man = convert_trl([tmp_path / "stic_list.json"], tmp_path / "list", options=ConvertOptions(progress=False))
    assert man.num_samples == 2
    with pytest.raises(ConversionError, match="rows.jsonl row 3: no_image"):
        convert_trl([tmp_path / "rows.jsonl"], tmp_path / "strict", options=ConvertOptions(strict=True,
                                                                                           progress=False))


def test_cli_usage_errors(tmp_path, capsys):
    assert cli_main(["shards"]) == 2
    assert cli_main(["shards", "convert", "--from", "videoalign", "a.csv", "b.csv", "--out", str(tmp_path)]) == 2
    assert cli_main(["shards", "convert", "--from", "pickapic", "x.parquet", "--out", str(tmp_path),
                     "--video-root", "v"]) == 2
    assert "--video-root" in capsys.readouterr().err


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a conversion."""


def _interrupt_at(monkeypatch, stop_key: str | None) -> list[str]:
    """Make the pickapic converter raise Interrupted on the row `stop_key`; returns the keys it processed."""
    import mmalign.data.convert as convert_mod

    seen: list[str] = []

    def sample(rec, key, where, ctx):
        if key == stop_key:
            raise Interrupted
        seen.append(key)
        return _pickapic_sample(rec, key, where, ctx)

    monkeypatch.setattr(convert_mod, "_pickapic_sample", sample)
    return seen


def test_interrupted_conversion_resumes_to_identical_shards(pickapic, tmp_path, monkeypatch, caplog):
    import pyarrow.parquet as pq

    src, _ = pickapic
    opts = ConvertOptions(max_count=2, ties="coin", seed=1, progress=False)
    clean = tmp_path / "clean"
    convert_pickapic([src], clean, options=opts)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        _interrupt_at(monkeypatch, "train_00000_of_00002-000000009")
        convert_pickapic([src], out, options=opts)
    # samples: rows 0 1 | 2 4 | 5 6 | 7 (open, dropped) 9 ...: three finished shards, no manifest
    assert sorted(p.name for p in out.iterdir()) == [".progress.json"] + [f"shard-00000{i}.tar" for i in range(3)]
    with pytest.raises(ManifestError, match="did not finish"):
        PairDataset(out)
    (out / ".shard-000003.tar.tmp").write_bytes(b"half a shard")  # what a killed process leaves behind
    first = (out / "shard-000000.tar").stat()

    seen = _interrupt_at(monkeypatch, None)
    groups_read = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, row_groups=None, **kwargs):
        groups_read.append(row_groups)
        return real_iter_batches(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        assert cli_main(["shards", "convert", "--from", "pickapic", str(src), "--out", str(out), "--max-count", "2",
                         "--ties", "coin", "--seed", "1", "--no-progress"]) == 0
    assert "keeping its 3 finished shard(s) (6 samples)" in caplog.text
    # the last kept sample is row 6: row group 0 (rows 0-3) is not read, rows 4-6 are read but not converted
    assert groups_read == [[1, 2], [0]]
    assert seen == [f"train_00000_of_00002-00000000{i}" for i in (7, 8, 9)] + [
        f"train_00001_of_00002-00000000{i}" for i in range(4)]
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for p in clean.iterdir():  # shards and manifest (counts included) as if never interrupted
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("change", ["options", "shard", "overwrite"])
def test_interrupted_conversion_restarts_when_resuming_is_unsafe(pickapic, tmp_path, monkeypatch, change):
    src, _ = pickapic
    out = tmp_path / "out"
    opts = ConvertOptions(max_count=2, progress=False)
    with pytest.raises(Interrupted):
        _interrupt_at(monkeypatch, "train_00001_of_00002-000000000")
        convert_pickapic([src], out, options=opts)
    if change == "options":
        opts = ConvertOptions(max_count=2, ties="keep", progress=False)
    elif change == "shard":
        data = bytearray((out / "shard-000001.tar").read_bytes())
        data[600] ^= 0xFF
        (out / "shard-000001.tar").write_bytes(bytes(data))
    else:
        opts = ConvertOptions(max_count=2, overwrite=True, progress=False)
    seen = _interrupt_at(monkeypatch, None)
    man = convert_pickapic([src], out, options=opts)
    assert len(seen) == 14  # every row again
    clean = convert_pickapic([src], tmp_path / "clean", options=ConvertOptions(
        max_count=2, ties=opts.ties, progress=False))
    assert man.num_samples == clean.num_samples and not (out / ".progress.json").exists()
    for entry in clean.shards:
        assert (out / entry.name).read_bytes() == (tmp_path / "clean" / entry.name).read_bytes()


def test_missing_optional_packages_name_the_extra(pickapic, tmp_path, monkeypatch, capsys):
    from mmalign.data import MissingDependencyError, read_frames, video_pair_sample

    src, _ = pickapic
    video = mp4(4)
    with ShardSetWriter(tmp_path / "videos", "video_pair") as w:
        w.write(video_pair_sample("v-0", video, video, prompt="p", labels={"VQ": "A", "MQ": "B", "TA": "same"},
                                  fps_a=8, fps_b=8, num_frames_a=4, num_frames_b=4))
    for module in ("pyarrow", "pyarrow.parquet", "av", "decord"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pickapic converter.*pip install 'mmalign\[parquet\]'"):
        convert_pickapic([src], tmp_path / "o")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    assert cli_main(["shards", "convert", "--from", "trl", str(tmp_path / "rows.parquet"), "--out",
                     str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "rows.parquet: reading TRL rows from parquet needs the optional package 'pyarrow'" in err
    assert "pip install 'mmalign[parquet]'" in err
    with pytest.raises(MissingDependencyError, match=r"read_frames.*pip install 'mmalign\[video\]'"):
        read_frames(video)
    with pytest.raises(MissingDependencyError, match=r"backend='decord'.*pip install decord"):
        read_frames(video, backend="decord")
    with pytest.raises(MissingDependencyError, match=r"VideoPairDataset\(frames=...\).*mmalign\[video\]"):
        VideoPairDataset(tmp_path / "videos", frames={"max_frames": 2})
    assert [s["video_a"] for s in VideoPairDataset(tmp_path / "videos")] == [video]  # bytes need no decoder
    assert cli_main(["shards", "validate", str(tmp_path / "videos")]) == 1
    assert "--no-decode" in capsys.readouterr().err and cli_main(["shards", "validate", "--no-decode",
                                                                 str(tmp_path / "videos")]) == 0
