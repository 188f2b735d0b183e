"""Cached tensors next to a shard set (VAE latents, text embeddings, reference log-probs), keyed by what made them.

A cache is a parallel shard set in `<shards>/cache/<name>-<cache_key>/`: one tar per data shard, with the same
name and the same keys, plus `cache.json` recording the producer (model id, revision, resolution, crop mode, ...)
and the sha256 of every data shard it was computed from. The cache key is a hash of the producer, so a reader
asking for latents at 1024 px never sees latents made at 512 px, and a cache computed from shards that were later
rewritten is refused. Readers join a cache to the data shard by shard and by key; nothing is ever unpickled
(`.npy` with `allow_pickle=False`, or safetensors).

`root=DIR` (every function here, and the readers' `cache_root`) keeps the caches in `DIR/<name>-<cache_key>/`
instead of `<shards>/cache/`: for shards on read-only or slow storage. The sha256 of the data shards is checked all
the same, so a root shared by two shard sets never serves one set's cache to the other (it is reported stale).

    producer = {"model": "stabilityai/sdxl-vae", "revision": "main", "resolution": 1024, "crop": "center"}
    with CacheWriter("shards/", "latents", producer) as cw:
        for batch in loader:                      # a reader over the same shards, any order, any workers
            for shard, key, lat in zip(batch["shards"], batch["keys"], latents):
                cw.add(shard, key, lat)
    PairDataset("shards/", caches={"latents": producer})  # samples gain sample["cache"]["latents"]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from mmalign.data.manifest import Manifest, load_manifest
from mmalign.data.schemas import SampleError, check_key, load_npy, npy_bytes, sanitize_key

CACHE_DIR = "cache"
CACHE_MANIFEST = "cache.json"
CACHE_FORMAT = "mmalign-cache"


class StaleCacheError(ValueError):
    """The requested cache does not exist for this producer, or was computed from different shards."""


def _canonical(producer: dict[str, Any]) -> str:
    return json.dumps(producer, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def cache_key(**producer: Any) -> str:
    """A 16-hex-digit fingerprint of whatever made a cache: `cache_key(model="x", resolution=512, crop="center")`.
    Order of arguments does not matter; any change of a value gives a different key."""
    if not producer:
        raise ValueError("cache_key() needs the producer's fields (model id, revision, resolution, crop, ...)")
    return hashlib.sha256(_canonical(producer).encode()).hexdigest()[:16]


def cache_root(shards: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Where a shard set's caches live: `root` if given, else `<shards>/cache`."""
    return Path(root) if root is not None else Path(shards) / CACHE_DIR


def cache_dir(shards: str | os.PathLike, name: str, key: str, root: str | os.PathLike | None = None) -> Path:
    return cache_root(shards, root) / f"{name}-{key}"


def files_fingerprint(root: str | os.PathLike, subfolders: Iterable[str]) -> str | None:
    """sha256 over the relative names and contents of every file in `root`'s `subfolders` (e.g. a local pipeline's
    VAE, text encoders and tokenizers: what a cache holds the output of; absent subfolders are skipped); None when
    `root` is not a local folder (a hub id: then its id and revision key the cache)."""
    root = Path(root)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for sub in subfolders:
        for path in sorted((root / sub).rglob("*")) if (root / sub).is_dir() else []:
            if path.is_file():
                h.update(str(path.relative_to(root)).encode() + b"\0")
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
    return h.hexdigest()


def _to_numpy(value: Any):
    import numpy as np

    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError as err:  # bfloat16 has no numpy dtype
            raise TypeError(f"{err}; store {value.dtype} tensors with storage='safetensors'") from None
    return np.asarray(value)


