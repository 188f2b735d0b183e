"""Hostile inputs against the data readers, the validator and the scorer output folder (issue 15, "Hostile inputs
and faults"): each test is a try an attacker or an unlucky user made that used to get through."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from data_helpers import jpeg, write_pairs

from mmalign.data import CorruptSampleError, PairDataset, collate_pairs
from mmalign.data.schemas import SampleError, parse_meta
from mmalign.data.validate import validate_shards

def pair_members(key: str, label: object = 1) -> list[tuple[str, bytes]]:
    meta = json.dumps({"caption": f"caption {key}", "label_0": label}).encode()
    return [(f"{key}.0.jpg", jpeg(1)), (f"{key}.1.jpg", jpeg(2)), (f"{key}.json", meta)]


def tar_bytes(members: list, mode: str = "w") -> bytes:
    """A tar of (name, bytes) regular files and ready-made TarInfo (links: (TarInfo, None))."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                tf.addfile(name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def install_shard(root: Path, data: bytes, count: int) -> Path:
    """Make the one-shard set in `root` hold `data` instead, with a manifest that matches its bytes (so only what is
    inside the tar can be at fault)."""
    manifest = json.loads((root / "manifest.json").read_text())
    (entry,) = manifest["shards"]
    (root / entry["name"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), count=count, first_key=None,
                 last_key=None, ties=None)
    manifest["num_samples"] = count
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / entry["name"]


def keys(ds) -> list[str]:
    return [s["__key__"] for s in ds]


