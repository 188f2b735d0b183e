"""`manifest.json`: the one file that makes a folder of tar shards a shard set.

It is written last (atomically) by the writer, so a folder without it is an unfinished conversion and readers
refuse it. It gives the schema and its version, each shard's sample count, byte size and sha256, and the counts of
the conversion that made it; readers take lengths and per-shard counts from it instead of scanning the data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmalign.data.safety import UnsafeSourceError, check_relative, check_shard_file, check_url, expand_urls, \
    url_scheme
from mmalign.data.schemas import SCHEMA_VERSIONS

MANIFEST_NAME = "manifest.json"
FORMAT = "mmalign-shards"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or does not match what the caller expects."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # file name relative to the manifest's folder
    count: int = Field(ge=0)  # samples in the shard
    bytes: int = Field(ge=0)
    sha256: str
    first_key: str | None = None
    last_key: str | None = None
    ties: int | None = None  # `pair` only: samples with label_0 == 0.5


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    format: Literal["mmalign-shards"] = FORMAT
    format_version: int = FORMAT_VERSION
    schema_name: str = Field(alias="schema")
    schema_version: int
    num_samples: int = Field(ge=0)
    shards: list[ShardEntry]
    conversion: dict[str, Any] = Field(default_factory=dict)
    created_by: str = ""

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False) + "\n"

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{where}: not an mmalign shard manifest (expected \"format\": \"{FORMAT}\")")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ManifestError(f"{where}: manifest format version {data.get('format_version')} is newer than this "
                            f"mmalign reads ({FORMAT_VERSION}); upgrade mmalign")
    try:
        man = Manifest.model_validate(data)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ManifestError(f"{where}: invalid manifest: " + "; ".join(lines)) from None
    if man.schema_name not in SCHEMA_VERSIONS:
        raise ManifestError(f"{where}: unknown schema {man.schema_name!r}; this mmalign reads "
                            f"{sorted(SCHEMA_VERSIONS)}")
    if man.schema_version > SCHEMA_VERSIONS[man.schema_name]:
        raise ManifestError(f"{where}: shards use {man.schema_name} v{man.schema_version}, newer than this mmalign "
                            f"reads (v{SCHEMA_VERSIONS[man.schema_name]}); upgrade mmalign")
    if man.num_samples != sum(s.count for s in man.shards):
        raise ManifestError(f"{where}: num_samples {man.num_samples} differs from the sum of shard counts "
                            f"{sum(s.count for s in man.shards)}")
    for s in man.shards:
        check_relative(s.name, what="shard name", source=where)
    return man


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Load `path` (a manifest file or a folder holding `manifest.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest: the conversion that writes this folder did not finish (the manifest is written "
            "last), or this is not a shard folder. Re-run the conversion; to read bare tar files pass a shard list "
            "and schema="
        )
    return parse_manifest(path.read_bytes(), str(path))


@dataclass
class ShardSource:
    """Resolved shards to read: URLs (local paths or allowed URLs), their names and, with a manifest, counts."""

    schema: str
    urls: list[str]
    names: list[str]
    manifest: Manifest | None
    root: Path | None  # local folder of the manifest (where caches live); None for URL lists / remote sets
    description: str

    @property
    def counts(self) -> list[int] | None:
        return None if self.manifest is None else [s.count for s in self.manifest.shards]

    @property
    def ties(self) -> list[int] | None:
        if self.manifest is None:
            return None
        return [s.ties or 0 for s in self.manifest.shards]


def open_source(source: str | os.PathLike | list, *, schema: str | None = None, allow_pipe: bool = False,
                allow_network: bool = False) -> ShardSource:
    """Resolve a shard set.

    `source` is a folder with `manifest.json`, a manifest file, a manifest URL (needs `allow_network=True`), or
    shard URLs without a manifest: a brace pattern, a `::`-separated string or a list (then `schema=` is
    required and lengths are unknown). `schema`, when given, must match the manifest's.
    """
    if isinstance(source, (str, os.PathLike)) and not isinstance(source, list):
        text = os.fspath(source)
        scheme = url_scheme(text)
        if scheme is None or scheme == "file":
            path = Path(text[5:] if scheme == "file" else text)
            if path.is_dir() or path.name.endswith(".json"):
                man = load_manifest(path)
                root = path if path.is_dir() else path.parent
                _check_schema(man, schema, str(root))
                names = [s.name for s in man.shards]
                for n in names:
                    check_shard_file(root / n, source=str(root), root=root)
                return ShardSource(man.schema_name, [str(root / n) for n in names], names, man, root, str(root))
        elif text.endswith(".json"):
            check_url(text, allow_pipe=allow_pipe, allow_network=allow_network)
            from webdataset.gopen import gopen

            with gopen(text, "rb") as fh:
                man = parse_manifest(fh.read(), text)
            _check_schema(man, schema, text)
            base = text.rsplit("/", 1)[0]
            names = [s.name for s in man.shards]
            return ShardSource(man.schema_name, [f"{base}/{n}" for n in names], names, man, None, text)
    urls = expand_urls(source)
    if not urls:
        raise ManifestError(f"{source!r}: no shards")
    for url in urls:
        check_url(url, allow_pipe=allow_pipe, allow_network=allow_network)
        if url_scheme(url) in (None, "file"):
            check_shard_file(url.removeprefix("file:"), source="shard list")
    missing = [u for u in urls if url_scheme(u) in (None, "file") and not Path(u.removeprefix("file:")).is_file()]
    if missing:
        raise ManifestError(f"{missing[0]}: no such shard file or shard-set folder"
                            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    if schema is None:
        raise ManifestError(f"{source!r}: shards without a manifest need schema= (one of {sorted(SCHEMA_VERSIONS)})")
    if schema not in SCHEMA_VERSIONS:
        raise ManifestError(f"unknown schema {schema!r}; valid: {sorted(SCHEMA_VERSIONS)}")
    names = [u.rsplit("/", 1)[-1] for u in urls]
    return ShardSource(schema, urls, names, None, None, str(source))


def _check_schema(man: Manifest, expected: str | None, where: str) -> None:
    if expected is not None and man.schema_name != expected:
        raise ManifestError(f"{where}: holds {man.schema_name!r} shards, but a {expected!r} reader was asked to read "
                            f"them; use the reader for {man.schema_name!r}")


__all__ = [
    "MANIFEST_NAME", "Manifest", "ManifestError", "ShardEntry", "ShardSource", "UnsafeSourceError", "load_manifest",
    "open_source", "parse_manifest",
]
