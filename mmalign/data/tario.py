"""Reading tar shards into raw samples (suffix -> bytes), without decoding anything.

Read errors do not end the stream silently: a truncated or corrupt tar yields one error record naming the shard
and the key being read, so readers can count it and the validator can report it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

from mmalign.data.safety import url_scheme
from mmalign.data.schemas import split_member

READ_BUFFER = 1 << 20


def open_shard(url: str):
    """Open a shard for reading. The caller has already checked the URL with `safety.check_url`."""
    scheme = url_scheme(url)
    if scheme is None:
        return open(url, "rb", buffering=READ_BUFFER)
    if scheme == "file":
        return open(url[5:], "rb", buffering=READ_BUFFER)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


class HashingReader:
    """A read-only wrapper that hashes every byte read; `finish()` reads the rest and returns the sha256."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def finish(self) -> str:
        while True:
            data = self.read(READ_BUFFER)
            if not data:
                return self.sha.hexdigest()

    def close(self) -> None:
        self.fh.close()


class MemberReadError(Exception):
    """Reading a tar stream failed; `member` is the name being read when it failed (None: between members)."""

    def __init__(self, member: str | None, err: Exception):
        super().__init__(f"{type(err).__name__}: {err}")
        self.member = member


def iter_members(fileobj) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, in stored order; `__meta__` members (webdataset's
    convention) are skipped. Read errors raise MemberReadError naming the member being read."""
    import tarfile

    name = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
            for info in stream:
                name = info.name
                if not info.isreg() or (name.startswith("__") and name.endswith("__")):
                    continue
                data = stream.extractfile(info).read()
                yield name, data
                name = None
                stream.members = []  # stream mode would otherwise keep every TarInfo in memory
    except Exception as err:  # truncated archives raise ReadError, EOFError, OSError ...
        raise MemberReadError(name, err) from err


def iter_samples(fileobj, shard: str) -> Iterator[dict[str, Any]]:
    """Group consecutive members by key into `{"__key__", "__shard__", suffix: bytes, ...}`.

    A read error yields `{"__key__": key being read (or the last key), "__shard__", "__error__": reason}` and
    ends the shard; a member repeated within a key marks that sample `"__invalid__": reason`.
    """
    current: dict[str, Any] | None = None
    last_key = ""
    try:
        for name, data in iter_members(fileobj):
            key, suffix = split_member(name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": shard}
                last_key = key
            if suffix in current:
                current["__invalid__"] = f"member {name!r} appears twice"
            current[suffix] = data
    except MemberReadError as err:
        # The members read so far are whole (a member whose data is cut raises before it is returned); if the
        # cut fell inside this sample, its schema check reports the missing member.
        if current is not None and (err.member is None or split_member(err.member)[0] != current["__key__"]):
            yield current
            current = None
        key = split_member(err.member)[0] if err.member else None
        where = f"while reading member {err.member!r}" if err.member else f"after key {last_key!r}"
        yield {"__key__": key or last_key, "__shard__": shard, "__error__": f"shard unreadable {where}: {err}"}
        return
    if current is not None:
        yield current


def read_shard(url: str, shard: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard file or URL."""
    shard = shard or Path(url).name
    try:
        fh = open_shard(url)
    except OSError as err:
        yield {"__key__": "", "__shard__": shard, "__error__": f"cannot open shard: {err}"}
        return
    with fh:
        yield from iter_samples(fh, shard)