def with_peak(fn):
    """(fn(), peak bytes Python allocated while it ran)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def reader(source, **kwargs) -> PairDataset:
    return PairDataset(source, decode_images=False, ties="keep", **kwargs)


# ------------------------------------------------------------------------------------------------ member sizes


def test_a_member_declaring_gigabytes_is_not_allocated(tmp_path, caplog):
    """The header of k-1.0.jpg declares 1 GiB; the file ends after 4 KiB of it. Nothing near 1 GiB is allocated:
    the member is over the limit, its data is skipped in chunks, and the cut shard is counted once."""
    whole = tar_bytes(pair_members("k-0"))
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        last = tf.getmembers()[-1]
    head = whole[: last.offset_data + -(-last.size // 512) * 512]  # the members, without the end-of-archive blocks
    info = tarfile.TarInfo("k-1.0.jpg")
    info.size = 1 << 30
    data = head + info.tobuf(tarfile.PAX_FORMAT) + b"\xff" * 4096
    shard = tmp_path / "big.tar"
    shard.write_bytes(data)
    ds = reader([str(shard)])
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        got, peak = with_peak(lambda: keys(ds))
    assert got == ["k-0"]
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert ds.stats.skipped == 1 and dict(ds.stats.reasons) == {"unreadable": 1}
    assert "max_member_bytes" in caplog.text and "1073741824" in caplog.text

    root = write_pairs(tmp_path / "set", 1)
    install_shard(root, data, 2)
    report, peak = with_peak(lambda: validate_shards(root, decode=False))
    assert peak < 64 << 20, f"validate peak {peak / 2**20:.0f} MiB"
    assert any("max_member_bytes" in i.reason and i.key == "k-1" for i in report.issues)


def test_many_members_each_under_the_limit_cannot_pile_up_in_one_sample(tmp_path, capsys):
    """24 members of 1 MiB under one key (each under a 2 MiB limit, together 24 MiB, a few KiB gzipped): the sample
    is too large as a whole, skipped and counted; its data is not kept (peak memory stays near the limit)."""
    from mmalign.cli import main as cli_main

    members = pair_members("k-0") + [(f"k-1.{i}.bin", bytes(1 << 20)) for i in range(24)] + pair_members("k-1")
    members += pair_members("k-2")
    data = tar_bytes(members, "w:gz")
    shard = tmp_path / "many.tar.gz"
    shard.write_bytes(data)
    ds = reader([str(shard)], max_member_bytes=2 << 20)
    got, peak = with_peak(lambda: keys(ds))
    assert got == ["k-0", "k-2"]
    assert dict(ds.stats.reasons) == {"too_large": 1}
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB: the sample's members piled up"
    with pytest.raises(CorruptSampleError, match="add up to more than 2097152 bytes"):
        keys(reader([str(shard)], max_member_bytes=2 << 20, strict=True))
    root = write_pairs(tmp_path / "set", 1)
    install_shard(root, data, 3)
    assert cli_main(["shards", "validate", str(root), "--no-decode", "--max-member-bytes", "2MiB"]) == 1
    assert "add up to more than 2097152 bytes" in capsys.readouterr().out


def test_an_oversized_gzip_member_is_skipped_counted_and_reported(tmp_path, monkeypatch, capsys):
    """A 16 MiB member (a few KiB gzipped) over a 1 MiB limit: that sample is skipped, counted as too_large, and
    the samples after it are read; the default limit is 512 MiB, set by MMALIGN_MAX_MEMBER_BYTES."""
    from mmalign.cli import main as cli_main
    from mmalign.data import tario

    members = pair_members("k-0") + [("k-1.0.jpg", bytes(16 << 20))] + pair_members("k-1")[1:] + pair_members("k-2")
    data = tar_bytes(members, "w:gz")
    assert len(data) < 1 << 20
    shard = tmp_path / "zip.tar.gz"
    shard.write_bytes(data)

    ds = reader([str(shard)], max_member_bytes=1 << 20)
    got, peak = with_peak(lambda: keys(ds))
    assert got == ["k-0", "k-2"]
    assert ds.stats.skipped == 1 and dict(ds.stats.reasons) == {"too_large": 1}
    assert peak < 8 << 20, f"peak {peak / 2**20:.0f} MiB: the 16 MiB member was held in memory"
    with pytest.raises(CorruptSampleError, match=r"zip.tar.gz: sample 'k-1': member 'k-1.0.jpg' declares 16777216"):
        keys(reader([str(shard)], max_member_bytes=1 << 20, strict=True))
    assert keys(reader([str(shard)])) == ["k-0", "k-1", "k-2"]  # under the default limit
    assert tario.MAX_MEMBER_BYTES == 512 << 20
    with pytest.raises(ValueError, match="max_member_bytes"):
        reader([str(shard)], max_member_bytes=0)

    root = write_pairs(tmp_path / "set", 1)
    install_shard(root, data, 3)
    assert cli_main(["shards", "validate", str(root), "--no-decode", "--max-member-bytes", "1MiB"]) == 1
    out = capsys.readouterr().out
    assert "k-1\tmember 'k-1.0.jpg' declares 16777216 bytes, over the limit of 1048576" in out
    assert cli_main(["shards", "validate", str(root), "--no-decode"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("MMALIGN_MAX_MEMBER_BYTES", "1000")
    assert tario._default_max_member_bytes() == 1000


# ------------------------------------------------------------------------------------------------ unsafe members


HOSTILE = {
    "dotdot": [("../x.jpg", jpeg(3))],
    "absolute": pair_members("/abs/key"),
    "symlink": [link("g-1.0.jpg", "/etc/passwd", tarfile.SYMTYPE)] + pair_members("g-1")[1:],
    "hardlink": [link("g-1.0.jpg", "g-0.0.jpg", tarfile.LNKTYPE)] + pair_members("g-1")[1:],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_traversal_names_and_links_are_refused_everywhere(tmp_path, case, capsys):
    from mmalign.cli import main as cli_main
    from mmalign.data.tario import iter_members

    data = tar_bytes(pair_members("g-0") + HOSTILE[case] + pair_members("g-2"))
    names = [n for n, _ in iter_members(io.BytesIO(data))]
    assert not any(n.startswith(("/", "../")) or n == "g-1.0.jpg" for n in names), names

    shard = tmp_path / "evil.tar"
    shard.write_bytes(data)
    ds = reader([str(shard)])
    assert keys(ds) == ["g-0", "g-2"]
    assert ds.stats.skipped == 1 and dict(ds.stats.reasons) == {"unsafe": 1}
    hostile_name = HOSTILE[case][0][0]
    hostile_name = hostile_name.name if isinstance(hostile_name, tarfile.TarInfo) else hostile_name
    with pytest.raises(CorruptSampleError, match="evil.tar") as err:
        keys(reader([str(shard)], strict=True))
    assert repr(hostile_name) in str(err.value) and "refused" in str(err.value)

    root = write_pairs(tmp_path / "set", 1)
    install_shard(root, data, 3)
    assert cli_main(["shards", "validate", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"member {hostile_name!r} is refused" in out
    assert "OK" not in out


# ------------------------------------------------------------------------------------------------ counts


def _set_with_bad_sample(root: Path, n: int, bad: int) -> Path:
    """n pair samples; sample `bad` has an image whose pixels are cut (it passes the writer, fails decoding)."""
    from mmalign.data import ShardSetWriter, pair_sample

    broken = jpeg(7)[: len(jpeg(7)) // 2]
    with ShardSetWriter(root, "pair", max_count=100) as w:
        for i in range(n):
            w.write(pair_sample(f"s-{i:05d}", broken if i == bad else jpeg(i), jpeg(9), caption="c", label_0=1))
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bad_sample_before_the_dropped_tail_is_counted_once_per_pass(tmp_path, caplog, num_workers):
    """6 samples, batch 2, s-4 bad: batches [s-0, s-1], [s-2, s-3]; s-5 is dropped by drop_last together with
    the count of s-4 it carried. The trainer's sum of batch["skipped"] must still see s-4, once per pass."""
    from mmalign.train.data import endless_batches

    root = _set_with_bad_sample(tmp_path / "set", 6, bad=4)
    ds = PairDataset(root, decode_images=True)
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        batches = endless_batches(ds, collate_pairs, 2, num_workers=num_workers)
        got = [next(batches) for _ in range(4)]  # two passes
    for one_pass in (got[:2], got[2:]):  # (two workers split the samples: [s-0, s-2] and [s-1, s-3])
        assert sorted(k for b in one_pass for k in b["keys"]) == ["s-00000", "s-00001", "s-00002", "s-00003"]
        assert sum(b["skipped"] for b in one_pass) == 1
        assert one_pass[1]["skip_reasons"] == {"decode": 1} and one_pass[1]["epoch"] == one_pass[0]["epoch"]
    assert sum(b["skipped"] for b in got) == ds.stats.skipped == 2
    if num_workers == 0:  # worker processes log in their own process
        assert caplog.text.count("'s-00004'") == 2  # logged once per pass, as counted


