"""Readers: one torch IterableDataset per schema, over a shard set.

What every reader does, in order:

1. **Plan** which shards this rank and this DataLoader worker read (a *slot* = one (rank, worker)). Shards are
   put in a per-epoch order (shuffled with `(seed, epoch)` when `shuffle=True`, the same on every rank).
   With at least `world_size` shards, rank r reads shards `order[r::world_size]`; with fewer, every rank reads
   all shards and keeps every `world_size`-th sample. Within a rank the same rule splits between workers. So,
   without resampling, every sample is read exactly once per epoch across all ranks and workers, and a rank's
   share does not depend on its number of workers (`len()` is known from the manifest).
2. **Shuffle** (`shuffle=True`): each window of `shuffle_buffer` consecutive samples of the slot's stream is
   permuted with a generator seeded by `(seed, epoch, rank, worker, window)`. Unlike a reservoir buffer this is
   exactly resumable: position n of the stream is always the same sample.
3. **Decode and check** each sample against its schema; a corrupt or incomplete sample is skipped, counted and
   logged with its shard and key (`strict=True` raises `CorruptSampleError` instead).
4. **Transform** (images): resize / flip / crop shared by the images of a sample (`transforms.py`).

`resample=True` draws shards with replacement (weighted by their sample counts) independently in every slot,
for `epoch_length` samples per rank per epoch (forever when None).

Resuming: every sample carries its slot position; the collators put a `cursor` in each batch; a `DataCursor`
fed with the batches the trainer consumed gives a `state_dict()` that `load_state_dict()` turns back into the
exact continuation (same world size, rank, worker count and seed). Call `set_epoch(e)` before each epoch, as with
DistributedSampler. Use `persistent_workers=False` (the default): workers read the epoch and resume state when
the DataLoader iterator starts them.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmalign.data.cache import CacheInfo, decode_cache_entry, join_cache, open_cache
from mmalign.data.deps import require
from mmalign.data.manifest import ShardSource, open_source
from mmalign.data.schemas import SampleError, check_code_arrays, check_sample, load_npy
from mmalign.data.tario import read_shard
from mmalign.data.transforms import ImageTransforms, sample_rng, transform_images
from mmalign.data.video import FrameSampling, have_decord, read_frames

logger = logging.getLogger("mmalign.data")

# Exceptions that mean a bug in code, not bad data: never swallowed as "corrupt sample".
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError)


class CorruptSampleError(RuntimeError):
    """Raised with `strict=True` for a sample that cannot be read; names the shard, the key and the reason."""

    def __init__(self, shard: str, key: str | None = None, reason: str | None = None):
        # One argument: a whole message (how torch's DataLoader rebuilds the error raised in a worker process).
        super().__init__(shard if key is None else f"{shard}: sample {key!r}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    @classmethod
    def from_worker(cls, err: "CorruptSampleError") -> "CorruptSampleError":
        """The error a DataLoader worker raised, as one line: torch re-raises it in the training process with the
        worker's traceback as its message, whose last line is the original error."""
        text = str(err)
        if "DataLoader worker" not in text:
            return err
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return cls(last.split("CorruptSampleError: ", 1)[-1])


SKIP_STAGES = ("unreadable", "schema", "decode", "cache", "unsafe", "too_large", "duplicate")
_MAX_WORKER_ROWS = 64


@dataclass
class SkipCounter:
    """Bad samples skipped: `skipped` in total, `reasons` by stage (unreadable shard tail, schema, decode, cache,
    unsafe member, too_large member, duplicate key)."""

    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)


def n_congruent(lo: int, hi: int, m: int, r: int) -> int:
    """How many x in [lo, hi) have x % m == r."""
    if hi <= lo:
        return 0
    return (hi - 1 - r) // m - (lo - 1 - r) // m


def resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else RANK / WORLD_SIZE (torchrun), else (0, 1)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both rank and world_size, or neither")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class _Slot:
    epoch: int
    rank: int
    world: int
    worker: int  # logical worker (rotated on resume so the batch order continues exactly)
    num_workers: int
    start: int  # stream positions already consumed
    yielded: int  # samples already yielded (for the resampled epoch length)


