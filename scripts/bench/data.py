"""Benchmark: reading 256-px JPEG preference pairs from shards vs from a Pick-a-Pic-style parquet, in one run.

Every reader does the same work per pair: decode both JPEGs (PIL), one shared transform (resize, random crop,
flip; `mmalign.data.transforms.transform_images`, so any decode option such as `--jpeg-draft` applies to all
readers alike), and the same batch conversion to float [-1, 1] in shared memory (`to_pixel_values`), with the
same batch size and number of DataLoader workers. What differs is only where the encoded pairs come from:

- shards: `PairDataset` over the shards `convert_pickapic` wrote from the parquet (shard order shuffled per epoch,
  samples shuffled in windows of 256, split by worker);
- parquet, streaming: the parquet read row group by row group, groups in a shuffled order split across workers,
  rows shuffled in windows of 256: the same shuffling as the shard reader, the best a parquet reader can do;
- arrow memory map, random access: the table converted once to an uncompressed Arrow IPC file and memory-mapped
  (what `datasets.load_dataset("parquet")` builds and reads), one row per index, DataLoader `shuffle=True`;
- parquet, random access: a map-style dataset reading the row group that holds row i (the last one cached) and
  converting that one row, DataLoader `shuffle=True` (a `Dataset` straight over the parquet files).

It prints, for each reader, pairs/s (best of `--repeats` interleaved epochs, after the first batches: worker
start-up is reported separately) and CPU milliseconds per pair (this process plus its DataLoader workers, over
whole epochs), and the ratios of both. On a machine shared with other jobs the wall-clock rates swing with their
load while CPU time per pair hardly does; on an idle machine with as many cores as workers, the rate is
workers / (CPU s per pair). Then a single-process profile (CPU time) of where one pair's time goes, stage by
stage, for shards and for parquet: it bounds the ratio any reader can reach when both decode the same JPEGs.

Last, a tiny-model training loop: the step time of the tiny Diffusion-DPO step is measured with
`scripts/bench/t2i_step.py` (naive variant: it consumes pixels; or given with `--step-s`), then the shard reader
feeds a loop whose step lasts that long, twice: sleeping (a GPU step: the CPU is free for the workers) and keeping
the CPU busy (a CPU-only machine, where the step competes with the workers); the time each step waited for its
batch is reported. Then the real thing: `mmalign train` on the tiny Diffusion-DPO recipe (`configs/tiny/t2i_dpo.yaml`,
validation and checkpoints off) reading these 256-px JPEG shards with 2 DataLoader workers, and the recipe as
shipped (its 32-px PNG toy pairs, read in the training process); the trainer logs `time/data_wait` and
`time/data_wait_fraction` every step, and the bench reports them after `--warmup-steps` (worker start-up).

    python scripts/bench/data.py [--pairs 2000] [--workers 2] [--size 256] [--resolution 256] [--jpeg-draft]
                                 [--pixels float|uint8] [--step-s S] [--train-loop-only]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmalign.data import ConvertOptions, ImageTransforms, PairDataset, collate_pairs, convert_pickapic
from mmalign.data.collate import _pixel_batch
from mmalign.data.schemas import check_sample
from mmalign.data.tario import read_shard
from mmalign.data.transforms import sample_rng, to_pixel_values, transform_images

PICKAPIC_TYPES = [
    ("are_different", "bool"), ("best_image_uid", "string"), ("caption", "string"), ("created_at", "timestamp"),
    ("has_label", "bool"), ("image_0_uid", "string"), ("image_0_url", "string"), ("image_1_uid", "string"),
    ("image_1_url", "string"), ("jpg_0", "binary"), ("jpg_1", "binary"), ("label_0", "float64"),
    ("label_1", "float64"), ("model_0", "string"), ("model_1", "string"), ("ranking_id", "int64"),
    ("user_id", "int64"), ("num_example_per_prompt", "int64"),
]
COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0"]
WINDOW = 256  # shuffle window of the shard reader and of the streaming parquet reader


def photo_like_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG with smooth structure plus texture, so it compresses like a generated image (~22 kB at 256 px)."""
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


