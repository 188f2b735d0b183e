"""Benchmark: reading 256-px JPEG preference pairs from shards vs from a Pick-a-Pic-style parquet.

Same pairs, same decode + transforms (resize / random crop / flip to [-1, 1] tensors), same batch size, same
number of DataLoader workers, measured in one run:

- shards:  `PairDataset` over the shards `mmalign shards convert --from pickapic` wrote from the parquet;
- parquet, random access: a map-style dataset reading rows by index with pyarrow (the row group holding the row;
  one row group cached per worker), shuffled like a DistributedSampler would: how a `Dataset` over parquet reads;
- parquet, streaming: an IterableDataset over row groups split by worker (the best case for parquet).

Then it simulates a tiny-model training loop (a fixed step time per batch) and reports how long each step waited
for data. Prints samples/s and the ratios. Run: `python scripts/bench/data.py [--pairs 2000] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmalign.data import ConvertOptions, ImageTransforms, PairDataset, collate_pairs, convert_pickapic
from mmalign.data.collate import batch_buffer
from mmalign.data.transforms import sample_rng, to_pixel_values, transform_images

PICKAPIC_TYPES = [
    ("are_different", "bool"), ("best_image_uid", "string"), ("caption", "string"), ("created_at", "timestamp"),
    ("has_label", "bool"), ("image_0_uid", "string"), ("image_0_url", "string"), ("image_1_uid", "string"),
    ("image_1_url", "string"), ("jpg_0", "binary"), ("jpg_1", "binary"), ("label_0", "float64"),
    ("label_1", "float64"), ("model_0", "string"), ("model_1", "string"), ("ranking_id", "int64"),
    ("user_id", "int64"), ("num_example_per_prompt", "int64"),
]


def photo_like_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG with smooth structure plus texture, so it compresses like a generated image (~25 kB at 256 px)."""
    coarse = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noise = rng.integers(-16, 17, (size, size, 3), dtype=np.int16)
    img = (np.asarray(coarse, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_parquet(path: Path, pairs: int, size: int, row_group: int) -> None:
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"bool": pa.bool_(), "string": pa.string(), "timestamp": pa.timestamp("ns"), "binary": pa.binary(),
             "float64": pa.float64(), "int64": pa.int64()}
    schema = pa.schema([(n, types[t]) for n, t in PICKAPIC_TYPES])
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, pairs, row_group):
            rows = []
            for i in range(start, min(start + row_group, pairs)):
                l0 = float(i % 2)
                rows.append({
                    "are_different": True, "best_image_uid": f"{i}-{int(1 - l0)}", "caption": f"prompt number {i}",
                    "created_at": datetime.datetime(2023, 1, 1), "has_label": True, "image_0_uid": f"{i}-0",
                    "image_0_url": "", "image_1_uid": f"{i}-1", "image_1_url": "",
                    "jpg_0": photo_like_jpeg(rng, size), "jpg_1": photo_like_jpeg(rng, size), "label_0": l0,
                    "label_1": 1 - l0, "model_0": "a", "model_1": "b", "ranking_id": i, "user_id": 0,
                    "num_example_per_prompt": 1,
                })
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def _pair_from_row(row: dict, key: str, cfg: ImageTransforms, seed: int) -> dict:
    """The same work PairDataset does per sample: decode both JPEGs, one shared transform, winner first."""
    winner = 1 if row["label_0"] == 0.0 else 0
    images = [Image.open(io.BytesIO(row[f"jpg_{i}"])) for i in (winner, 1 - winner)]
    pixels, size, crop, _ = transform_images(images, cfg, sample_rng(seed, 0, key))
    return {"pixels": pixels, "original_size": size, "crop_top_left": crop, "caption": row["caption"]}


def collate_plain(samples: list[dict]) -> dict:
    """The same batch as collate_pairs (same float conversion into a shared buffer), minus the bookkeeping."""
    b = len(samples)
    rows = torch.stack([s["pixels"][0] for s in samples] + [s["pixels"][1] for s in samples])
    _, h, w, c = rows.shape
    return {"pixel_values": to_pixel_values(rows, out=batch_buffer((2 * b, c, h, w))),
            "captions": [s["caption"] for s in samples],
            "original_sizes": torch.tensor([s["original_size"] for s in samples]),
            "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples])}


class ParquetRandomAccess(Dataset):
    """Map-style dataset over a parquet file: row i is read from its row group (one row group cached)."""

    COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0"]

    def __init__(self, path: Path, cfg: ImageTransforms):
        import pyarrow.parquet as pq

        self.path, self.cfg = path, cfg
        meta = pq.ParquetFile(path).metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._pf = None
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        import pyarrow.parquet as pq

        if self._pf is None:
            self._pf = pq.ParquetFile(self.path)
        g = int(np.searchsorted(self.starts, i, side="right") - 1)
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self._pf.read_row_group(g, columns=self.COLUMNS).to_pylist())
        row = self._cached[1][i - int(self.starts[g])]
        return _pair_from_row(row, str(i), self.cfg, 0)