class ShardDataset(IterableDataset):
    """Base reader; use the schema readers (`PairDataset`, ...). See the module docstring for the semantics.

    Args:
        source: a shard-set folder (with manifest.json), a manifest path / URL, or shard URLs (then `schema`
            comes from the reader and lengths are unknown).
        shuffle: shuffle shard order per epoch and samples within windows of `shuffle_buffer`.
        seed: seeds shard order, windows, resampling and random transforms; the same on every rank.
        resample: draw shards with replacement; `epoch_length` samples per rank per epoch (None: endless).
        split: "auto" (shards when there are enough, else samples), "shard" (error if too few shards) or
            "sample" (every slot reads every shard and keeps its share: equal counts, more I/O).
        rank, world_size: override torch.distributed / RANK, WORLD_SIZE (tests, custom launchers).
        strict: raise CorruptSampleError on a bad sample instead of skipping it.
        caches: {cache name: producer dict or cache key}; adds `sample["cache"][name]` (see cache.py).
        cache_root: the folder holding the caches, if not `<shards>/cache` (see cache.py).
        allow_pipe, allow_network: permit `pipe:` and network URLs (refused by default).
        max_member_bytes: a sample with a tar member larger than this is skipped unread (stage `too_large`);
            None: `mmalign.data.tario.MAX_MEMBER_BYTES` (512 MiB, or `MMALIGN_MAX_MEMBER_BYTES`).
    """

    schema: ClassVar[str] = ""

    def __init__(self, source, *, shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 resample: bool = False, epoch_length: int | None = None,
                 split: Literal["auto", "shard", "sample"] = "auto", rank: int | None = None,
                 world_size: int | None = None, strict: bool = False, caches: dict[str, Any] | None = None,
                 cache_root: str | os.PathLike | None = None, allow_pipe: bool = False, allow_network: bool = False,
                 max_member_bytes: int | None = None):
        super().__init__()
        self.source: ShardSource = open_source(source, schema=self.schema, allow_pipe=allow_pipe,
                                               allow_network=allow_network)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be 'auto', 'shard' or 'sample', got {split!r}")
        if epoch_length is not None and not resample:
            raise ValueError("epoch_length is for resample=True; without resampling an epoch is one pass")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
        resolve_rank_world(rank, world_size)  # validate now, resolve again at iteration time
        if max_member_bytes is not None and max_member_bytes < 1:
            raise ValueError(f"max_member_bytes must be >= 1, got {max_member_bytes}")
        self.max_member_bytes = max_member_bytes
        self._key_ranges = _manifest_key_ranges(self.source)
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, int(seed)
        self.resample, self.epoch_length, self.split = resample, epoch_length, split
        self.rank, self.world_size, self.strict = rank, world_size, strict
        self.caches: list[CacheInfo] = []
        for name, producer in (caches or {}).items():
            if self.source.root is None:
                raise ValueError("caches need a local shard-set folder with a manifest")
            self.caches.append(open_cache(self.source.root, name, producer, self.source.manifest, cache_root))
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        # One row per DataLoader worker in shared memory: workers (forked or spawned) count into it, so the
        # process that owns the dataset sees every skip, also those after a worker's last batch.
        self._skip_counts = torch.zeros((_MAX_WORKER_ROWS, len(SKIP_STAGES)), dtype=torch.int64).share_memory_()

    @property
    def stats(self) -> SkipCounter:
        """Bad samples skipped so far by this dataset, over all its DataLoader workers and epochs."""
        totals = self._skip_counts.sum(0).tolist()
        return SkipCounter(sum(totals), Counter({s: n for s, n in zip(SKIP_STAGES, totals) if n}))

    # -- epochs and resume -----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, windows, random transforms). Drops a resume state of another epoch."""
        self.epoch = int(epoch)
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `DataCursor.state_dict()` says this rank stopped (sets the epoch too)."""
        needed = {"epoch", "seed", "rank", "world_size", "num_workers", "workers", "next_worker"}
        missing = needed - set(state)
        if missing:
            raise ValueError(f"data state lacks {sorted(missing)}; pass DataCursor.state_dict()")
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this dataset has seed {self.seed}")
        rank, world = resolve_rank_world(self.rank, self.world_size)
        if (state["rank"], state["world_size"]) != (rank, world):
            raise ValueError(f"data state is for rank {state['rank']} of {state['world_size']}, this process is "
                             f"rank {rank} of {world}; resume with the same world size")
        self.epoch = int(state["epoch"])
        self._resume = dict(state)

    # -- planning --------------------------------------------------------------------------------------------
    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.source.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)
        return order

    def _plan(self, epoch: int, rank: int, world: int, worker: int, num_workers: int):
        """Shards of this slot and the per-sample filters.

        Returns (shards, rank_mod, worker_mod, starts): `rank_mod` = (world, rank) filters on the global index g
        over the epoch's shard order, `worker_mod` = (num_workers, worker) filters on the rank-local index i;
        `starts[s]` = (g, i) at the start of shard s when the manifest gives counts, else None.
        """
        n = len(self.source.urls)
        counts = self.source.counts
        order = self._shard_order(epoch)
        if self.split == "shard" and n < world * num_workers:
            raise ValueError(f"split='shard' needs at least world_size x num_workers = {world * num_workers} "
                             f"shards, {self.source.description} has {n}; use split='auto' or write more shards")
        rank_by_shard = self.split != "sample" and n >= world
        rank_shards = order[rank::world] if rank_by_shard else order
        worker_by_shard = (self.split != "sample" and len(rank_shards) >= num_workers
                           and (rank_by_shard or counts is not None))
        starts = None
        if counts is not None:
            starts, g = {}, 0
            g_at = {}
            for s in order:
                g_at[s] = g
                g += counts[s]
            i = 0
            for s in rank_shards:
                starts[s] = (g_at[s], i)
                i += counts[s] if rank_by_shard else n_congruent(g_at[s], g_at[s] + counts[s], world, rank)
        shards = rank_shards[worker::num_workers] if worker_by_shard else rank_shards
        return (shards, None if rank_by_shard else (world, rank),
                None if worker_by_shard else (num_workers, worker), starts)

    def _read(self, s: int) -> Iterator[dict[str, Any]]:
        """Raw samples of shard s, joined with the requested caches."""
        name = self.source.names[s]
        items = _mark_duplicates(read_shard(self.source.urls[s], name, max_member_bytes=self.max_member_bytes),
                                 self._key_ranges[s] if self._key_ranges else None)
        for info in self.caches:
            items = join_cache(items, read_shard(str(info.dir / name), name, max_member_bytes=self.max_member_bytes),
                               info)
        return items

    def _slot_stream(self, slot: _Slot, skip: int) -> Iterator[dict[str, Any]]:
        """The slot's raw samples in stream order, without the first `skip` (whole shards skipped unread when the
        manifest gives their counts)."""
        counts = self.source.counts
        if self.resample:
            n = len(self.source.urls)
            if n == 0 or (counts is not None and sum(counts) == 0):
                return
            rng = random.Random(f"{self.seed}:{slot.epoch}:{slot.rank}:{slot.worker}:resample")
            empty_draws = 0
            while empty_draws < 4 * n:  # only reached when every shard reads as empty
                s = rng.choices(range(n), weights=counts)[0]
                if counts is not None and skip >= counts[s] > 0:
                    skip -= counts[s]
                    continue
                empty_draws += 1
                for raw in self._read(s):
                    empty_draws = 0
                    if skip:
                        skip -= 1
                        continue
                    yield raw
            return
        shards, rank_mod, worker_mod, starts = self._plan(slot.epoch, slot.rank, slot.world, slot.worker,
                                                          slot.num_workers)
        g = i = 0
        for s in shards:
            if starts is not None:
                g, i = starts[s]
                if skip:
                    kept = counts[s] if rank_mod is None else n_congruent(g, g + counts[s], *rank_mod)
                    if worker_mod is not None:
                        kept = n_congruent(i, i + kept, *worker_mod)
                    if skip >= kept:
                        skip -= kept
                        continue
            for raw in self._read(s):
                if rank_mod is not None:
                    g += 1
                    if (g - 1) % rank_mod[0] != rank_mod[1]:
                        continue
                if worker_mod is not None:
                    i += 1
                    if (i - 1) % worker_mod[0] != worker_mod[1]:
                        continue
                if skip:
                    skip -= 1
                    continue
                yield raw

    def _positions(self, slot: _Slot) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, raw sample) after the window shuffle, starting after position `slot.start`."""
        window = self.shuffle_buffer if self.shuffle else 1
        first_window = slot.start // window
        raw = self._slot_stream(slot, first_window * window)
        pos = first_window * window
        for w in itertools.count(first_window):
            block = list(itertools.islice(raw, window))
            if not block:
                return
            if window > 1:
                random.Random(f"{self.seed}:{slot.epoch}:{slot.rank}:{slot.worker}:window{w}").shuffle(block)
            for item in block:
                pos += 1
                if pos > slot.start:
                    yield pos, item

    def _slot(self) -> _Slot:
        rank, world = resolve_rank_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = yielded = 0
        state = self._resume
        if state is not None and state["epoch"] == self.epoch:
            if state["num_workers"] != num_workers:
                raise ValueError(f"data state was saved with {state['num_workers']} DataLoader workers, this "
                                 f"loader has {num_workers}; resume with the same num_workers")
            worker = (worker + state["next_worker"]) % num_workers
            start, yielded = state["workers"].get(str(worker), (0, 0))
        return _Slot(self.epoch, rank, world, worker, num_workers, start, yielded)

    # -- iteration -------------------------------------------------------------------------------------------
    def _quota(self, slot: _Slot) -> int | None:
        if not self.resample or self.epoch_length is None:
            return None
        base, extra = divmod(self.epoch_length, slot.num_workers)
        return base + (1 if slot.worker < extra else 0)

    def _skip(self, raw: dict[str, Any], stage: str, reason: str, pending: Counter) -> None:
        shard, key = raw.get("__shard__", "?"), raw.get("__key__", "?")
        if self.strict:
            raise CorruptSampleError(shard, key, reason)
        if stage == "unreadable":
            logger.warning("skipping the rest of %s: %s", shard, reason)
        else:
            logger.warning("skipping sample %r in %s (%s): %s", key, shard, stage, reason)
        info = get_worker_info()
        self._skip_counts[(info.id if info else 0) % _MAX_WORKER_ROWS, SKIP_STAGES.index(stage)] += 1
        pending[stage] += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = self._slot()
        quota = self._quota(slot)
        yielded = slot.yielded
        pending: Counter = Counter()
        for pos, raw in self._positions(slot):
            if quota is not None and yielded >= quota:
                return
            if "__error__" in raw:
                self._skip(raw, "unreadable", raw["__error__"], pending)
                continue
            refused = next((stage for stage in ("unsafe", "too_large", "duplicate") if f"__{stage}__" in raw), None)
            if refused is not None:
                self._skip(raw, refused, raw[f"__{refused}__"], pending)
                continue
            if "__cache_error__" in raw:
                self._skip(raw, "cache", raw["__cache_error__"], pending)
                continue
            files = {k: v for k, v in raw.items() if not k.startswith("__")}
            try:
                if "__invalid__" in raw:
                    raise SampleError(raw["__invalid__"])
                lay, meta = check_sample(self.schema, files)
            except SampleError as err:
                self._skip(raw, "schema", err.reason, pending)
                continue
            try:
                sample = self._decode(raw, lay, meta, slot.epoch)
                if sample is not None and self.caches:
                    sample["cache"] = {c.name: decode_cache_entry(c, raw["__cache__"][c.name]) for c in self.caches}
            except _PROGRAMMING_ERRORS:
                raise
            except Exception as err:  # PIL, numpy, PyAV and zlib all raise their own types for bad bytes
                reason = err.reason if isinstance(err, SampleError) else f"{type(err).__name__}: {err}"
                self._skip(raw, "decode", reason, pending)
                continue
            if sample is None:  # filtered by an option (e.g. ties="drop"), not bad
                continue
            yielded += 1
            sample.update({
                "__key__": raw["__key__"], "__shard__": raw["__shard__"], "__epoch__": slot.epoch,
                "__pos__": pos, "__yielded__": yielded, "__worker__": slot.worker,
                "__num_workers__": slot.num_workers, "__rank__": slot.rank, "__world_size__": slot.world,
                "__seed__": self.seed, "__skipped__": sum(pending.values()), "__skip_reasons__": dict(pending),
            })
            pending = Counter()
            yield sample

    def __len__(self) -> int:
        """Samples this rank yields per epoch, from the manifest (no scan): exact unless samples are corrupt, or
        ties are dropped with a sample-level split (then the rank's share of ties is estimated)."""
        if self.resample:
            if self.epoch_length is None:
                raise TypeError("an endless resampled dataset has no length; pass epoch_length")
            return self.epoch_length
        counts = self.source.counts
        if counts is None:
            raise TypeError(f"{self.source.description}: length unknown without a manifest")
        rank, world = resolve_rank_world(self.rank, self.world_size)
        shards, rank_mod, _, starts = self._plan(self.epoch, rank, world, 0, 1)
        drop = self._dropped_per_shard()
        total = 0.0
        for s in shards:
            g = starts[s][0]
            kept = counts[s] if rank_mod is None else n_congruent(g, g + counts[s], *rank_mod)
            total += kept - (drop[s] * kept / counts[s] if counts[s] else 0)
        return int(round(total))

    def _dropped_per_shard(self) -> list[int]:
        return [0] * len(self.source.urls)

    def _decode(self, raw: dict[str, Any], lay: dict[str, Any], meta: Any, epoch: int) -> dict[str, Any] | None:
        raise NotImplementedError