def test_a_key_repeated_further_on_is_read_once(tmp_path, capsys):
    from mmalign.cli import main as cli_main

    data = tar_bytes(pair_members("a") + pair_members("b") + pair_members("a"))
    shard = tmp_path / "dup.tar"
    shard.write_bytes(data)
    ds = reader([str(shard)])
    assert keys(ds) == ["a", "b"]
    assert dict(ds.stats.reasons) == {"duplicate": 1}
    with pytest.raises(CorruptSampleError, match="dup.tar: sample 'a'.*already read"):
        keys(reader([str(shard)], strict=True))
    root = write_pairs(tmp_path / "set", 1)
    install_shard(root, data, 3)
    assert cli_main(["shards", "validate", str(root), "--no-decode"]) == 1
    assert "a\tduplicate key 'a'" in capsys.readouterr().out


def test_a_key_of_another_shard_is_read_once_and_overlapping_ranges_are_refused(tmp_path):
    root = write_pairs(tmp_path / "set", 4, max_count=2)  # shard 0: s-00000, s-00001; shard 1: s-00002, s-00003
    manifest = json.loads((root / "manifest.json").read_text())
    second = manifest["shards"][1]
    data = tar_bytes(pair_members("s-00000") + pair_members("s-00003"))  # s-00000 again, in shard 1
    (root / second["name"]).write_bytes(data)
    ds = reader(root)
    assert keys(ds) == ["s-00000", "s-00001", "s-00003"]
    assert dict(ds.stats.reasons) == {"duplicate": 1}

    second["first_key"] = "s-00001"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="overlap"):
        reader(root)


@pytest.mark.parametrize("label", ["1", True, "0.5", None])
def test_a_label_that_is_not_a_number_is_a_bad_sample(tmp_path, label):
    with pytest.raises(SampleError, match="label_0 must be a JSON number"):
        parse_meta("pair", {"caption": "c", "label_0": label})
    shard = tmp_path / "labels.tar"
    shard.write_bytes(tar_bytes(pair_members("a") + pair_members("b", label=label) + pair_members("c", label=0)))
    ds = reader([str(shard)])
    assert keys(ds) == ["a", "c"]
    assert dict(ds.stats.reasons) == {"schema": 1}
    assert parse_meta("pair", {"caption": "c", "label_0": 0}).label_0 == 0.0  # numbers stay numbers


# ------------------------------------------------------------------------------------------------ scorer names


@pytest.fixture(scope="module")
def exported_clip(tmp_path_factory):
    from mmalign.rewards.registry import load_scorer
    from mmalign.rewards.tiny import build_tiny_clip

    base = tmp_path_factory.mktemp("hostile_models")
    folder = build_tiny_clip(base / "clip")
    return load_scorer(f"clip_score={folder}").save_pretrained(base / "export")


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_scorer_card_name_cannot_write_outside_out(tmp_path, exported_clip, where, capsys):
    import shutil

    from mmalign.cli import main as cli_main
    from mmalign.rewards.base import ScorerError
    from mmalign.rewards.registry import load_scorer

    model = tmp_path / "model"
    shutil.copytree(exported_clip, model)
    target = tmp_path / "escaped"
    name = "../../escaped" if where == "relative" else str(target)
    card = json.loads((model / "mmalign_scorer.json").read_text())
    card["name"] = name
    (model / "mmalign_scorer.json").write_text(json.dumps(card))
    shards = write_pairs(tmp_path / "shards", 2)
    out = tmp_path / "a" / "out"

    assert cli_main(["score", "--scorers", str(model), "--in", str(shards), "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(model / "mmalign_scorer.json") in err and repr(name) in err
    assert not target.exists() and not (out / name).exists()
    assert not any(p.name == "scorer.json" for p in tmp_path.rglob("scorer.json"))
    with pytest.raises(ScorerError, match="mmalign_scorer.json"):
        load_scorer(f"clip_score={model}")


def test_a_scorer_object_with_a_path_name_is_refused_by_score_shards(tmp_path):
    from mmalign.rewards.scoring import ScoreError, read_scores, score_shards
    from mmalign.rewards.toy import ToyScorer

    scorer = ToyScorer("color")
    scorer.name = "../evil"
    shards = write_pairs(tmp_path / "shards", 2)
    with pytest.raises(ScoreError, match="'../evil'"):
        score_shards(shards, tmp_path / "out", [scorer], progress=False)
    assert not (tmp_path / "evil").exists()
    with pytest.raises(ScoreError):
        read_scores(tmp_path / "out", "/etc")