class ParquetStream(IterableDataset):
    """Iterable dataset over parquet row groups, row groups split across workers."""

    def __init__(self, path: Path, cfg: ImageTransforms):
        self.path, self.cfg = path, cfg

    def __iter__(self):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for g in range(wid, pf.metadata.num_row_groups, nw):
            for j, row in enumerate(pf.read_row_group(g, columns=ParquetRandomAccess.COLUMNS).to_pylist()):
                yield _pair_from_row(row, f"{g}-{j}", self.cfg, 0)


def time_loader(loader: DataLoader, warmup_batches: int = 3) -> tuple[float, int]:
    """Samples per second after the first `warmup_batches` (worker start-up excluded)."""
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += batch["pixel_values"].shape[0] // 2
    return n / (time.perf_counter() - t0), n


def data_wait(loader: DataLoader, step_s: float, steps: int) -> tuple[float, float]:
    """Simulate a training loop with a fixed step time; returns (mean, max) seconds spent waiting for a batch."""
    it = iter(loader)
    next(it)  # worker start-up is not a training step
    waits = []
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)
    return float(np.mean(waits)), float(np.max(waits))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="stored image size (px)")
    p.add_argument("--resolution", type=int, default=256, help="transform output size (px)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--row-group", type=int, default=100, help="parquet rows per row group (HF writes 100 for images)")
    p.add_argument("--step-s", type=float, default=0.13,
                   help="simulated tiny-model step time (Diffusion-DPO, 4 pairs at 32 px on 2 CPU cores)")
    p.add_argument("--step-pairs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per reader (best is reported)")
    p.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    args = p.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmalign-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parquet = work / "pickapic-bench.parquet"
        if not parquet.exists():
            t0 = time.perf_counter()
            write_parquet(parquet, args.pairs, args.size, args.row_group)
            print(f"wrote {args.pairs} pairs of {args.size}-px JPEGs to parquet in {time.perf_counter() - t0:.1f} s "
                  f"({parquet.stat().st_size / 2**20:.1f} MiB)")
        shards = work / "shards"
        t0 = time.perf_counter()
        man = convert_pickapic([parquet], shards,
                               options=ConvertOptions(max_count=250, overwrite=True, progress=False))
        conv_s = time.perf_counter() - t0
        print(f"converted to {len(man.shards)} shards in {conv_s:.1f} s ({man.num_samples / conv_s:.0f} pairs/s)")

        cfg = ImageTransforms(resolution=args.resolution, crop="random", random_flip=True)
        common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=False)
        shard_ds = PairDataset(shards, transforms=cfg, shuffle=True, shuffle_buffer=256, seed=0)
        loaders = {
            "shards (PairDataset)": lambda: DataLoader(shard_ds, collate_fn=collate_pairs, **common),
            "parquet, random access": lambda: DataLoader(ParquetRandomAccess(parquet, cfg), shuffle=True,
                                                         collate_fn=collate_plain, **common),
            "parquet, streaming": lambda: DataLoader(ParquetStream(parquet, cfg), collate_fn=collate_plain, **common),
        }
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in loaders}
        for _ in range(args.repeats):  # interleaved, so that caches and machine load affect all alike
            for name, make in loaders.items():
                runs[name].append(time_loader(make()))
        results = {name: max(r) for name, r in runs.items()}  # best of the repeats

        print(f"\nreading {args.size}-px JPEG pairs -> {args.resolution}-px tensors, decode + random crop + flip, "
              f"batch {args.batch_size}, {args.workers} workers, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        base = results["shards (PairDataset)"][0]
        for name, (rate, n) in results.items():
            ratio = "" if name.startswith("shards") else f"   shards are {base / rate:.2f}x this"
            spread = ", ".join(f"{r:.0f}" for r, _ in runs[name])
            print(f"  {name:28s} {rate:8.1f} pairs/s  (epochs: {spread}; {n} pairs timed each){ratio}")

        need = args.step_pairs / args.step_s
        steps = max(10, min(40, math.ceil(3.0 / args.step_s)))
        mean_w, max_w = data_wait(DataLoader(shard_ds, batch_size=args.step_pairs, num_workers=args.workers,
                                             collate_fn=collate_pairs), args.step_s, steps)
        print(f"\ntiny-model loop: {args.step_pairs} pairs per {args.step_s * 1000:.0f} ms step needs {need:.0f} "
              f"pairs/s; shards deliver {base:.0f} ({base / need:.0f}x headroom); measured wait for data over "
              f"{steps} steps: mean {mean_w * 1000:.2f} ms, max {max_w * 1000:.2f} ms")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