def _manifest_key_ranges(source: ShardSource) -> list[tuple[str, str]] | None:
    """Each shard's [first_key, last_key] from the manifest (None without one, or when a range is missing); raises
    ValueError when two ranges overlap: those shards could hold the same key, which would train twice."""
    man = source.manifest
    if man is None or any(e.first_key is None or e.last_key is None for e in man.shards if e.count):
        return None
    ranges = [(e.first_key, e.last_key) if e.count else None for e in man.shards]
    listed = sorted((r, e.name) for r, e in zip(ranges, man.shards) if r is not None)
    for (a, name_a), (b, name_b) in zip(listed, listed[1:]):
        if b[0] <= a[1]:
            raise ValueError(f"{source.description}: manifest key ranges of {name_a} [{a[0]!r}, {a[1]!r}] and "
                             f"{name_b} [{b[0]!r}, {b[1]!r}] overlap: keys must be unique across a shard set "
                             "(run mmalign shards validate)")
    return ranges


def _mark_duplicates(items: Iterator[dict[str, Any]], key_range: tuple[str, str] | None
                     ) -> Iterator[dict[str, Any]]:
    """Mark (`__duplicate__`) a sample whose key was already read in this shard, or that lies outside the shard's
    manifest key range (it may repeat a key of another shard). Marked, not dropped: stream positions stay the same
    in every slot, and the one slot that owns the position skips and counts it."""
    seen: set[str] = set()
    for raw in items:
        key = raw.get("__key__")
        if "__error__" not in raw and isinstance(key, str):
            if key in seen:
                raw.setdefault("__duplicate__", f"key {key!r} was already read earlier in this shard; a key is "
                                                "trained on once")
            elif key_range is not None and not key_range[0] <= key <= key_range[1]:
                raw.setdefault("__duplicate__", f"key {key!r} is outside this shard's manifest key range "
                                                f"[{key_range[0]!r}, {key_range[1]!r}] (it may repeat another "
                                                "shard's key)")
            seen.add(key)
        yield raw