class CacheWriter:
    """Collect one cached value per sample, write one cache tar per data shard as soon as it is complete.

    `add(shard, key, value)` accepts samples in any order (e.g. from several DataLoader workers); a shard's tar
    is written (sorted by key, atomically) once it holds as many entries as the manifest says the shard has.
    `close()` writes `cache.json` only if every shard is complete, so a partial cache is never used. `value` is
    an array / tensor, or a dict of them (e.g. {"mean": ..., "std": ...}). `root`: see the module docstring.
    """

    def __init__(self, shards: str | os.PathLike, name: str, producer: dict[str, Any], *,
                 storage: Literal["npy", "safetensors"] = "npy", overwrite: bool = False,
                 root: str | os.PathLike | None = None):
        self.root = Path(shards)
        self.manifest: Manifest = load_manifest(self.root)
        if sanitize_key(name) != name or "-" in name:
            raise ValueError(f"cache name {name!r} must match [A-Za-z0-9_]+")
        if storage not in ("npy", "safetensors"):
            raise ValueError(f"storage must be 'npy' or 'safetensors', got {storage!r}")
        self.name, self.producer, self.storage = name, dict(producer), storage
        self.key = cache_key(**producer)
        self.dir = cache_dir(self.root, name, self.key, root)
        if (self.dir / CACHE_MANIFEST).exists() and not overwrite:
            raise FileExistsError(f"{self.dir}: this cache already exists; pass overwrite=True to rebuild it")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._expected = {s.name: s.count for s in self.manifest.shards}
        self._pending: dict[str, dict[str, Any]] = {}
        self._done: dict[str, dict] = {}
        self._fields: list[str] | None | bool = False  # False = not seen yet

    def add(self, shard: str, key: str, value: Any) -> None:
        if shard not in self._expected:
            raise KeyError(f"{shard!r} is not a shard of {self.root} (shards: {list(self._expected)[:5]} ...)")
        if shard in self._done:
            raise ValueError(f"cache shard {shard} is already complete; {key!r} was added twice or belongs elsewhere")
        check_key(key)
        fields = sorted(value) if isinstance(value, dict) else None
        if self._fields is False:
            self._fields = fields
        elif fields != self._fields:
            raise ValueError(f"{shard}/{key}: cache fields {fields} differ from earlier entries {self._fields}")
        entries = self._pending.setdefault(shard, {})
        if key in entries:
            raise ValueError(f"{shard}/{key}: added twice")
        entries[key] = value
        if len(entries) == self._expected[shard]:
            self._write_shard(shard, self._pending.pop(shard))

    def _encode(self, key: str, value: Any) -> dict[str, bytes]:
        if self.storage == "safetensors":
            import torch
            from safetensors.torch import save

            tensors = value if isinstance(value, dict) else {"value": value}
            tensors = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(_to_numpy(v))).contiguous()
                       for k, v in tensors.items()}
            return {"safetensors": save(tensors)}
        if isinstance(value, dict):
            return {f"{sanitize_key(k)}.npy": npy_bytes(_to_numpy(v)) for k, v in value.items()}
        return {"npy": npy_bytes(_to_numpy(value))}

    def _write_shard(self, shard: str, entries: dict[str, Any]) -> None:
        from webdataset import TarWriter

        from mmalign.data.writer import _HashingFile

        tmp = self.dir / f".{shard}.tmp"
        with open(tmp, "wb") as fh:
            hf = _HashingFile(fh)
            tw = TarWriter(hf, encoder=False, mtime=0, user="mmalign", group="mmalign", mode=0o444,
                           format="PAX_FORMAT", compress=False)
            for key in sorted(entries):
                tw.write({"__key__": key, **self._encode(key, entries[key])})
            tw.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / shard)
        self._done[shard] = {"name": shard, "count": len(entries), "bytes": hf.size, "sha256": hf.sha.hexdigest()}

    def close(self) -> Path:
        """Write `cache.json`; raises if a shard is incomplete (the folder then stays unusable)."""
        from mmalign.config import atomic_write_text

        missing = {s: n - len(self._pending.get(s, {})) for s, n in self._expected.items() if s not in self._done}
        if missing:
            some = ", ".join(f"{s} ({n} missing)" for s, n in list(missing.items())[:5])
            raise ValueError(f"cache {self.dir}: incomplete, no cache.json written: {some}")
        doc = {
            "format": CACHE_FORMAT, "format_version": 1, "name": self.name, "cache_key": self.key,
            "producer": json.loads(_canonical(self.producer)), "storage": self.storage,
            "fields": self._fields if self._fields is not False else None,
            "parent": {"schema": self.manifest.schema_name,
                       "shards": [{"name": s.name, "sha256": s.sha256} for s in self.manifest.shards]},
            "shards": [self._done[s.name] for s in self.manifest.shards],
        }
        atomic_write_text(self.dir / CACHE_MANIFEST, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return self.dir

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


@dataclass
class CacheInfo:
    name: str
    key: str
    producer: dict[str, Any]
    storage: str
    fields: list[str] | None
    dir: Path
    parent_shards: dict[str, str]


def list_caches(shards: str | os.PathLike, root: str | os.PathLike | None = None) -> list[CacheInfo]:
    """Complete caches (with `cache.json`) of a shard set, in `<shards>/cache/` or in `root`."""
    base = cache_root(shards, root)
    out = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        doc_path = d / CACHE_MANIFEST
        if not doc_path.is_file():
            continue
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != CACHE_FORMAT:
            continue
        out.append(CacheInfo(doc["name"], doc["cache_key"], doc["producer"], doc["storage"], doc.get("fields"), d,
                             {s["name"]: s["sha256"] for s in doc["parent"]["shards"]}))
    return out


def _diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: {a.get(k, '<unset>')!r} (wanted) vs {b.get(k, '<unset>')!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts)


def open_cache(shards: str | os.PathLike, name: str, producer: dict[str, Any] | str,
               manifest: Manifest | None = None, root: str | os.PathLike | None = None) -> CacheInfo:
    """Find the cache `name` made by `producer` (its fields, or its cache key) in `<shards>/cache/` (or `root`)
    and check it is current."""
    manifest = manifest or load_manifest(shards)
    key = producer if isinstance(producer, str) else cache_key(**producer)
    found = [c for c in list_caches(shards, root) if c.name == name]
    match = [c for c in found if c.key == key]
    if not match:
        if found and isinstance(producer, dict):
            others = "; ".join(f"{c.dir.name} ({_diff(producer, c.producer)})" for c in found)
        else:
            others = ", ".join(c.dir.name for c in found) or "none"
        where = f"{shards}" if root is None else f"{shards} (caches in {root})"
        raise StaleCacheError(f"{where}: no complete {name!r} cache for producer key {key}; available {name!r} "
                              f"caches: {others}. Build it with CacheWriter, or ask for a producer that exists")
    info = match[0]
    current = {s.name: s.sha256 for s in manifest.shards}
    if info.parent_shards != current:
        changed = sorted(n for n in set(current) | set(info.parent_shards)
                         if current.get(n) != info.parent_shards.get(n))
        raise StaleCacheError(f"{info.dir}: computed from different shards than {shards} holds now (changed: "
                              f"{changed[:5]}); rebuild the cache")
    return info


def decode_cache_entry(info: CacheInfo, raw: dict[str, Any]):
    """Raw cache members of one key -> an array (or a dict of arrays, or torch tensors for safetensors)."""
    if info.storage == "safetensors":
        from safetensors.torch import load

        if "safetensors" not in raw:
            raise SampleError(f"cache {info.name}: missing member safetensors")
        try:
            tensors = load(raw["safetensors"])
        except Exception as err:
            raise SampleError(f"cache {info.name}: unreadable safetensors: {err}") from None
        return tensors if info.fields is not None else tensors["value"]
    if info.fields is None:
        if "npy" not in raw:
            raise SampleError(f"cache {info.name}: missing member npy")
        return load_npy(raw["npy"])
    out = {}
    for f in info.fields:
        member = f"{sanitize_key(f)}.npy"
        if member not in raw:
            raise SampleError(f"cache {info.name}: missing member {member}")
        out[f] = load_npy(raw[member])
    return out


def join_cache(samples: Iterator[dict[str, Any]], cache_samples: Iterator[dict[str, Any]], info: CacheInfo
               ) -> Iterator[dict[str, Any]]:
    """Merge-join a shard's samples with its cache shard (both sorted by key): each sample gains
    `sample["__cache__"][info.name]` (raw members), or a `__cache_error__` if its cache entry is missing."""
    cache_iter = iter(cache_samples)
    current = next(cache_iter, None)
    for sample in samples:
        if "__error__" in sample:
            yield sample
            continue
        key = sample["__key__"]
        while current is not None and "__error__" not in current and current["__key__"] < key:
            current = next(cache_iter, None)
        if current is not None and "__error__" not in current and current["__key__"] == key:
            sample.setdefault("__cache__", {})[info.name] = current
            current = next(cache_iter, None)
        elif current is not None and "__error__" in current:
            sample["__cache_error__"] = f"{info.name!r} cache shard unreadable: {current['__error__']}"
        else:
            sample["__cache_error__"] = f"no {info.name!r} cache entry for this key (cache {info.dir.name})"
        yield sample


__all__ = ["CacheInfo", "CacheWriter", "StaleCacheError", "cache_key", "cache_root", "decode_cache_entry",
           "files_fingerprint", "list_caches", "open_cache"]