def write_arrow(parquet: Path, path: Path) -> None:
    """The uncompressed Arrow IPC file that `datasets` builds from parquet (its cache), in record batches of 100."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(parquet)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=100):
            writer.write_batch(batch)


# -- the per-pair work every reader shares -----------------------------------------------------------------------
def pair_from_row(row: dict, key: str, cfg: ImageTransforms, seed: int = 0) -> dict:
    """What PairDataset does per sample: decode both JPEGs, one shared transform, winner first."""
    winner = 1 if row["label_0"] == 0.0 else 0
    images = [Image.open(io.BytesIO(row[f"jpg_{i}"])) for i in (winner, 1 - winner)]
    pixels, size, crop, _ = transform_images(images, cfg, sample_rng(seed, 0, key))
    return {"pixels": pixels, "original_size": size, "crop_top_left": crop, "caption": row["caption"]}


def collate_plain(samples: list[dict], pixels: str = "float") -> dict:
    """The batch collate_pairs makes (its very pixel code: one conversion into a shared buffer), minus its
    bookkeeping (keys, provenance, resume cursor)."""
    name, value = _pixel_batch([s["pixels"][0] for s in samples] + [s["pixels"][1] for s in samples], pixels)
    return {name: value, "captions": [s["caption"] for s in samples],
            "original_sizes": torch.tensor([s["original_size"] for s in samples]),
            "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples])}


# -- parquet / arrow readers -------------------------------------------------------------------------------------
class ParquetStream(IterableDataset):
    """Row groups in a seeded shuffled order split across workers, rows shuffled in windows of WINDOW."""

    def __init__(self, path: Path, cfg: ImageTransforms, seed: int = 0):
        self.path, self.cfg, self.seed = path, cfg, seed

    def __iter__(self):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        groups = list(range(pf.metadata.num_row_groups))
        random.Random(self.seed).shuffle(groups)
        rng = random.Random(f"{self.seed}:{wid}")
        window: list[tuple[str, dict]] = []
        for g in groups[wid::nw]:
            for j, row in enumerate(pf.read_row_group(g, columns=COLUMNS).to_pylist()):
                window.append((f"{g}-{j}", row))
                if len(window) == WINDOW:
                    rng.shuffle(window)
                    yield from (pair_from_row(r, k, self.cfg) for k, r in window)
                    window = []
        rng.shuffle(window)
        yield from (pair_from_row(r, k, self.cfg) for k, r in window)


class ArrowMapped(Dataset):
    """Random access into a memory-mapped Arrow IPC file: one row sliced out per index (zero-copy until Python)."""

    def __init__(self, path: Path, cfg: ImageTransforms):
        import pyarrow as pa

        self.path, self.cfg = path, cfg
        with pa.memory_map(str(path)) as source:
            self.n = pa.ipc.open_file(source).read_all().num_rows
        self._table = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import pyarrow as pa

        if self._table is None:  # opened in the worker
            self._table = pa.ipc.open_file(pa.memory_map(str(self.path))).read_all().select(COLUMNS)
        return pair_from_row(self._table.slice(i, 1).to_pylist()[0], str(i), self.cfg)


class ParquetRandomAccess(Dataset):
    """Map-style over the parquet: row i comes from its row group (the last group read is kept)."""

    def __init__(self, path: Path, cfg: ImageTransforms):
        import pyarrow.parquet as pq

        self.path, self.cfg = path, cfg
        meta = pq.ParquetFile(path).metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._pf = None
        self._cached: tuple[int, object] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        import pyarrow.parquet as pq

        if self._pf is None:
            self._pf = pq.ParquetFile(self.path)
        g = int(np.searchsorted(self.starts, i, side="right") - 1)
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self._pf.read_row_group(g, columns=COLUMNS))
        row = self._cached[1].slice(i - int(self.starts[g]), 1).to_pylist()[0]
        return pair_from_row(row, str(i), self.cfg)


# -- measuring ---------------------------------------------------------------------------------------------------
def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process, and of its children that have exited (DataLoader workers are
    joined at the end of an epoch when persistent_workers=False)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def time_loader(loader: DataLoader, warmup_batches: int = 3) -> tuple[float, float, float, int, float]:
    """One epoch: (pairs/s after the first `warmup_batches`, seconds to the first batch, CPU seconds per pair over
    the whole epoch (workers and this process), pairs timed, the workers' share of that CPU time)."""
    (main0, kids0), t_start = cpu_seconds(), time.perf_counter()
    it = iter(loader)
    total = len(next(it)["captions"])
    first = time.perf_counter() - t_start
    for _ in range(warmup_batches - 1):
        total += len(next(it)["captions"])
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["captions"])
        if "pixels" in batch:  # uint8 batches: the consumer converts (here on the CPU, counted)
            to_pixel_values(batch["pixels"])
    wall = time.perf_counter() - t0
    main1, kids1 = cpu_seconds()
    cpu = (main1 - main0) + (kids1 - kids0)
    return n / wall, first, cpu / (total + n), n, (kids1 - kids0) / cpu