def _provenance(meta: Any) -> dict[str, Any]:
    return meta.provenance.model_dump(exclude_none=True, exclude_defaults=True)


def _transforms(transforms: ImageTransforms | dict | None, decode_images: bool) -> ImageTransforms | None:
    if transforms is not None and not decode_images:
        raise ValueError("transforms need decoded images; drop transforms or set decode_images=True")
    return ImageTransforms.model_validate(transforms) if isinstance(transforms, dict) else transforms


def _open_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _load_rgb(data: bytes):
    im = _open_image(data)
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


class PairDataset(ShardDataset):
    """`pair` samples.

    With `transforms`, a sample is `{"pixels": (2,H,W,3) uint8 [winner, loser] (`collate_pairs` makes the float
    `pixel_values`), "caption",
    "label": 1.0 (or 0.5 for a kept tie), "winner_index": which stored image won (0/1), "original_size": (h, w) of
    the winner, "crop_top_left": (top, left), "provenance", ...}`; for a tie the stored order is kept. Without
    transforms: `{"images": [PIL image 0, PIL image 1], "label_0", "caption", ...}` (stored order).

    ties: "drop" (default) skips samples with label_0 == 0.5; "keep" yields them with label 0.5 for tie-aware
    losses. decode_images=False yields no images at all (training from cached latents).
    extra_fields: names of JSON fields beyond the schema (written by `pair_sample(..., **extra)`, e.g.
    `dim_labels`) copied as they are into the sample's `"extra"` dict, None where a sample lacks one.
    """

    schema = "pair"

    def __init__(self, source, *, transforms: ImageTransforms | dict | None = None,
                 ties: Literal["drop", "keep"] = "drop", decode_images: bool = True,
                 extra_fields: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(source, **kwargs)
        if ties not in ("drop", "keep"):
            raise ValueError(f"ties must be 'drop' or 'keep', got {ties!r}")
        self.transforms = _transforms(transforms, decode_images)
        self.ties, self.decode_images = ties, decode_images
        self.extra_fields = tuple(extra_fields)

    def _dropped_per_shard(self) -> list[int]:
        if self.ties == "keep":
            return super()._dropped_per_shard()
        return self.source.ties or [0] * len(self.source.urls)

    def _decode(self, raw, lay, meta, epoch):
        if meta.label_0 == 0.5 and self.ties == "drop":
            return None
        winner = 1 if meta.label_0 == 0.0 else 0
        out = {"caption": meta.caption, "label_0": meta.label_0, "label": 0.5 if meta.label_0 == 0.5 else 1.0,
               "winner_index": winner, "provenance": _provenance(meta)}
        if self.extra_fields:
            out["extra"] = {name: (meta.model_extra or {}).get(name) for name in self.extra_fields}
        if not self.decode_images:
            return out
        if self.transforms is None:
            out["images"] = [_load_rgb(raw[s]) for s in lay["images"]]
            return out
        images = [_open_image(raw[s]) for s in lay["images"]]
        pixels, size, crop, _ = transform_images([images[winner], images[1 - winner]], self.transforms,
                                                 sample_rng(self.seed, epoch, raw["__key__"]))
        out.update(pixels=pixels, original_size=size, crop_top_left=crop)
        return out


class RankedDataset(ShardDataset):
    """`ranked` samples: with `transforms`, `{"pixels": (K,H,W,3) uint8, "scores": (K,) float (higher is better),
    "caption", "scorers", "original_size" (of image 0), "crop_top_left"}` in stored order; without, `"images"`
    (PIL list)."""

    schema = "ranked"

    def __init__(self, source, *, transforms: ImageTransforms | dict | None = None, decode_images: bool = True,
                 **kwargs: Any):
        super().__init__(source, **kwargs)
        self.transforms = _transforms(transforms, decode_images)
        self.decode_images = decode_images

    def _decode(self, raw, lay, meta, epoch):
        out = {"caption": meta.caption, "scores": torch.tensor(meta.scores, dtype=torch.float32),
               "scorers": list(meta.scorers), "provenance": _provenance(meta)}
        if not self.decode_images:
            return out
        if self.transforms is None:
            out["images"] = [_load_rgb(raw[s]) for s in lay["images"]]
            return out
        pixels, size, crop, _ = transform_images([_open_image(raw[s]) for s in lay["images"]], self.transforms,
                                                 sample_rng(self.seed, epoch, raw["__key__"]))
        out.update(pixels=pixels, original_size=size, crop_top_left=crop)
        return out


class VideoPairDataset(ShardDataset):
    """`video_pair` samples: `{"video_a", "video_b"}` (mp4 bytes, decode later with `read_frames`), or with
    `frames=FrameSampling(...)` `{"frames_a", "frames_b"}` uint8 (T,H,W,3); plus `"prompt"`, `"labels"`
    {VQ, MQ, TA: "A" | "B" | "same"}, `"fps"` (a, b), `"num_frames"` (a, b). decode_videos=False yields no videos
    at all (training from cached latents)."""

    schema = "video_pair"

    def __init__(self, source, *, frames: FrameSampling | dict | None = None, extra_fields: tuple[str, ...] = (),
                 decode_videos: bool = True, **kwargs: Any):
        super().__init__(source, **kwargs)
        self.frames = FrameSampling.model_validate(frames) if isinstance(frames, dict) else frames
        if self.frames is not None and not decode_videos:
            raise ValueError("frames need decoded videos; drop frames or set decode_videos=True")
        self.extra_fields = tuple(extra_fields)  # JSON fields beyond the schema, as PairDataset's
        self.decode_videos = decode_videos
        if self.frames is not None:  # fail now, not in a DataLoader worker
            backend = self.frames.backend or ("decord" if have_decord() else "pyav")
            require("decord" if backend == "decord" else "av", f"VideoPairDataset(frames=...) ({backend} backend)")

    def _decode(self, raw, lay, meta, epoch):
        out = {"prompt": meta.prompt, "labels": dict(meta.labels), "fps": (meta.fps_a, meta.fps_b),
               "num_frames": (meta.num_frames_a, meta.num_frames_b),
               "provenance": _provenance(meta)}
        if self.extra_fields:
            out["extra"] = {name: (meta.model_extra or {}).get(name) for name in self.extra_fields}
        if not self.decode_videos:
            return out
        if self.frames is None:
            out.update(video_a=raw[lay["a"]], video_b=raw[lay["b"]])
        else:
            f = self.frames
            for side in ("a", "b"):
                out[f"frames_{side}"] = read_frames(raw[lay[side]], fps=f.fps, max_frames=f.max_frames,
                                                    max_pixels=f.max_pixels, backend=f.backend)
        return out


class VLMPairDataset(ShardDataset):
    """`vlm_pair` samples: `{"images": [PIL], "rejected_images": [PIL] (may be empty), "prompt": chat turns,
    "chosen": str, "rejected": str, "provenance"}`; tokenisation belongs to the model's processor."""

    schema = "vlm_pair"

    def __init__(self, source, *, decode_images: bool = True, **kwargs: Any):
        super().__init__(source, **kwargs)
        self.decode_images = decode_images

    def _decode(self, raw, lay, meta, epoch):
        out = {"prompt": [t.model_dump() for t in meta.prompt], "chosen": meta.chosen, "rejected": meta.rejected,
               "provenance": _provenance(meta)}
        if self.decode_images:
            out["images"] = [_load_rgb(raw[s]) for s in lay["images"]]
            out["rejected_images"] = [_load_rgb(raw[s]) for s in lay["rejected_images"]]
        return out


class MusicPairDataset(ShardDataset):
    """`music_pair` samples: `{"chosen_codes", "rejected_codes"}` int64 tensors (K, T), `"prompt"`, and the
    optional audio bytes `"chosen_audio"` / `"rejected_audio"` (None when absent)."""

    schema = "music_pair"

    def _decode(self, raw, lay, meta, epoch):
        import numpy as np

        arrays = {f"{side}.npy": load_npy(raw[lay[side]]) for side in ("chosen", "rejected")}
        check_code_arrays(arrays)
        out = {"prompt": meta.prompt, "provenance": _provenance(meta)}
        for side in ("chosen", "rejected"):
            out[f"{side}_codes"] = torch.from_numpy(arrays[f"{side}.npy"].astype(np.int64))
            out[f"{side}_audio"] = raw[lay[f"{side}_audio"]] if lay[f"{side}_audio"] else None
        return out


class MusicRankedDataset(ShardDataset):
    """`music_ranked` samples: `"codes"` a list of N int64 tensors (K, T) in stored order, `"scores"` (N,) float32
    (higher is better), `"prompt"`, `"scorers"`, `"provenance"`."""

    schema = "music_ranked"

    def _decode(self, raw, lay, meta, epoch):
        import numpy as np

        arrays = {suffix: load_npy(raw[suffix]) for suffix in lay["items"]}
        check_code_arrays(arrays)
        codes = [torch.from_numpy(a.astype(np.int64)) for a in arrays.values()]
        return {"codes": codes, "scores": torch.tensor(meta.scores, dtype=torch.float32), "prompt": meta.prompt,
                "scorers": list(meta.scorers), "provenance": _provenance(meta)}


class StepPairDataset(ShardDataset):
    """`step_pair` samples (SPO's step-wise preference pools), one kept denoising transition each:
    `{"x_t", "x_w", "x_l"}` float32 tensors of one shape (e.g. (4, 64, 64)), bit-exact as stored; `"prompt"`,
    `"timestep"` (the scheduler timestep of x_t), `"prev_timestep"` (of x_w / x_l; -1 after the final step),
    `"step_index"`, `"num_inference_steps"`, `"guidance_scale"`, `"eta"`, `"seed"` (None when not stored),
    `"scheduler"`, `"scores_w"`, `"scores_l"`, `"provenance"`. A sample whose latents are not float32, not finite
    or not of one shape is a `schema` skip (the latents are checked by `check_sample`)."""

    schema = "step_pair"

    def _decode(self, raw, lay, meta, epoch):
        out = {name: torch.from_numpy(arr) for name, arr in lay["latents"].items()}
        out.update(prompt=meta.prompt, timestep=meta.timestep, prev_timestep=meta.prev_timestep,
                   step_index=meta.step_index, num_inference_steps=meta.num_inference_steps,
                   guidance_scale=meta.guidance_scale, eta=meta.eta, seed=meta.seed, scheduler=meta.scheduler,
                   scores_w=meta.scores_w, scores_l=meta.scores_l, provenance=_provenance(meta))
        return out


READERS: dict[str, type[ShardDataset]] = {
    "pair": PairDataset, "ranked": RankedDataset, "video_pair": VideoPairDataset, "vlm_pair": VLMPairDataset,
    "music_pair": MusicPairDataset, "step_pair": StepPairDataset, "music_ranked": MusicRankedDataset,
}


class DataCursor:
    """How far the trainer got in the data, built from the batches it actually consumed.

        cursor = DataCursor()
        for batch in loader:
            cursor.update(batch)
            ...
        checkpoint["data"] = cursor.state_dict()        # JSON-serialisable, one per rank
        ...
        dataset.load_state_dict(checkpoint["data"])       # then build the DataLoader as before

    It also sums the bad samples the workers skipped (`skipped`, `skip_reasons`) for the trainer's logs.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.meta: dict[str, Any] = {}
        self.workers: dict[str, list[int]] = {}
        self.last_worker: int | None = None
        self.skipped = 0
        self.skip_reasons: Counter = Counter()

    def update(self, batch: dict[str, Any]) -> None:
        cur = batch["cursor"]
        if self.epoch != cur["epoch"]:
            self.epoch, self.workers = cur["epoch"], {}
        self.meta = {k: cur[k] for k in ("seed", "rank", "world_size", "num_workers")}
        for w, (pos, yielded) in cur["workers"].items():
            old = self.workers.get(w, [0, 0])
            self.workers[w] = [max(old[0], pos), max(old[1], yielded)]
        self.last_worker = cur["last_worker"]
        self.skipped += int(batch.get("skipped", 0))
        self.skip_reasons.update(batch.get("skip_reasons", {}))

    def state_dict(self) -> dict[str, Any]:
        if self.epoch is None:
            raise ValueError("DataCursor.state_dict(): no batch seen yet; nothing to resume from")
        return {
            "version": 1, "epoch": self.epoch, **self.meta, "workers": {w: list(v) for w, v in self.workers.items()},
            "next_worker": (self.last_worker + 1) % self.meta["num_workers"], "skipped": self.skipped,
            "skip_reasons": dict(self.skip_reasons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.meta = {k: state[k] for k in ("seed", "rank", "world_size", "num_workers")}
        self.workers = {w: list(v) for w, v in state["workers"].items()}
        self.last_worker = (state["next_worker"] - 1) % state["num_workers"]
        self.skipped = state.get("skipped", 0)
        self.skip_reasons = Counter(state.get("skip_reasons", {}))
