"""Writing a shard set: tar shards of a bounded size, sorted keys, atomic renames, `manifest.json` last.

Guarantees:
- every sample is checked against its schema before it is written (a bad sample is an error, not a bad shard);
- keys strictly increase across the whole set (sorted shards, no duplicates);
- the same samples give byte-identical shards (fixed tar metadata: mtime 0, owner `mmalign`, mode 0444);
- each shard is written to a hidden temporary name (`.shard-000003.tar.tmp`), fsynced, then renamed, and
  `manifest.json` is written (atomically) only when every shard is complete: an interrupted run leaves no
  manifest and readers refuse the folder;
- with a `resume` identity (the converters pass their inputs and options), every finished shard is also recorded
  in a hidden journal (`.progress.json`) with the caller's progress after its last sample; a re-run with the same
  identity checks the finished shards (size and sha256), keeps them and tells the caller where to continue.
  Without a journal, or when it does not match, the leftovers are removed and the set is written from the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mmalign.data.manifest import MANIFEST_NAME, Manifest, ShardEntry
from mmalign.data.schemas import SCHEMA_VERSIONS, SampleError, check_key, check_sample

logger = logging.getLogger("mmalign.data")

DEFAULT_MAX_COUNT = 1000
JOURNAL_NAME = ".progress.json"
DEFAULT_MAX_BYTES = 512 * 2**20

_BLOCK = 512


def tar_member_bytes(name: str, size: int) -> int:
    """Bytes one member takes in a PAX tar: header, data padded to 512, plus an extended header for long names."""
    extra = 3 * _BLOCK if len(name.encode()) > 100 else 0
    return _BLOCK + extra + -(-size // _BLOCK) * _BLOCK


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through (tarfile's stream mode only writes)."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def parse_size(text: str | int) -> int:
    """`"512MB"`, `"1GiB"`, `"200k"`, `1000` -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"size {text!r}: expected a number with an optional unit, like 500MB, 1GiB or 1000000")
    base = 1024 if m.group(3) else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * base**power)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


