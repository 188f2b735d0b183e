"""What a shard source may point at.

Shards and manifests come from other people. Four rules keep reading them safe:
- a `pipe:` URL runs a shell command: refused unless `allow_pipe=True`;
- a URL that reaches the network (http, https, s3, gs, hf, ...) is refused unless `allow_network=True`;
- a path written inside a manifest (a shard name, an image path in a JSONL manifest, a video path in a CSV) must
  stay inside the folder it is relative to: absolute paths, `..` escapes and URLs are refused;
- a local shard file must be a regular file: a symbolic link (which could point anywhere) is refused.
Nothing is ever unpickled: readers decode only JSON, images, `.npy` with `allow_pickle=False`, safetensors, audio
and mp4 bytes; members with other suffixes (`.pyd`, `.pickle`, `.pth`) are never decoded.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

NETWORK_SCHEMES = frozenset({
    "http", "https", "s3", "gs", "gcs", "hf", "ais", "sftp", "ftp", "ftps", "scp", "htgs", "azure", "az", "abfs",
})

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class UnsafeSourceError(ValueError):
    """A shard URL or a path in a manifest was refused; the message says why and how to allow it if safe."""


def url_scheme(url: str) -> str | None:
    """`"pipe:cat x"` -> `"pipe"`, `"https://..."` -> `"https"`, `"/data/x.tar"` -> None. Windows drive letters
    (`C:\\x`) count as local paths."""
    m = _SCHEME_RE.match(url)
    if not m or (len(m.group(1)) == 1 and os.name == "nt"):
        return None
    return m.group(1).lower()


def check_url(url: str, *, allow_pipe: bool = False, allow_network: bool = False) -> str:
    """Return `url` if reading it is allowed, else raise UnsafeSourceError."""
    scheme = url_scheme(url)
    if scheme is None or scheme == "file":
        return url
    if scheme == "pipe":
        if not allow_pipe:
            raise UnsafeSourceError(
                f"{url!r}: 'pipe:' URLs run a shell command and are refused; pass allow_pipe=True only for "
                "sources you wrote yourself"
            )
        return url
    if scheme in NETWORK_SCHEMES:
        if not allow_network:
            raise UnsafeSourceError(
                f"{url!r}: reading over the network ({scheme}:) is refused by default; pass allow_network=True "
                "to allow it"
            )
        return url
    raise UnsafeSourceError(f"{url!r}: unknown URL scheme {scheme!r}; use a local path, file:, or an allowed "
                            f"network scheme ({', '.join(sorted(NETWORK_SCHEMES))})")


def check_relative(rel: str, *, what: str, source: str) -> PurePosixPath:
    """Check a path written in a manifest: relative, no `..`, no URL scheme. Returns it as a POSIX path."""
    if not isinstance(rel, str) or not rel.strip():
        raise UnsafeSourceError(f"{source}: {what} must be a non-empty relative path, got {rel!r}")
    if url_scheme(rel) is not None or rel.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise UnsafeSourceError(f"{source}: {what} {rel!r} is not a relative path; paths in a manifest must stay "
                                "inside its folder")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        raise UnsafeSourceError(f"{source}: {what} {rel!r} escapes its base folder ('..'); paths in a manifest "
                                "must stay inside its folder")
    return PurePosixPath(*parts)


def safe_join(base: str | os.PathLike, rel: str, *, what: str = "path", source: str = "manifest") -> Path:
    """`base / rel`, refusing absolute paths, `..` and URLs in `rel` (the check is on the text; symlinks that the
    owner of `base` created are followed)."""
    return Path(base) / check_relative(rel, what=what, source=source)


def check_shard_file(path: str | os.PathLike, *, source: str, root: str | os.PathLike | None = None) -> None:
    """Refuse a local shard that is a symbolic link or not a regular file (a FIFO, a device, a folder): a link
    planted in a shard folder would make the reader open, and its errors quote, a file outside it. With `root` (a
    shard set's folder), the shard must also resolve inside it, so a linked sub-folder on the way is refused too.
    A missing file passes: readers report it as an unreadable shard."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeSourceError(f"{source}: shard {os.fspath(path)!r} is a symbolic link; shards are read only "
                                "from regular files (copy the file instead of linking it)")
    if root is not None:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise UnsafeSourceError(f"{source}: shard {os.fspath(path)!r} resolves outside the shard folder through "
                                    "a symbolic link on its path; shards are read only from regular files inside it")
    if not stat.S_ISREG(mode):
        raise UnsafeSourceError(f"{source}: shard {os.fspath(path)!r} is not a regular file")


def expand_urls(spec: str | os.PathLike | list | tuple) -> list[str]:
    """A brace pattern (`shards/shard-{000000..000009}.tar`), a `::`-separated list, or a list -> list of URLs."""
    import braceexpand

    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    else:
        items = str(spec).split("::")
    out: list[str] = []
    for item in items:
        out.extend(braceexpand.braceexpand(item))
    return out
