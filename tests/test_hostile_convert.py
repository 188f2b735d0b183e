"""Hostile and unusual converter inputs: Pick-a-Pic subsets and the Hugging Face image layout, wrong column types,
files that are not what their name says, and conversions that would succeed with nothing (issue 15)."""

from __future__ import annotations

import csv
import json

import pytest
from data_helpers import jpeg, mp4, pickapic_rows, png, tar_members, write_jsonl

from mmalign.cli import main as cli_main
from mmalign.data import (
    ConversionError, ConvertOptions, PairDataset, convert_hpdv2, convert_jsonl, convert_pickapic, convert_trl,
    convert_videoalign, load_manifest, validate_shards,
)

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")  # what the diffusers DPO example reads
OPTS = ConvertOptions(progress=False)


def _table(rows: list[dict], columns: dict[str, object]):
    import pyarrow as pa

    return pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows],
                                schema=pa.schema(list(columns.items())))


def _types():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature
    return pa, image


def test_pickapic_subset_with_only_the_pair_columns(tmp_path, capsys):
    import pyarrow.parquet as pq

    pa, _ = _types()
    rows = pickapic_rows(6, ties=(2,))
    cols = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(),
            "label_1": pa.float64()}
    pq.write_table(_table(rows, cols), tmp_path / "dpo.parquet")
    out = tmp_path / "out"
    code = cli_main(["shards", "convert", "--from", "pickapic", str(tmp_path / "dpo.parquet"), "--out", str(out),
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "6 rows read, 5 kept, 1 dropped (tie 1)" in captured.out
    absent = ["has_label", "model_0", "model_1", "ranking_id", "user_id", "num_example_per_prompt"]
    assert "absent" in captured.out and all(c in captured.out for c in absent)
    man = load_manifest(out)
    assert set(absent) <= set(man.conversion["absent_columns"])
    samples = list(PairDataset(out, decode_images=False))
    assert [s["caption"] for s in samples] == [f"a caption {i}" for i in (0, 1, 3, 4, 5)]
    assert tar_members(out / "shard-000000.tar")["dpo-000000003.1.jpg"] == rows[3]["jpg_1"]
    assert "generators" not in samples[0]["provenance"] or not samples[0]["provenance"]["generators"]
    assert validate_shards(out).ok

    # the optional columns that are present are carried: has_label still drops unlabeled rows
    cols_more = {**cols, "has_label": pa.bool_(), "ranking_id": pa.int64()}
    rows = pickapic_rows(4, unlabeled=(1,))
    pq.write_table(_table(rows, cols_more), tmp_path / "more.parquet")
    man = convert_pickapic([tmp_path / "more.parquet"], tmp_path / "more", options=OPTS)
    assert man.conversion["counts"]["dropped_reasons"] == {"unlabeled": 1}
    assert "has_label" not in man.conversion["absent_columns"] and "model_0" in man.conversion["absent_columns"]
    got = list(PairDataset(tmp_path / "more", decode_images=False))
    assert got[0]["provenance"]["ids"]["ranking_id"] == 1000


def test_pickapic_in_the_hugging_face_image_layout(tmp_path):
    import pyarrow.parquet as pq

    pa, image = _types()
    rows = pickapic_rows(5)
    for r in rows:
        r["jpg_0"] = {"bytes": r["jpg_0"], "path": None}
        r["jpg_1"] = {"bytes": r["jpg_1"], "path": "x.jpg"}
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "4.png").write_bytes(png(44))
    rows[4]["jpg_1"] = {"bytes": None, "path": "images/4.png"}  # a path relative to the parquet's folder
    cols = {"caption": pa.string(), "jpg_0": image, "jpg_1": image, "label_0": pa.float64(), "label_1": pa.float64(),
            "has_label": pa.bool_()}
    pq.write_table(_table(rows, cols), tmp_path / "hf.parquet")
    man = convert_pickapic([tmp_path / "hf.parquet"], tmp_path / "out", options=OPTS)
    assert man.num_samples == 5 and man.conversion["counts"]["dropped"] == 0
    members = tar_members(tmp_path / "out" / "shard-000000.tar")
    assert members["hf-000000000.0.jpg"] == rows[0]["jpg_0"]["bytes"]
    assert members["hf-000000003.1.jpg"] == rows[3]["jpg_1"]["bytes"]
    assert members["hf-000000004.1.png"] == png(44)


def test_pickapic_wrong_column_types_are_refused_naming_file_and_column(tmp_path, capsys):
    import pyarrow.parquet as pq

    pa, _ = _types()
    from data_helpers import PICKAPIC_SCHEMA

    rows = pickapic_rows(3)
    for r in rows:
        r["label_1"] = str(r["label_1"])
    types = {"bool": pa.bool_(), "string": pa.string(), "timestamp": pa.timestamp("ns"), "binary": pa.binary(),
             "float64": pa.float64(), "int64": pa.int64()}
    cols = {name: types[t] for name, t in PICKAPIC_SCHEMA}
    cols["label_1"] = pa.string()  # every Pick-a-Pic column, one of the wrong type
    pq.write_table(_table(rows, cols), tmp_path / "strlabel.parquet")
    with pytest.raises(ConversionError, match=r"strlabel.parquet: column label_1 .*string"):
        convert_pickapic([tmp_path / "strlabel.parquet"], tmp_path / "o", options=OPTS)
    assert cli_main(["shards", "convert", "--from", "pickapic", str(tmp_path / "strlabel.parquet"), "--out",
                     str(tmp_path / "o2"), "--no-progress"]) != 0
    assert "strlabel.parquet" in capsys.readouterr().err


def test_pickapic_bad_label_values_are_dropped_not_crashing(tmp_path):
    from mmalign.data.convert import _Ctx, _pickapic_sample

    ctx = _Ctx(OPTS)
    rec = {"caption": "c", "jpg_0": jpeg(1), "jpg_1": jpeg(2), "has_label": True}
    for l0, l1 in (("1", "0"), (1.0, "0"), (True, False), (1.0, None), (float("nan"), 0.0)):
        assert _pickapic_sample({**rec, "label_0": l0, "label_1": l1}, "k-000000000", "f row 0", ctx) is None
    assert ctx.counts.dropped == {"bad_label": 5}


@pytest.mark.parametrize("fmt", ["pickapic", "trl"])
def test_a_file_that_is_not_parquet_is_named(tmp_path, capsys, fmt):
    bad = tmp_path / "notes.parquet"
    bad.write_text("these are my notes, not a parquet file\n")
    fn = convert_pickapic if fmt == "pickapic" else convert_trl
    with pytest.raises(ConversionError, match="notes.parquet"):
        fn([bad], tmp_path / "o", options=OPTS)
    assert cli_main(["shards", "convert", "--from", fmt, str(bad), "--out", str(tmp_path / "o2"),
                     "--no-progress"]) != 0
    assert "notes.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jsonl", "trl", "hpdv2", "videoalign"])