def profile_stages(shards: Path, parquet: Path, cfg: ImageTransforms, pairs: int, batch: int,
                   repeats: int = 3) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """CPU microseconds per pair of each stage in one process on one thread: (shard-only stages, parquet-only stages,
    stages both share). The source stages are timed `repeats` times, interleaved, best kept; the shared stages
    (the same JPEG bytes, decoded and transformed the same way) once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile_stages(shards, parquet, cfg, pairs, batch, repeats)
    finally:
        torch.set_num_threads(threads)


def _timed(fn) -> tuple[object, float]:
    """(result, CPU seconds of this process): CPU time, unlike wall time, does not grow with other jobs' load."""
    t0 = time.process_time()
    result = fn()
    return result, time.process_time() - t0


def _profile_stages(shards: Path, parquet: Path, cfg: ImageTransforms, pairs: int, batch: int, repeats: int):
    import pyarrow.parquet as pq

    def read_tar():
        raws = []
        for tar in sorted(shards.glob("shard-*.tar")):
            raws.extend(read_shard(str(tar)))
            if len(raws) >= pairs:
                break
        return raws[:pairs]

    def check(raws):
        return [check_sample("pair", {k: v for k, v in r.items() if not k.startswith("__")})[1] for r in raws]

    def read_parquet():
        pf = pq.ParquetFile(parquet)
        rows = []
        for g in range(pf.metadata.num_row_groups):
            rows.extend(pf.read_row_group(g, columns=COLUMNS).to_pylist())
            if len(rows) >= pairs:
                break
        return rows[:pairs]

    best = {"tar": math.inf, "check": math.inf, "parquet": math.inf}
    for _ in range(repeats):
        raws, t = _timed(read_tar)
        best["tar"] = min(best["tar"], t)
        _, t = _timed(lambda: check(raws))
        best["check"] = min(best["check"], t)
        _, t = _timed(read_parquet)
        best["parquet"] = min(best["parquet"], t)
    n = len(raws)

    def decode():
        out = []
        for r in raws:
            pair = [Image.open(io.BytesIO(r[s])) for s in ("0.jpg", "1.jpg")]
            for im in pair:
                if cfg.jpeg_draft and im.format == "JPEG":
                    im.draft("RGB", cfg.size[::-1])
                im.load()
            out.append(pair)
        return out

    images, t_decode = _timed(decode)
    samples, t_transform = _timed(lambda: [transform_images(p, cfg, sample_rng(0, 0, str(i)))[0]
                                           for i, p in enumerate(images)])
    _, t_batch = _timed(lambda: [
        to_pixel_values(torch.stack([s[0] for s in samples[i:i + batch]] + [s[1] for s in samples[i:i + batch]]))
        for i in range(0, n, batch)])
    us = 1e6 / n
    return ({"read + parse tar": best["tar"] * us, "check sample (JSON, schema)": best["check"] * us},
            {"read row groups + to_pylist": best["parquet"] * us},
            {"JPEG header + decode (2 images)": t_decode * us, "resize / crop / flip to uint8": t_transform * us,
             "batch to float [-1, 1]": t_batch * us})


