"""Tiny real data for the data tests: JPEG/PNG bytes from PIL, mp4 from PyAV, a Pick-a-Pic parquet via pyarrow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

# The column schema of Pick-a-Pic v2's parquet files (yuvalkirstain/pickapic_v2), in file order.
PICKAPIC_SCHEMA = [
    ("are_different", "bool"), ("best_image_uid", "string"), ("caption", "string"), ("created_at", "timestamp"),
    ("has_label", "bool"), ("image_0_uid", "string"), ("image_0_url", "string"), ("image_1_uid", "string"),
    ("image_1_url", "string"), ("jpg_0", "binary"), ("jpg_1", "binary"), ("label_0", "float64"),
    ("label_1", "float64"), ("model_0", "string"), ("model_1", "string"), ("ranking_id", "int64"),
    ("user_id", "int64"), ("num_example_per_prompt", "int64"), ("__index_level_0__", "int64"),
]


def image_array(seed: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A (H, W, 3) uint8 image with structure (so crops and flips are visible) that differs per seed."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, size=3)
    arr = np.stack([(xx * 4 + base[0]) % 256, (yy * 5 + base[1]) % 256, ((xx + yy) * 3 + base[2]) % 256], -1)
    return arr.astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    return encode(image_array(seed, size), "JPEG")


def png(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    return encode(image_array(seed, size), "PNG")


def solid_jpeg(color: tuple[int, int, int], size: tuple[int, int] = (40, 56)) -> bytes:
    return encode(np.full((*size, 3), color, dtype=np.uint8), "JPEG", quality=95)


def mp4(num_frames: int = 8, fps: int = 8, size: tuple[int, int] = (24, 32), seed: int = 0) -> bytes:
    """A real H.264 mp4 whose frame i has mean brightness ~ 10 * i + seed."""
    import av

    buf = io.BytesIO()
    h, w = size
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (10 * i + seed) % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def wav(num_samples: int = 800, rate: int = 8000) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes((np.sin(np.arange(num_samples) / 5) * 3000).astype("<i2").tobytes())
    return buf.getvalue()


def pickapic_rows(n: int, *, ties: tuple[int, ...] = (), unlabeled: tuple[int, ...] = (), seed: int = 0) -> list[dict]:
    """Rows in Pick-a-Pic v2 form: image 0 wins on even rows, image 1 on odd rows, except ties / unlabeled."""
    import datetime

    rows = []
    for i in range(n):
        if i in ties:
            l0 = 0.5
        elif i in unlabeled:
            l0 = 0.5  # unlabeled rows in Pick-a-Pic carry a meaningless label with has_label False
        else:
            l0 = 1.0 if i % 2 == 0 else 0.0
        rows.append({
            "are_different": True, "best_image_uid": f"u{i}-{0 if l0 == 1 else 1}", "caption": f"a caption {i}",
            "created_at": datetime.datetime(2023, 1, 1) + datetime.timedelta(minutes=i),
            "has_label": i not in unlabeled, "image_0_uid": f"u{i}-0", "image_0_url": f"https://example.org/{i}/0.jpg",
            "image_1_uid": f"u{i}-1", "image_1_url": f"https://example.org/{i}/1.jpg", "jpg_0": jpeg(seed + 2 * i),
            "jpg_1": jpeg(seed + 2 * i + 1),
            "label_0": l0, "label_1": 1.0 - l0, "model_0": "sdxl", "model_1": "sd21", "ranking_id": 1000 + i,
            "user_id": 7, "num_example_per_prompt": 1, "__index_level_0__": i,
        })
    return rows


def write_pickapic_parquet(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"bool": pa.bool_(), "string": pa.string(), "timestamp": pa.timestamp("ns"), "binary": pa.binary(),
             "float64": pa.float64(), "int64": pa.int64()}
    schema = pa.schema([(name, types[t]) for name, t in PICKAPIC_SCHEMA])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_pairs(out: Path, n: int, *, max_count: int = 4, tie_every: int = 0, start: int = 0) -> Path:
    """A `pair` shard set of n samples; sample i has label_0 = 1 for even i, 0 for odd i (ties every k-th)."""
    from mmalign.data import ShardSetWriter, pair_sample

    with ShardSetWriter(out, "pair", max_count=max_count, overwrite=True) as writer:
        for i in range(start, start + n):
            label = 0.5 if tie_every and i % tie_every == 0 else (1.0 if i % 2 == 0 else 0.0)
            writer.write(pair_sample(f"s-{i:05d}", jpeg(2 * i), png(2 * i + 1), caption=f"caption {i}",
                                     label_0=label, provenance={"dataset": "test", "ids": {"i": i}}))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
