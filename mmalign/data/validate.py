"""`mmalign shards validate`: check a shard set completely.

Per shard: the file exists, its sha256, byte size and sample count match the manifest, the tar reads to the end.
Per sample: a valid key, keys strictly increasing (no duplicates), no refused member (an absolute or `..` name,
a symlink, hardlink or device, a member over `max_member_bytes`), the schema's members and metadata, no unexpected
members,
and (unless `decode=False`) every image, video, array and audio member decodes: images fully, with the format
matching the extension; videos to the last frame, with the frame count matching the metadata; arrays with
`allow_pickle=False` and the schema's shape and dtype. The `step_pair` latents are loaded and checked (float32, one
shape, finite) by `check_sample` itself, so also with `decode=False`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data.cache import list_caches
from mmalign.data.deps import require
from mmalign.data.manifest import MANIFEST_NAME, ManifestError, load_manifest
from mmalign.data.safety import UnsafeSourceError, check_shard_file, safe_join
from mmalign.data.schemas import IMAGE_FORMATS, SampleError, check_code_arrays, check_key, check_sample, load_npy
from mmalign.data.tario import HashingReader, iter_samples


@dataclass
class Issue:
    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}\t{self.key or '-'}\t{self.reason}"


@dataclass
class ValidationReport:
    root: str
    schema: str = "?"
    shards: int = 0
    samples: int = 0
    bad_samples: int = 0
    issues: list[Issue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.issues)} error(s)"
        return (f"{self.root}: schema {self.schema}, {self.shards} shard(s), {self.samples} sample(s) read, "
                f"{self.bad_samples} bad sample(s): {state}")


def _check_image(data: bytes, suffix: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
    except Exception as err:
        raise SampleError(f"{suffix}: image does not decode: {type(err).__name__}: {err}") from None
    ext = suffix.rsplit(".", 1)[-1]
    if IMAGE_FORMATS.get(fmt or "") != ext:
        raise SampleError(f"{suffix}: holds {fmt} data but is named .{ext}")


def _count_video_frames(data: bytes, suffix: str) -> int:
    av = require("av", "decoding the videos of video_pair samples (validate with --no-decode to skip it)")

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise SampleError(f"{suffix}: no video stream")
            return sum(1 for _ in container.decode(video=0))
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(f"{suffix}: video does not decode: {type(err).__name__}: {err}") from None


def _check_audio(data: bytes, suffix: str) -> None:
    av = require("av", "decoding the audio of music_pair samples (validate with --no-decode to skip it)")

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise SampleError(f"{suffix}: no audio stream")
            if next(container.decode(audio=0), None) is None:
                raise SampleError(f"{suffix}: no audio frames")
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(f"{suffix}: audio does not decode: {type(err).__name__}: {err}") from None


def decode_media(schema: str, files: dict[str, bytes], lay: dict[str, Any], meta: Any) -> None:
    """Decode every media member of one sample; raises SampleError naming the member."""
    for suffix in list(lay.get("images", [])) + list(lay.get("rejected_images", [])):
        _check_image(files[suffix], suffix)
    if schema == "video_pair":
        for side in ("a", "b"):
            n = _count_video_frames(files[lay[side]], lay[side])
            want = getattr(meta, f"num_frames_{side}")
            if n != want:
                raise SampleError(f"{lay[side]}: decodes to {n} frames, metadata num_frames_{side} says {want}")
    if schema in ("music_pair", "music_ranked"):
        members = lay["items"] if schema == "music_ranked" else [lay["chosen"], lay["rejected"]]
        check_code_arrays({m: load_npy(files[m]) for m in members})
    if schema == "music_pair":
        for side in ("chosen", "rejected"):
            if lay[f"{side}_audio"]:
                _check_audio(files[lay[f"{side}_audio"]], lay[f"{side}_audio"])


def validate_shards(root: str | os.PathLike, *, decode: bool = True, progress: bool | None = None,
                    max_member_bytes: int | None = None) -> ValidationReport:
    """Check every shard and sample of the shard set in `root`; see the module docstring. `max_member_bytes`:
    members over it are reported, not read (None: `mmalign.data.tario.MAX_MEMBER_BYTES`)."""
    from tqdm.auto import tqdm

    root = Path(root)
    report = ValidationReport(str(root))
    try:
        manifest = load_manifest(root)
    except (ManifestError, UnsafeSourceError) as err:
        report.issues.append(Issue(MANIFEST_NAME, "", str(err)))
        return report
    report.schema = manifest.schema_name
    schema = manifest.schema_name
    last_key: str | None = None
    listed = {s.name for s in manifest.shards}
    bar = tqdm(total=manifest.num_samples, desc="validate", unit="sample",
               disable=None if progress is None else not progress)
    for entry in manifest.shards:
        report.shards += 1
        try:
            path = safe_join(root, entry.name, what="shard name", source=str(root / MANIFEST_NAME))
            check_shard_file(path, source=str(root), root=root)
            fh = open(path, "rb")
        except (OSError, UnsafeSourceError) as err:
            report.issues.append(Issue(entry.name, "", f"cannot open shard: {err}"))
            continue
        count = ties = 0
        first_key = None
        seen: set[str] = set()
        with fh:
            reader = HashingReader(fh)
            for raw in iter_samples(reader, entry.name, max_member_bytes=max_member_bytes):
                key = raw["__key__"]
                if "__error__" in raw:
                    report.issues.append(Issue(entry.name, key, raw["__error__"]))
                    report.bad_samples += 1
                    break
                count += 1
                bar.update()
                refused = [raw[f] for f in ("__unsafe__", "__too_large__") if f in raw]
                if refused:  # never decoded: its other members are not trusted either
                    report.issues.extend(Issue(entry.name, key, r) for r in refused)
                    report.bad_samples += 1
                    continue
                first_key = first_key or key
                problems = [raw["__invalid__"]] if "__invalid__" in raw else []
                if key in seen:
                    problems.append(f"duplicate key {key!r}: already read earlier in this shard")
                seen.add(key)
                try:
                    check_key(key)
                except SampleError as err:
                    problems.append(err.reason)
                if last_key is not None and key <= last_key:
                    problems.append(f"key not after the previous key {last_key!r} (keys must strictly increase)")
                last_key = key
                files = {k: v for k, v in raw.items() if not k.startswith("__")}
                try:
                    lay, meta = check_sample(schema, files)
                    if lay["unexpected"]:
                        problems.append(f"unexpected members {lay['unexpected']} (not part of schema {schema}; "
                                        "never decoded)")
                    if schema == "pair" and meta.label_0 == 0.5:
                        ties += 1
                    if decode:
                        decode_media(schema, files, lay, meta)
                except SampleError as err:
                    problems.append(err.reason)
                for p in problems:
                    report.issues.append(Issue(entry.name, key, p))
                report.bad_samples += bool(problems)
            sha = reader.finish()
        report.samples += count
        if sha != entry.sha256:
            report.issues.append(Issue(entry.name, "", f"sha256 {sha[:16]}... does not match the manifest's "
                                                       f"{entry.sha256[:16]}... (the file changed or is corrupt)"))
        if reader.size != entry.bytes:
            report.issues.append(Issue(entry.name, "", f"size {reader.size} bytes, manifest says {entry.bytes}"))
        if count != entry.count:
            report.issues.append(Issue(entry.name, "", f"{count} samples, manifest says {entry.count}"))
        if entry.first_key is not None and first_key != entry.first_key:
            report.issues.append(Issue(entry.name, first_key or "", f"first key differs from the manifest's "
                                                                    f"{entry.first_key!r}"))
        if entry.ties is not None and entry.ties != ties and count == entry.count:
            report.issues.append(Issue(entry.name, "", f"{ties} ties, manifest says {entry.ties}"))
    bar.close()
    for f in sorted(root.iterdir()):
        if f.name.endswith(".tmp"):
            report.warnings.append(f"{f.name}: leftover of an interrupted write (safe to delete)")
        elif f.suffix == ".tar" and f.name not in listed:
            report.warnings.append(f"{f.name}: tar file not listed in the manifest (ignored by readers)")
    current = {s.name: s.sha256 for s in manifest.shards}
    for cache in list_caches(root):
        if cache.parent_shards != current:
            report.warnings.append(f"cache {cache.dir.name}: computed from different shards; readers refuse it "
                                   "(rebuild it)")
    return report