def tiny_step_seconds(pairs: int, resolution: int) -> float:
    """Seconds per tiny Diffusion-DPO step of the variant that consumes pixels (naive: VAE and text encoder every
    step), from the table `scripts/bench/t2i_step.py` prints."""
    cmd = [sys.executable, str(Path(__file__).with_name("t2i_step.py")), "--batch", str(pairs), "--resolution",
           str(resolution), "--steps", "5", "--warmup", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("naive")]
    if out.returncode or not rows:
        sys.exit(f"measuring the tiny step with t2i_step.py failed; pass --step-s:\n{(out.stderr or out.stdout)[-3000:]}")
    return float(rows[0][1])


def data_wait(loader: DataLoader, step_s: float, steps: int, busy: bool) -> list[float]:
    """A training loop whose step lasts `step_s`, keeping this process's CPU busy (`busy`: a CPU-only machine) or
    sleeping (a GPU step: the CPU is free for the workers); returns the seconds each step waited for data."""
    it = iter(loader)
    next(it)  # worker start-up is not a training step
    a = torch.randn(256, 256)
    waits = []
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t0)
        if not busy:
            time.sleep(step_s)
            continue
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:
            a = torch.tanh(a @ a)
    return waits


def trainer_data_wait(shards: Path | None, workers: int, steps: int, warmup: int, out: Path,
                      resolution: int = 32, pairs: int = 4) -> dict[str, float]:
    """`mmalign train configs/tiny/t2i_dpo.yaml` (validation and checkpoints off) for `steps` steps on `shards`
    (None: the recipe's own toy pairs) with `workers` DataLoader workers; the trainer's own per-step
    `time/data_wait` and `time/step`, summed over the steps after the first `warmup`."""
    from mmalign.train.metrics import read_metrics
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    root = Path(__file__).resolve().parents[2]
    overrides = [f"run.output_dir={out}", "run.overwrite=true", f"train.max_steps={steps}", "train.log_every=1",
                 "train.checkpoint_every=0", "train.progress=false", "validation.prompts=[]",
                 f"data.num_workers={workers}", f"data.resolution={resolution}", f"train.batch_size={pairs}"]
    if shards is not None:
        overrides.append(f"data.shards={shards}")
    cfg = load_train_config(root / "configs" / "tiny" / "t2i_dpo.yaml", overrides)
    cfg.model.pretrained = str(root / cfg.model.pretrained)
    if shards is None:
        cfg.data.shards = str(root / cfg.data.shards)
    train(cfg)
    rows = [r for r in read_metrics(out) if r["step"] > warmup]
    wait, step = sum(r["time/data_wait"] for r in rows), sum(r["time/step"] for r in rows)
    return {"steps": len(rows), "step_ms": 1000 * step / len(rows), "wait_ms": 1000 * wait / len(rows),
            "max_wait_ms": 1000 * max(r["time/data_wait"] for r in rows), "fraction": wait / step,
            "waited_10pct": sum(r["time/data_wait_fraction"] > 0.1 for r in rows)}


