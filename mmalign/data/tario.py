"""Reading tar shards into raw samples (suffix -> bytes), without decoding anything.

The reader parses tar headers itself (ustar, POSIX PAX and GNU long names; gzip / bz2 / xz shards are
decompressed on the fly): Python's `tarfile` stream mode costs ~100 us per image pair in Python-level header
handling, ten times this parser, which matters when a reader is meant to keep up with JPEG decoding. Every header
checksum is verified, and an archive that ends before its end-of-archive blocks is reported as truncated.

Read errors do not end the stream silently: a truncated or corrupt tar yields one error record naming the shard
and the key being read, so readers can count it and the validator can report it.

Hostile members are refused, never read into memory or followed: a member whose header declares more than
`max_member_bytes` (default 512 MiB, or the `MMALIGN_MAX_MEMBER_BYTES` environment variable) has its data skipped
in small chunks, and a member whose name is absolute or holds a `..` component, or which is a symlink, a hardlink
or a device / FIFO, is refused; the sample holding such a member is marked (`__too_large__` / `__unsafe__`) so that
readers skip and count it and the validator reports it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

from mmalign.data.safety import url_scheme
from mmalign.data.schemas import split_member

READ_BUFFER = 1 << 20
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))
_DIRECTORY = b"5"
_HEADER_DATA = (b"x", b"g", b"L", b"K")  # PAX extended / global headers, GNU long name / long link name
_LINKS = {b"1": "a hardlink", b"2": "a symlink", b"3": "a character device", b"4": "a block device", b"6": "a FIFO"}
MAX_HEADER_DATA = 1 << 20  # PAX records and GNU long names: a real one is a few hundred bytes
_SKIP_CHUNK = 1 << 16


def _default_max_member_bytes() -> int:
    text = os.environ.get("MMALIGN_MAX_MEMBER_BYTES", "")
    try:
        return int(text) if text.strip() else 512 << 20
    except ValueError:
        raise ValueError(f"MMALIGN_MAX_MEMBER_BYTES must be a number of bytes, got {text!r}") from None


MAX_MEMBER_BYTES = _default_max_member_bytes()


class Refused:
    """Stands for the data of a member that was not read: `stage` is "too_large" or "unsafe", `reason` says why."""

    __slots__ = ("stage", "reason")

    def __init__(self, stage: str, reason: str):
        self.stage, self.reason = stage, reason

    def __repr__(self) -> str:
        return f"Refused({self.stage!r}, {self.reason!r})"


def unsafe_member_name(name: str) -> str | None:
    """Why a member name is refused (absolute, a drive letter, a `..` component), or None if it is safe."""
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return "an absolute path"
    if any(part == ".." for part in text.split("/")):
        return "a '..' path component (it escapes the archive)"
    return None


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

    def __init__(self, member: str | None, err: Exception | str):
        super().__init__(err if isinstance(err, str) else f"{type(err).__name__}: {err}")
        self.member = member


class _Prefixed:
    """A file that first returns `head` (bytes already read to sniff the format), then the rest of `fh`."""

    def __init__(self, head: bytes, fh):
        self.head, self.fh = head, fh

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.fh.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.fh.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data if len(data) == n else data + self.fh.read(n - len(data))

    def readable(self) -> bool:
        return True


def _read_exact(fh, n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (pipes and decompressors may return short reads)."""
    data = fh.read(n)
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        chunk = fh.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            raise ValueError("negative base-256 number")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """`"%d %s=%s\\n"` records of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad PAX record length")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _compression(block: bytes) -> str | None:
    return next((module for magic, module in _COMPRESSED if block.startswith(magic)), None)


def _decompressor(module: str, fh):
    import bz2
    import gzip
    import lzma

    return {"gzip": lambda: gzip.GzipFile(fileobj=fh, mode="rb"), "bz2": lambda: bz2.BZ2File(fh),
            "lzma": lambda: lzma.LZMAFile(fh)}[module]()


def _skip_data(fh, size: int) -> int:
    """Read and drop `size` bytes in small chunks; returns how many there were."""
    got = 0
    while got < size:
        chunk = fh.read(min(_SKIP_CHUNK, size - got))
        if not chunk:
            break
        got += len(chunk)
    return got


def iter_members(fileobj, *, max_member_bytes: int | None = None, refused: bool = False
                 ) -> Iterator[tuple[str, bytes | Refused]]:
    """(name, bytes) of each regular file in a tar stream, in stored order; `__meta__` members (webdataset's
    convention) and directories are skipped. Read errors raise MemberReadError naming the member being read.

    A member larger than `max_member_bytes` (None: `MAX_MEMBER_BYTES`), with an unsafe name (absolute, `..`), or
    that is a link or a device is never read: with `refused=True` it is yielded as `(name, Refused(stage, reason))`,
    else left out."""
    limit = MAX_MEMBER_BYTES if max_member_bytes is None else int(max_member_bytes)
    if limit < 0:
        raise ValueError(f"max_member_bytes must be >= 0, got {max_member_bytes}")
    name = None
    try:
        fh = fileobj
        header = _read_exact(fh, BLOCK)
        module = _compression(header)
        if module is not None:  # the first block was compressed data: decompress from the start
            fh = _decompressor(module, _Prefixed(header, fileobj))
            header = _read_exact(fh, BLOCK)
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            name = None
            if len(header) < BLOCK:
                raise MemberReadError(None, "the archive ends without its end-of-archive blocks (truncated)"
                                      if not header else f"truncated header ({len(header)} of 512 bytes)")
            if header == _ZERO_BLOCK:
                return
            _check_header(header)
            kind = header[156:157]
            name = _text(header[0:100])
            if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: prefix/name
                name = f"{_text(header[345:500])}/{name}"
            name = pax.pop("path", None) or long_name or name
            size = int(pax.pop("size")) if "size" in pax else _number(header[124:136])
            if size < 0:
                raise MemberReadError(name, f"negative member size {size}")
            long_name = None
            pax = {}
            problem: Refused | None = None
            if kind in _HEADER_DATA:
                if size > MAX_HEADER_DATA:
                    raise MemberReadError(name, f"an extended header of {size} bytes (over {MAX_HEADER_DATA}): "
                                                "corrupt or hostile archive")
            elif unsafe_member_name(name):
                problem = Refused("unsafe", f"member {name!r} is refused: its name is {unsafe_member_name(name)}")
            elif kind in _LINKS:
                problem = Refused("unsafe", f"member {name!r} is refused: it is {_LINKS[kind]}, not a regular file")
            elif kind in _REGULAR and size > limit:
                problem = Refused("too_large", f"member {name!r} declares {size} bytes, over the limit of {limit} "
                                               "bytes (max_member_bytes / MMALIGN_MAX_MEMBER_BYTES); not read")
            if problem is not None or kind == _DIRECTORY or (kind not in _REGULAR and kind not in _HEADER_DATA):
                got = _skip_data(fh, size)  # never held in memory
                if got < size:
                    why = f": {problem.reason}" if problem is not None else ""
                    raise MemberReadError(name, f"truncated: {got} of {size} bytes{why}")
                data = b""
            else:
                data = _read_exact(fh, size)
                if len(data) < size:
                    raise MemberReadError(name, f"truncated: {len(data)} of {size} bytes")
            pad = -size % BLOCK
            if pad and len(_read_exact(fh, pad)) < pad:
                raise MemberReadError(name, "truncated in the padding after the data")
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif problem is not None:
                if refused:
                    yield name, problem
            elif kind in _REGULAR and not (name.startswith("__") and name.endswith("__")):
                yield name, data
            header = _read_exact(fh, BLOCK)
    except MemberReadError:
        raise
    except Exception as err:  # OSError, EOFError and zlib / lzma errors from decompression, ValueError ...
        raise MemberReadError(name, err) from err


def _check_header(header: bytes) -> None:
    """The header checksum: the byte sum with the checksum field read as spaces (signed sums are accepted too,
    as tarfile does)."""
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return
    signed = unsigned - 256 * (sum(1 for b in header if b > 127) - sum(1 for b in header[148:156] if b > 127))
    if stored != signed:
        raise MemberReadError(None, "bad tar header checksum (corrupt data, or not a tar file)")


def iter_samples(fileobj, shard: str, *, max_member_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """Group consecutive members by key into `{"__key__", "__shard__", suffix: bytes, ...}`.

    A read error yields `{"__key__": key being read (or the last key), "__shard__", "__error__": reason}` and
    ends the shard; a member repeated within a key marks that sample `"__invalid__": reason`. A refused member
    (see `iter_members`) marks its sample `"__unsafe__": reason` or `"__too_large__": reason`; a refused member
    whose name has no key (`../x.jpg`, a link named `link`) is a record of its own, keyed by its name.

    `max_member_bytes` also bounds a sample's members together: once they add up to more, the sample is marked
    `"__too_large__"` and its data is dropped (the rest of its members are read one at a time and not kept), so
    many members each under the limit cannot pile up in memory either.
    """
    limit = MAX_MEMBER_BYTES if max_member_bytes is None else int(max_member_bytes)
    current: dict[str, Any] | None = None
    current_bytes = 0
    last_key = ""
    try:
        for name, data in iter_members(fileobj, max_member_bytes=max_member_bytes, refused=True):
            key, suffix = split_member(name)
            if isinstance(data, Refused):
                key = key or name
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                    last_key = key
                current.setdefault(f"__{data.stage}__", data.reason)
                continue
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": shard}
                current_bytes = 0
                last_key = key
            if suffix in current:
                current["__invalid__"] = f"member {name!r} appears twice"
            current_bytes += len(data)
            if "__too_large__" in current:
                continue
            if current_bytes > limit:
                for k in [k for k in current if not k.startswith("__")]:
                    del current[k]
                current["__too_large__"] = (f"its members add up to more than {limit} bytes (max_member_bytes / "
                                            "MMALIGN_MAX_MEMBER_BYTES); not kept")
                continue
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


def read_shard(url: str, shard: str | None = None, *, max_member_bytes: int | None = None
               ) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard file or URL (`max_member_bytes`: see `iter_members`)."""
    shard = shard or Path(url).name
    try:
        fh = open_shard(url)
    except OSError as err:
        yield {"__key__": "", "__shard__": shard, "__error__": f"cannot open shard: {err}"}
        return
    with fh:
        yield from iter_samples(fh, shard, max_member_bytes=max_member_bytes)