class ShardSetWriter:
    """Write samples of one schema into `out_dir` as `shard-000000.tar`, ... plus `manifest.json`.

    Use as a context manager; leaving the block with an exception removes the partial shard and writes no
    manifest::

        with ShardSetWriter("out", "pair", max_count=1000) as writer:
            for key, (img0, img1, caption, label) in sorted(items):
                writer.write(pair_sample(key, img0, img1, caption=caption, label_0=label))
            writer.set_conversion({"from": "mine", "counts": {...}})

    A new shard starts when the current one holds `max_count` samples or the next sample would take it past
    `max_bytes` (a single larger sample gets a shard of its own). A complete shard set in `out_dir` is an error
    unless `overwrite=True`. `out_dir` may hold the leftovers of an interrupted run: they are removed, unless
    `resume` (any JSON-serialisable identity of the run: inputs, options) equals the interrupted run's; then its
    finished shards are kept and `resumed_progress` is the `progress` passed with the last sample they hold
    (None when nothing was resumed). Resuming is only correct for a deterministic producer that skips what it
    already wrote, as the converters do.
    """

    def __init__(self, out_dir: str | os.PathLike, schema: str, *, max_count: int = DEFAULT_MAX_COUNT,
                 max_bytes: int | str = DEFAULT_MAX_BYTES, overwrite: bool = False, prefix: str = "shard",
                 resume: Any = None):
        if schema not in SCHEMA_VERSIONS:
            raise ValueError(f"unknown schema {schema!r}; valid: {sorted(SCHEMA_VERSIONS)}")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.max_bytes = parse_size(max_bytes)
        if self.max_bytes < 10 * 1024:
            raise ValueError(f"max_bytes must be at least 10 KiB (one tar record), got {self.max_bytes}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ValueError(f"prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.max_count = max_count
        self.prefix = prefix
        self.conversion: dict[str, Any] = {}
        self.shards: list[ShardEntry] = []
        self.resumed_progress: Any = None
        self._identity = None if resume is None else json.loads(json.dumps(
            {"resume": resume, "schema": schema, "max_count": max_count, "max_bytes": self.max_bytes,
             "prefix": prefix}, sort_keys=True))
        self._progress: Any = None  # the caller's progress after the last sample written
        self._tar = None
        self._fh = None
        self._hash: _HashingFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0
        self._ties = 0
        self._first_key: str | None = None
        self._last_key: str | None = None
        self._closed = False
        self._prepare(overwrite)

    # -- folder handling -------------------------------------------------------------------------------------
    def _prepare(self, overwrite: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST_NAME
        if manifest.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out_dir}: already holds a complete shard set ({MANIFEST_NAME}); "
                                      "pass overwrite=True (--overwrite) to replace it")
            manifest.unlink()  # first, so that an interrupted overwrite never leaves a manifest over new shards
        kept = self._resumable()
        pattern = re.compile(rf"^(\.{re.escape(self.prefix)}-\d+\.tar\.tmp|{re.escape(self.prefix)}-\d+\.tar)$")
        for old in self.out_dir.iterdir():
            if old.is_file() and pattern.match(old.name) and old.name not in kept:
                old.unlink()
        if not kept:
            (self.out_dir / JOURNAL_NAME).unlink(missing_ok=True)

    def _resumable(self) -> set[str]:
        """Adopt the finished shards of an interrupted run with the same identity; returns their names."""
        path = self.out_dir / JOURNAL_NAME
        if self._identity is None or not path.is_file():
            return set()
        try:
            journal = json.loads(path.read_text())
            same = journal.get("identity") == self._identity
            shards = [ShardEntry.model_validate(e) for e in journal["shards"]] if same else []
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s: unreadable %s (%s); converting from the start", self.out_dir, JOURNAL_NAME, err)
            return set()
        if not same:
            logger.warning("%s: the interrupted run there had other inputs or options; converting from the start",
                           self.out_dir)
            return set()
        for i, entry in enumerate(shards):
            file = self.out_dir / entry.name
            if entry.name != f"{self.prefix}-{i:06d}.tar" or not file.is_file() or file.stat().st_size != entry.bytes or _sha256(file) != entry.sha256:
                logger.warning("%s: finished shard %s of the interrupted run is missing or changed; converting from "
                               "the start", self.out_dir, entry.name)
                return set()
        self.shards = shards
        if shards:
            self._last_key = shards[-1].last_key
            self.resumed_progress = journal.get("progress")
            logger.warning("%s: resuming an interrupted run: keeping its %d finished shard(s) (%d samples)",
                           self.out_dir, len(shards), sum(e.count for e in shards))
        return {e.name for e in shards}

    # -- writing ---------------------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        from webdataset import TarWriter

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._tmp = self.out_dir / f".{name}.tmp"
        self._fh = open(self._tmp, "wb")
        self._hash = _HashingFile(self._fh)
        self._tar = TarWriter(self._hash, encoder=False, mtime=0, user="mmalign", group="mmalign", mode=0o444,
                              format="PAX_FORMAT", compress=False)
        self._count = self._bytes = self._ties = 0
        self._first_key = None

    def _finish_shard(self) -> None:
        self._tar.close()
        self._hash.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        self.shards.append(ShardEntry(
            name=self._name, count=self._count, bytes=self._hash.size, sha256=self._hash.sha.hexdigest(),
            first_key=self._first_key, last_key=self._last_key, ties=self._ties if self.schema == "pair" else None,
        ))
        self._tar = self._fh = self._hash = self._tmp = None
        if self._identity is not None:
            self._write_text(JOURNAL_NAME, json.dumps({
                "identity": self._identity, "shards": [e.model_dump(mode="json") for e in self.shards],
                "progress": self._progress}, sort_keys=True))

    def _write_text(self, name: str, text: str) -> None:
        from mmalign.config import atomic_write_text

        atomic_write_text(self.out_dir / name, text)

    def write(self, sample: dict[str, Any], progress: Any = None) -> None:
        """Write one sample: `{"__key__": key, suffix: bytes, ...}` as made by `pair_sample` and friends.

        `progress` (JSON-serialisable) is the caller's state after this sample; with `resume`, the journal keeps
        the one of each finished shard's last sample, and a resumed writer returns it as `resumed_progress`."""
        if self._closed:
            raise RuntimeError("write() after close()")
        key = check_key(sample.get("__key__", ""))
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"sample keys must strictly increase across the shard set: {key!r} after "
                             f"{self._last_key!r}; sort the input or use zero-padded keys")
        files = {k: v for k, v in sample.items() if not k.startswith("_")}
        try:
            lay, meta = check_sample(self.schema, files)
        except SampleError as err:
            raise SampleError(f"sample {key!r} does not match schema {self.schema!r}: {err.reason}") from None
        if lay["unexpected"]:
            raise SampleError(f"sample {key!r}: members {lay['unexpected']} are not part of schema {self.schema!r}")
        for suffix, value in files.items():
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample {key!r}: member {suffix!r} must be bytes, got {type(value).__name__}")
        size = sum(tar_member_bytes(f"{key}.{s}", len(v)) for s, v in files.items())
        if self._tar is not None and (self._count >= self.max_count or self._bytes + size > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        self._tar.write({"__key__": key, **files})
        self._count += 1
        self._bytes += size
        if self.schema == "pair" and meta.label_0 == 0.5:
            self._ties += 1
        if self._first_key is None:
            self._first_key = key
        self._last_key = key
        self._progress = progress

    def set_conversion(self, conversion: dict[str, Any]) -> None:
        """What made these shards (converter, options, inputs, counts); stored in the manifest."""
        self.conversion = dict(conversion)

    def close(self) -> Manifest:
        """Finish the last shard and write `manifest.json`. Returns the manifest."""
        from mmalign import __version__

        if self._closed:
            raise RuntimeError("close() called twice")
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        manifest = Manifest(
            schema=self.schema, schema_version=SCHEMA_VERSIONS[self.schema],
            num_samples=sum(s.count for s in self.shards), shards=self.shards, conversion=self.conversion,
            created_by=f"mmalign {__version__}",
        )
        self._write_text(MANIFEST_NAME, manifest.to_json())
        (self.out_dir / JOURNAL_NAME).unlink(missing_ok=True)
        return manifest

    def abort(self) -> None:
        """Drop the shard being written and write no manifest (finished shards stay, unreferenced)."""
        self._closed = True
        if self._tar is not None:
            try:
                self._tar.close()
                self._fh.close()
            finally:
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
            self._tar = self._fh = self._hash = self._tmp = None

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