def print_trainer_data_wait(args, shards: Path, work: Path) -> None:
    print(f"\nmmalign train configs/tiny/t2i_dpo.yaml, {args.train_steps} steps ({args.step_pairs} pairs at "
          f"{args.step_resolution} px per step), the trainer's time/data_wait after {args.warmup_steps} warm-up "
          "steps:")
    runs = ((f"{args.size}-px JPEG shards, {args.workers} workers", shards, args.workers),
            ("the recipe's 32-px PNG toy pairs, no workers", None, 0))
    for label, source, workers in runs:
        r = trainer_data_wait(source, workers, args.train_steps, args.warmup_steps, work / "train-run",
                              args.step_resolution, args.step_pairs)
        print(f"  {label:44s} step {r['step_ms']:6.1f} ms, data wait mean {r['wait_ms']:5.2f} ms, max "
              f"{r['max_wait_ms']:6.2f} ms: {r['fraction']:.2%} of step time; steps waiting over 10%: "
              f"{r['waited_10pct']} of {r['steps']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="stored image size (px)")
    p.add_argument("--resolution", type=int, default=256, help="transform output size (px)")
    p.add_argument("--jpeg-draft", action="store_true", help="ImageTransforms(jpeg_draft=True) for every reader")
    p.add_argument("--pixels", choices=("float", "uint8"), default="float",
                   help="batches of every reader: float pixel_values made in the workers (default), or uint8 "
                        "pixels converted by the consumer (collate_pairs(pixels='uint8'))")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--row-group", type=int, default=100, help="parquet rows per row group (HF writes 100 for images)")
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per reader (best is reported)")
    p.add_argument("--profile-pairs", type=int, default=400, help="pairs for the single-process stage profile")
    p.add_argument("--step-s", type=float, default=None, help="tiny step seconds (default: measure it)")
    p.add_argument("--step-pairs", type=int, default=4)
    p.add_argument("--step-resolution", type=int, default=32, help="resolution the tiny model trains at")
    p.add_argument("--steps", type=int, default=30, help="steps of the simulated training loop")
    p.add_argument("--skip-train-loop", action="store_true")
    p.add_argument("--train-steps", type=int, default=60, help="steps of each real tiny training run")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the data-wait figures")
    p.add_argument("--train-loop-only", action="store_true", help="only the real tiny training runs (after "
                                                                   "writing the shards)")
    p.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    args = p.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmalign-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parquet = work / f"pickapic-{args.pairs}-{args.size}.parquet"
        if not parquet.exists():
            t0 = time.perf_counter()
            write_parquet(parquet, args.pairs, args.size, args.row_group)
            print(f"wrote {args.pairs} pairs of {args.size}-px JPEGs to parquet in {time.perf_counter() - t0:.1f} s "
                  f"({parquet.stat().st_size / 2**20:.1f} MiB, {args.row_group} rows per row group)")
        shards = work / f"shards-{args.pairs}-{args.size}"
        t0 = time.perf_counter()
        man = convert_pickapic([parquet], shards, options=ConvertOptions(max_count=250, overwrite=True,
                                                                         progress=False))
        conv_s = time.perf_counter() - t0
        if args.train_loop_only:
            print_trainer_data_wait(args, shards, work)
            return 0
        arrow = work / f"{parquet.stem}.arrow"
        t0 = time.perf_counter()
        write_arrow(parquet, arrow)
        arrow_s = time.perf_counter() - t0
        print(f"converted to {len(man.shards)} shards in {conv_s:.1f} s; to an Arrow file in {arrow_s:.1f} s")

        cfg = ImageTransforms(resolution=args.resolution, crop="random", random_flip=True, jpeg_draft=args.jpeg_draft)
        common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=False)
        shard_ds = PairDataset(shards, transforms=cfg, shuffle=True, shuffle_buffer=WINDOW, seed=0)
        shard_collate = partial(collate_pairs, pixels=args.pixels)
        plain = partial(collate_plain, pixels=args.pixels)
        loaders = {
            "shards (PairDataset)": lambda: DataLoader(shard_ds, collate_fn=shard_collate, **common),
            "parquet, streaming": lambda: DataLoader(ParquetStream(parquet, cfg), collate_fn=plain, **common),
            "arrow memory map, random": lambda: DataLoader(ArrowMapped(arrow, cfg), shuffle=True, collate_fn=plain,
                                                           **common),
            "parquet, random access": lambda: DataLoader(ParquetRandomAccess(parquet, cfg), shuffle=True,
                                                         collate_fn=plain, **common),
        }
        runs: dict[str, list[tuple[float, float, float, int, float]]] = {name: [] for name in loaders}
        for _ in range(args.repeats):  # interleaved, so that caches and machine load affect all alike
            for name, make in loaders.items():
                runs[name].append(time_loader(make()))

        print(f"\nreading {args.size}-px JPEG pairs -> {args.resolution}-px tensors (decode + random crop + flip"
              f"{', jpeg_draft' if args.jpeg_draft else ''}), batch {args.batch_size}, {args.workers} workers, "
              f"{args.pixels} batches, torch {torch.__version__}")
        # Wall-clock rates swing with the load of a shared machine; CPU time per pair (workers included) hardly
        # does, and on an otherwise idle machine with `workers` cores it sets the rate: workers / (CPU s per pair).
        base = {"wall": max(r[0] for r in runs["shards (PairDataset)"]),
                "cpu": min(r[2] for r in runs["shards (PairDataset)"])}
        print(f"  {'reader':26s} {'pairs/s':>8s} {'CPU ms/pair':>11s} {'in workers':>10s}   "
              f"{'shards faster (wall, CPU)':26s} epochs (pairs/s)")
        for name, r in runs.items():
            rate, (_, _, cpu, _, share) = max(x[0] for x in r), min(r, key=lambda x: x[2])
            ratio = "" if name.startswith("shards") else f"{base['wall'] / rate:.2f}x, {cpu / base['cpu']:.2f}x"
            epochs = ", ".join(f"{x[0]:.0f}" for x in r)
            print(f"  {name:26s} {rate:8.1f} {cpu * 1000:11.2f} {share:10.0%}   {ratio:26s} {epochs}")
        print(f"  (best of {args.repeats} interleaved epochs; first batch after "
              + ", ".join(f"{min(x[1] for x in r):.2f}" for r in runs.values()) + " s)")

        own_s, own_p, shared = profile_stages(shards, parquet, cfg, args.profile_pairs, args.batch_size)
        print(f"\nwhere one pair's time goes (CPU us per pair; one process, one thread, {args.profile_pairs} pairs):")
        for label, stages in (("shards only", own_s), ("parquet only", own_p), ("both", shared)):
            for stage, us in stages.items():
                print(f"  {label:13s} {stage:34s} {us:8.0f}")
        common_us = sum(shared.values())
        tot_s, tot_p = common_us + sum(own_s.values()), common_us + sum(own_p.values())
        print(f"  per pair: shards {tot_s:.0f} us, parquet {tot_p:.0f} us; decode + transform + batch conversion are "
              f"{common_us / tot_s:.0%} of the shard path, so on equal decode shards can be at most "
              f"{tot_p / common_us:.2f}x streaming parquet (with a free source); this profile predicts "
              f"{tot_p / tot_s:.2f}x")

        if not args.skip_train_loop:
            step_s = args.step_s if args.step_s is not None else tiny_step_seconds(args.step_pairs,
                                                                                   args.step_resolution)
            tiny_cfg = ImageTransforms(resolution=args.step_resolution, crop="random", random_flip=True)
            tiny_ds = PairDataset(shards, transforms=tiny_cfg, shuffle=True, shuffle_buffer=WINDOW, seed=0)
            rate, _, cpu, _, _ = time_loader(DataLoader(tiny_ds, collate_fn=shard_collate, **common))
            need = args.step_pairs / step_s
            steps = min(args.steps, args.pairs // args.step_pairs - 2)
            print(f"\ntiny-model loop: the tiny Diffusion-DPO step ({args.step_pairs} pairs at {args.step_resolution} "
                  f"px) takes {step_s * 1000:.0f} ms {'(given)' if args.step_s else '(measured by t2i_step.py)'}: "
                  f"{need:.1f} pairs/s needed; the shard reader delivers {rate:.0f} pairs/s at that resolution "
                  f"({rate / need:.0f}x) for {cpu * 1000:.1f} CPU ms per pair, {args.step_pairs * cpu / step_s:.1%} "
                  f"of one core per step")
            for busy in (False, True):
                waits = data_wait(DataLoader(tiny_ds, batch_size=args.step_pairs, num_workers=args.workers,
                                             collate_fn=shard_collate), step_s, steps, busy)
                kind = "CPU-busy step (CPU-only training)" if busy else "sleeping step (GPU training)"
                print(f"  {len(waits)} steps, {kind}: wait for data mean {np.mean(waits) * 1000:.1f} ms, max "
                      f"{np.max(waits) * 1000:.1f} ms ({np.mean(waits) / step_s:.1%} of a step); steps that waited "
                      f"over 10% of a step: {sum(w > 0.1 * step_s for w in waits)}")
            print_trainer_data_wait(args, shards, work)
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
