"""The `step_pair` schema (SPO's step-wise preference pools): builder checks, bit-exact round trips through the
reader and collator, rank splits, corrupt rows, and `mmalign shards validate / info`."""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmalign.cli import main as cli_main
from mmalign.data import (
    CorruptSampleError, SampleError, ShardSetWriter, StepPairDataset, collate_step_pairs, load_manifest,
    step_pair_sample, validate_shards,
)
from mmalign.data.schemas import load_npy, npy_bytes

SHAPE = (4, 8, 8)


def latents(i: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three float32 latents; x_t carries values that a lossy round trip would change (-0.0, a subnormal, the
    largest float32)."""
    rng = np.random.default_rng(i)
    x_t, x_w, x_l = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    x_t.flat[:3] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max]
    return x_t, x_w, x_l


def row(i: int, **overrides) -> dict[str, bytes]:
    """Transition i of a 20-step DDIM run with timesteps 951, 901, ...: x_t at step i, x_w / x_l at step i + 1."""
    kwargs = dict(prompt=f"a red cube {i}", timestep=951 - 50 * i, prev_timestep=901 - 50 * i, step_index=i,
                  num_inference_steps=20, guidance_scale=7.5, eta=1.0, scores_w=0.25 + i, scores_l=-0.5 + i,
                  seed=100 + i, provenance={"dataset": "spo-pool", "generator": "tiny-sd"})
    kwargs.update(overrides)
    return step_pair_sample(f"st-{i:05d}", *latents(i), **kwargs)


def write_rows(out, n: int, *, max_count: int = 2):
    with ShardSetWriter(out, "step_pair", max_count=max_count) as writer:
        for i in range(n):
            writer.write(row(i))
    return out


# ------------------------------------------------------------------------------------------------ builder


def test_builder_stores_npy_and_exact_metadata():
    x_t, x_w, x_l = latents(0)
    sample = step_pair_sample(
        "k-0", torch.from_numpy(x_t), x_w, x_l, prompt="a cat", timestep=torch.tensor(981), prev_timestep=np.int64(961),
        step_index=1, num_inference_steps=50, guidance_scale=np.float32(7.5), eta=0, scores_w=0.75, scores_l=0.125,
        extra_note="kept")
    assert sorted(sample) == ["__key__", "json", "x_l.npy", "x_t.npy", "x_w.npy"]
    for name, arr in (("x_t", x_t), ("x_w", x_w), ("x_l", x_l)):
        assert sample[f"{name}.npy"] == npy_bytes(arr)
        back = load_npy(sample[f"{name}.npy"])
        assert back.dtype == np.float32 and back.tobytes() == arr.tobytes()
    # ints from a 0-d tensor and numpy, floats from numpy; the default scheduler is written, a None seed is not
    assert json.loads(sample["json"]) == {
        "prompt": "a cat", "timestep": 981, "prev_timestep": 961, "step_index": 1, "num_inference_steps": 50,
        "guidance_scale": 7.5, "eta": 0.0, "scores_w": 0.75, "scores_l": 0.125, "scheduler": "DDIMScheduler",
        "extra_note": "kept"}
    final = step_pair_sample("k-1", *latents(1), prompt="p", timestep=21, prev_timestep=-1, step_index=49,
                             num_inference_steps=50, guidance_scale=1.0, eta=1.0, scores_w=1.0, scores_l=0.0, seed=0,
                             scheduler="DDPMScheduler")
    meta = json.loads(final["json"])
    assert (meta["prev_timestep"], meta["seed"], meta["scheduler"]) == (-1, 0, "DDPMScheduler")


@pytest.mark.parametrize("change, message", [
    (dict(timestep=901), "'st-00000': json: <object>: Value error, timestep (901) must be greater than "
                         "prev_timestep (901)"),
    (dict(prev_timestep=-2), "'st-00000': json: prev_timestep: Input should be greater than or equal to -1"),
    (dict(step_index=20), "step_index (20) must be below num_inference_steps (20)"),
    (dict(scores_w=-0.5), "scores_w (-0.5) must be greater than scores_l (-0.5)"),
    (dict(timestep=951.0), "'st-00000': timestep must be an integer, got float 951.0"),
    (dict(seed=True), "seed must be an integer, got bool"),
    (dict(guidance_scale="7.5"), "guidance_scale must be a number, got str '7.5'"),
    (dict(eta=float("nan")), "json: eta: Value error, eta must be finite, got nan"),
    (dict(eta=-1.0), "json: eta: Input should be greater than or equal to 0"),
    (dict(scheduler=""), "json: scheduler: String should have at least 1 character"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_builder_refuses_bad_metadata_naming_key_and_field(change, message):
    with pytest.raises(SampleError) as err:
        row(0, **change)
    assert message in str(err.value)


def test_builder_refuses_bad_latents_naming_key_and_member():
    x_t, x_w, x_l = latents(0)
    meta = dict(prompt="p", timestep=11, prev_timestep=1, step_index=0, num_inference_steps=2, guidance_scale=5.0,
                eta=1.0, scores_w=1.0, scores_l=0.0)
    with pytest.raises(SampleError, match=r"'k-0': latent shapes differ: x_t.npy \(4, 8, 8\), x_w.npy \(4, 8, 8\), "
                                          r"x_l.npy \(4, 8, 6\)"):
        step_pair_sample("k-0", x_t, x_w, x_l[..., :6], **meta)
    with pytest.raises(SampleError, match="'k-0': x_w.npy: latents must be float32 .native byte order., got float64"):
        step_pair_sample("k-0", x_t, x_w.astype(np.float64), x_l, **meta)
    with pytest.raises(SampleError, match="'k-0': x_l.npy: latents must be float32 .*, got float16"):
        step_pair_sample("k-0", x_t, x_w, torch.from_numpy(x_l).half(), **meta)
    bad = x_t.copy()
    bad[0, 0, 0], bad[3, 7, 7] = np.nan, -np.inf
    with pytest.raises(SampleError, match="'k-0': x_t.npy: 2 of 256 values are not finite"):
        step_pair_sample("k-0", bad, x_w, x_l, **meta)
    with pytest.raises(SampleError, match="'k-0': x_t.npy: latents must be float32 .*, got object"):
        step_pair_sample("k-0", np.array([{"a": 1}], dtype=object), x_w, x_l, **meta)


def test_object_arrays_are_never_stored_or_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Exploit()], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="Object arrays cannot be loaded when allow_pickle=False"):
        load_npy(buf.getvalue())
    fields = np.zeros(1, dtype=[("x", "f4"), ("y", "O")])  # an object field inside a structured dtype
    with pytest.raises(SampleError, match="object arrays cannot be stored"):
        npy_bytes(fields)
    with pytest.raises(SampleError, match="object arrays cannot be stored"):
        npy_bytes(np.array([1.0, None], dtype=object))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_is_bit_exact_through_dataset_and_collate(tmp_path):
    write_rows(tmp_path, 5, max_count=2)
    man = load_manifest(tmp_path)
    assert (man.schema_name, man.schema_version, man.num_samples, [s.count for s in man.shards]) == (
        "step_pair", 1, 5, [2, 2, 1])
    ds = StepPairDataset(tmp_path)
    assert len(ds) == 5
    batches = list(DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate_step_pairs))
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [f"st-{i:05d}" for i in range(5)]
    b = batches[0]
    assert b["x_t"].shape == (2, *SHAPE) and b["x_t"].dtype == torch.float32
    for j, i in enumerate((0, 1)):
        for name, arr in zip(("x_t", "x_w", "x_l"), latents(i)):
            assert b[name][j].numpy().tobytes() == arr.tobytes()  # bit-exact, -0.0 and the subnormal included
    assert b["timesteps"].dtype == torch.long and b["timesteps"].tolist() == [951, 901]
    assert b["prev_timesteps"].dtype == torch.long and b["prev_timesteps"].tolist() == [901, 851]
    assert b["step_indices"].tolist() == [0, 1] and b["num_inference_steps"].tolist() == [20, 20]
    assert b["guidance_scale"].dtype == torch.float32 and b["guidance_scale"].tolist() == [7.5, 7.5]
    assert b["eta"].tolist() == [1.0, 1.0]
    assert b["scores_w"].tolist() == [0.25, 1.25] and b["scores_l"].tolist() == [-0.5, 0.5]
    assert b["captions"] == ["a red cube 0", "a red cube 1"]
    assert b["seeds"] == [100, 101] and b["schedulers"] == ["DDIMScheduler"] * 2
    assert b["provenance"][0] == {"dataset": "spo-pool", "generator": "tiny-sd"}
    assert b["shards"] == ["shard-000000.tar"] * 2 and b["skipped"] == 0
    assert batches[-1]["x_w"].shape == (1, *SHAPE)


@pytest.mark.parametrize("n, max_count", [(7, 2), (5, 10)], ids=["shard-level (4 shards)", "sample-level (1 shard)"])
def test_two_ranks_read_disjoint_shares_covering_every_row(tmp_path, n, max_count):
    write_rows(tmp_path, n, max_count=max_count)
    per_rank = []
    for rank in (0, 1):
        ds = StepPairDataset(tmp_path, rank=rank, world_size=2, shuffle=True, shuffle_buffer=2, seed=3)
        ds.set_epoch(1)
        got = []
        for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_step_pairs):
            for j, key in enumerate(batch["keys"]):
                i = int(key.split("-")[1])
                assert batch["x_l"][j].numpy().tobytes() == latents(i)[2].tobytes()
                assert batch["timesteps"][j].item() == 951 - 50 * i
            got += batch["keys"]
        assert len(got) == len(ds) > 0
        per_rank.append(set(got))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"st-{i:05d}" for i in range(n)}


def test_collate_refuses_mixed_latent_shapes():
    samples = []
    for i, shape in enumerate((SHAPE, (4, 16, 16))):
        sample = {name: torch.from_numpy(a) for name, a in zip(("x_t", "x_w", "x_l"), latents(i, shape))}
        sample.update(prompt="p", timestep=11, prev_timestep=1, step_index=0, num_inference_steps=2,
                      guidance_scale=5.0, eta=1.0, seed=None, scheduler="DDIMScheduler", scores_w=1.0,
                      scores_l=0.0, provenance={}, __key__=f"k-{i}", __shard__="s.tar", __epoch__=0, __pos__=i + 1,
                      __yielded__=i + 1, __worker__=0, __num_workers__=1, __rank__=0, __world_size__=1, __seed__=0)
        samples.append(sample)
    with pytest.raises(ValueError, match=re.escape("one latent shape, got [(4, 8, 8), (4, 16, 16)] (keys ['k-0', "
                                                   "'k-1'])")):
        collate_step_pairs(samples)


# ------------------------------------------------------------------------------------------------ corrupt rows


def _corrupt(kind: str, i: int) -> dict[str, bytes]:
    """Row i with one member broken the way `kind` says; written past the writer's checks."""
    sample = row(i)
    x_t, x_w, x_l = latents(i)
    if kind == "shape":
        sample["x_l.npy"] = npy_bytes(x_l[..., :6])
    elif kind == "object":
        buf = io.BytesIO()
        np.save(buf, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
        sample["x_w.npy"] = buf.getvalue()
    elif kind == "nonfinite":
        x_t[1, 2, 3] = np.nan
        sample["x_t.npy"] = npy_bytes(x_t)
    elif kind == "order":  # valid JSON, but x_w / x_l are not after x_t
        meta = json.loads(sample["json"])
        meta["prev_timestep"] = meta["timestep"] + 50
        sample["json"] = json.dumps(meta).encode()
    return sample


def reason(kind: str, i: int) -> str:
    """What the reader, the writer and the validator say about `_corrupt(kind, i)`."""
    return {
        "shape": "latent shapes differ: x_t.npy (4, 8, 8), x_w.npy (4, 8, 8), x_l.npy (4, 8, 6)",
        "object": "x_w.npy: npy: Object arrays cannot be loaded when allow_pickle=False",
        "nonfinite": "x_t.npy: 1 of 256 values are not finite (nan or inf)",
        "order": f"json: <object>: Value error, timestep ({951 - 50 * i}) must be greater than prev_timestep "
                 f"({1001 - 50 * i})",
    }[kind]


def _write_tar(path, samples):
    from webdataset import TarWriter

    with TarWriter(str(path), encoder=False) as tw:
        for sample in samples:
            tw.write(sample)
    return str(path)


def test_corrupt_rows_are_skipped_counted_and_named(tmp_path, caplog):
    kinds = ["shape", "object", "nonfinite", "order"]
    samples = [row(0)] + [_corrupt(kind, i) for i, kind in enumerate(kinds, start=1)] + [row(5)]
    shard = _write_tar(tmp_path / "mixed.tar", samples)  # a shard list: the schema comes from the reader
    ds = StepPairDataset([shard])
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        batches = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_step_pairs))
    assert [k for b in batches for k in b["keys"]] == ["st-00000", "st-00005"]
    assert batches[0]["skipped"] == 4 and batches[0]["skip_reasons"] == {"schema": 4}
    assert batches[0]["x_t"][1].numpy().tobytes() == latents(5)[0].tobytes()
    assert ds.stats.skipped == 4 and dict(ds.stats.reasons) == {"schema": 4}
    lines = caplog.text.splitlines()
    assert len(lines) == 4
    for line, (i, kind) in zip(lines, enumerate(kinds, start=1)):
        assert f"skipping sample 'st-{i:05d}' in mixed.tar (schema): {reason(kind, i)}" in line