def test_a_binary_text_input_is_named(tmp_path, fmt):
    name = {"jsonl": "m.jsonl", "trl": "m.jsonl", "hpdv2": "m.json", "videoalign": "m.csv"}[fmt]
    bad = tmp_path / name
    bad.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    call = {"jsonl": lambda: convert_jsonl(bad, tmp_path / "o", schema="pair", options=OPTS),
            "trl": lambda: convert_trl([bad], tmp_path / "o", options=OPTS),
            "hpdv2": lambda: convert_hpdv2(bad, tmp_path / "o", options=OPTS),
            "videoalign": lambda: convert_videoalign(bad, tmp_path / "o", options=OPTS)}[fmt]
    with pytest.raises(ConversionError, match=name):
        call()


def _nothing_usable(fmt: str, tmp_path):
    """An input of each format whose every row is dropped; returns (call, file name)."""
    import pyarrow.parquet as pq

    if fmt == "pickapic":
        pa, image = _types()
        rows = pickapic_rows(3)
        for r in rows:
            r["jpg_0"] = {"bytes": None, "path": None}
        cols = {c: t for c, t in (("caption", pa.string()), ("jpg_0", image), ("jpg_1", pa.binary()),
                                  ("label_0", pa.float64()), ("label_1", pa.float64()))}
        pq.write_table(_table(rows, cols), tmp_path / "empty_images.parquet")
        return lambda out, o: convert_pickapic([tmp_path / "empty_images.parquet"], out, options=o), \
            "empty_images.parquet"
    if fmt == "pickapic_unlabeled":
        from data_helpers import write_pickapic_parquet

        write_pickapic_parquet(tmp_path / "unlabeled.parquet", pickapic_rows(3, unlabeled=(0, 1, 2)))
        return lambda out, o: convert_pickapic([tmp_path / "unlabeled.parquet"], out, options=o), "unlabeled.parquet"
    if fmt == "hpdv2":
        (tmp_path / "h.json").write_text(json.dumps([{"prompt": "p", "file_path": ["a.jpg", "b.jpg"],
                                                      "human_preference": [1, 0]}]))
        return lambda out, o: convert_hpdv2(tmp_path / "h.json", out, options=o), "h.json"
    if fmt == "jsonl":
        write_jsonl(tmp_path / "j.jsonl", [{"caption": "x", "images": ["nope.png", "nope2.png"], "label_0": 1}])
        return lambda out, o: convert_jsonl(tmp_path / "j.jsonl", out, options=o), "j.jsonl"
    if fmt == "videoalign":
        (tmp_path / "a.mp4").write_bytes(mp4(4))
        with open(tmp_path / "v.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([
                ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B"],
                ["a.mp4", "a.mp4", "p", "X", "A", "A", 4, 4, 4, 4]])
        return lambda out, o: convert_videoalign(tmp_path / "v.csv", out, options=o), "v.csv"
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": "text only", "chosen": "a", "rejected": "b"}])
    return lambda out, o: convert_trl([tmp_path / "t.jsonl"], out, options=o), "t.jsonl"


@pytest.mark.parametrize("fmt", ["pickapic", "pickapic_unlabeled", "hpdv2", "jsonl", "videoalign", "trl"])
def test_a_conversion_that_keeps_nothing_fails_naming_the_input(tmp_path, fmt):
    call, name = _nothing_usable(fmt, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=rf"{name}.*nothing usable"):
        call(out, OPTS)
    assert not (out / "manifest.json").exists() and not (out / ".progress.json").exists()


def test_cli_exits_non_zero_when_nothing_usable_was_written(tmp_path, capsys):
    from data_helpers import write_pickapic_parquet

    write_pickapic_parquet(tmp_path / "unlabeled.parquet", pickapic_rows(3, unlabeled=(0, 1, 2)))
    code = cli_main(["shards", "convert", "--from", "pickapic", str(tmp_path / "unlabeled.parquet"), "--out",
                     str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "unlabeled.parquet" in err and "unlabeled 3" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