@pytest.mark.parametrize("kind", ["shape", "object", "nonfinite", "order"])
def test_strict_mode_raises_naming_shard_key_and_reason(tmp_path, kind):
    shard = _write_tar(tmp_path / f"{kind}.tar", [row(0), _corrupt(kind, 1), row(2)])
    with pytest.raises(CorruptSampleError) as err:
        list(StepPairDataset([shard], strict=True))
    assert (err.value.shard, err.value.key) == (f"{kind}.tar", "st-00001")
    assert str(err.value).startswith(f"{kind}.tar: sample 'st-00001': {reason(kind, 1)}")


def test_writer_refuses_a_hand_built_row_naming_key_and_member(tmp_path):
    with ShardSetWriter(tmp_path, "step_pair") as writer:
        writer.write(row(0))
        with pytest.raises(SampleError, match=re.escape("sample 'st-00001' does not match schema 'step_pair': "
                                                        + reason("nonfinite", 1))):
            writer.write({"__key__": "st-00001", **{k: v for k, v in _corrupt("nonfinite", 1).items()
                                                   if k != "__key__"}})
        with pytest.raises(SampleError, match="missing member x_l.npy"):
            writer.write({k: v for k, v in row(2).items() if k != "x_l.npy"})
    assert load_manifest(tmp_path).num_samples == 1


# ------------------------------------------------------------------------------------------------ CLI


def test_shards_validate_and_info_understand_step_pair(tmp_path, capsys):
    good = write_rows(tmp_path / "good", 5, max_count=2)
    assert validate_shards(good).ok
    assert cli_main(["shards", "validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "schema step_pair, 3 shard(s), 5 sample(s) read, 0 bad sample(s): OK" in out
    assert cli_main(["shards", "info", str(good)]) == 0
    assert "schema step_pair v1, 5 samples, 3 shard(s)" in capsys.readouterr().out


def test_shards_validate_reports_bad_step_pairs_even_without_decoding(tmp_path, capsys, monkeypatch):
    import mmalign.data.writer as writer_module

    bad = tmp_path / "bad"
    kinds = ["shape", "object", "nonfinite"]
    real_check = writer_module.check_sample
    with ShardSetWriter(bad, "step_pair", max_count=2) as writer:
        writer.write(row(0))
        # let the corrupt rows past the writer's check, as a foreign tool or a damaged copy would
        monkeypatch.setattr(writer_module, "check_sample", lambda schema, files: ({"unexpected": []}, None))
        for i, kind in enumerate(kinds, start=1):
            writer.write(_corrupt(kind, i))
        monkeypatch.setattr(writer_module, "check_sample", real_check)
        writer.write(row(4))
    for args in ([], ["--no-decode"]):
        assert cli_main(["shards", "validate", str(bad), *args]) == 1
        out = capsys.readouterr().out
        assert f"ERROR\tshard-000000.tar\tst-00001\t{reason('shape', 1)}" in out
        assert f"ERROR\tshard-000001.tar\tst-00002\t{reason('object', 2)}" in out
        assert f"ERROR\tshard-000001.tar\tst-00003\t{reason('nonfinite', 3)}" in out
        assert "5 sample(s) read, 3 bad sample(s): 3 error(s)" in out
