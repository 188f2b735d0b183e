"""Converters from public preference formats to shard sets.

Each converter reads its inputs in a fixed order (files sorted by name, rows in stored order) and gives every
sample the key `<file stem>-<row, 9 digits>`, so keys come out sorted without a global sort and the same input
always gives byte-identical shards. Rows that cannot be used are dropped, counted by reason and logged with file
and row (`strict=True` stops at the first one instead); the counts go into `manifest.json` under `conversion`.
A conversion that keeps no row raises `ConversionError` naming its inputs and writes no shard set; so does an input
file that is not what its format needs (not parquet, not UTF-8 text, a required column of the wrong type).
Paths written inside an input (image / video paths) must stay inside their base folder.

Re-running an interrupted conversion with the same inputs and options resumes it: the finished shards are checked
and kept, the rows they hold are skipped (whole parquet row groups and files unread), and the counts continue from
the journal (see `writer.py`); the result is byte-identical to an uninterrupted run. `overwrite=True` always
starts from the beginning.

| format | input | schema |
|---|---|---|
| `pickapic` | Pick-a-Pic v2 parquet files or folders of them | `pair` |
| `hpdv2` | HPD v2 train JSON + image root | `pair` (or `ranked`) |
| `jsonl` | our JSONL manifest, image paths relative to it | `pair` or `ranked` |
| `videoalign` | VideoAlign train CSV + video root | `video_pair` |
| `trl` | TRL preference rows (JSONL / parquet) and STIC JSONL rows | `vlm_pair` |
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from mmalign.data.deps import require
from mmalign.data.manifest import Manifest
from mmalign.data.safety import UnsafeSourceError, safe_join
from mmalign.data.schemas import (
    SampleError, is_mp4, pair_sample, ranked_sample, sanitize_key, video_pair_sample, vlm_pair_sample,
)
from mmalign.data.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT, JOURNAL_NAME, ShardSetWriter, parse_size

logger = logging.getLogger("mmalign.data.convert")

TiePolicy = Literal["drop", "keep", "coin"]
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")  # what a pair needs
PICKAPIC_ID_COLUMNS = ("ranking_id", "user_id", "num_example_per_prompt", "image_0_uid", "image_1_uid",
                       "best_image_uid")
PICKAPIC_OPTIONAL_COLUMNS = ("has_label", "model_0", "model_1", *PICKAPIC_ID_COLUMNS)  # carried when present
VIDEOALIGN_COLUMNS = ("path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B",
                      "num_frames_B")


class ConversionError(ValueError):
    """The input cannot be converted (wrong columns, unsafe paths, a bad row with strict=True)."""


@dataclass
class ConvertOptions:
    """Options shared by every converter."""

    max_count: int = DEFAULT_MAX_COUNT
    max_bytes: int | str = DEFAULT_MAX_BYTES
    overwrite: bool = False
    ties: TiePolicy = "drop"
    seed: int = 0
    limit: int | None = None  # stop after this many input rows (quick trials)
    strict: bool = False
    progress: bool | None = None  # tqdm bar; None = only on a terminal

    def __post_init__(self):
        if self.ties not in ("drop", "keep", "coin"):
            raise ValueError(f"ties must be drop, keep or coin, got {self.ties!r}")


@dataclass
class Counts:
    """Conversion bookkeeping written to the manifest."""

    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    ties: int = 0
    ties_kept: int = 0
    ties_coin: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "dropped": sum(self.dropped.values()),
                "dropped_reasons": dict(sorted(self.dropped.items())), "ties": self.ties,
                "ties_dropped": self.dropped.get("tie", 0), "ties_kept": self.ties_kept,
                "ties_coin": self.ties_coin}

    def state(self) -> dict[str, Any]:
        """Everything, losslessly (for the resume journal)."""
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped), "ties": self.ties,
                "ties_kept": self.ties_kept, "ties_coin": self.ties_coin}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Counts":
        return cls(**{**state, "dropped": Counter(state["dropped"])})

    def summary(self) -> str:
        d = self.to_dict()
        reasons = ", ".join(f"{k} {v}" for k, v in d["dropped_reasons"].items()) or "none"
        return (f"rows {d['rows']}: kept {d['kept']}, dropped {d['dropped']} ({reasons}); ties {d['ties']} "
                f"(dropped {d['ties_dropped']}, kept {d['ties_kept']}, coin {d['ties_coin']})")


class _Ctx:
    """Per-run state handed to the row readers: options, counts, and the drop bookkeeping."""

    def __init__(self, opts: ConvertOptions):
        self.opts = opts
        self.counts = Counts()
        self.resume_after: str | None = None  # rows with keys up to this one were written by an interrupted run

    def drop(self, where: str, reason: str, detail: str = "") -> None:
        if self.opts.strict:
            raise ConversionError(f"{where}: {reason}{': ' + detail if detail else ''} (strict mode)")
        self.counts.dropped[reason] += 1
        if reason not in ("unlabeled", "tie"):
            logger.warning("dropping %s: %s%s", where, reason, f": {detail}" if detail else "")

    def resolve_tie(self, label_0: float, key: str, where: str) -> float | None:
        """Apply the tie policy to a label; None means the row is dropped (and counted)."""
        if label_0 != 0.5:
            return label_0
        self.counts.ties += 1
        policy = self.opts.ties
        if policy == "drop":
            self.drop(where, "tie")
            return None
        if policy == "keep":
            self.counts.ties_kept += 1
            return 0.5
        self.counts.ties_coin += 1
        return 1.0 if random.Random(f"{self.opts.seed}:{key}").random() < 0.5 else 0.0


def _row_key(stem: str, row: int) -> str:
    return f"{stem}-{row:09d}"


def _sorted_inputs(inputs: Iterable[str | os.PathLike], exts: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Files (folders expanded to their files with `exts`) as (key stem, path), sorted by stem; stems unique."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(exts))
            if not found:
                raise ConversionError(f"{p}: no {'/'.join(exts)} files in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ConversionError(f"{p}: no such file or folder")
    out: dict[str, Path] = {}
    for f in files:
        stem = sanitize_key(f.name.split(".")[0])
        if stem in out:
            raise ConversionError(f"{out[stem]} and {f} give the same sample-key prefix {stem!r}; convert them in "
                                  "separate runs or rename one")
        out[stem] = f
    return sorted(out.items())


def _progress(total: int | None, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=None if enabled is None else not enabled,
                dynamic_ncols=True)


def _rows(items: Iterable[tuple[str, str, Any]], total: int | None, desc: str, ctx: _Ctx,
          make: Callable[[Any, str, str], dict | None]) -> Iterator[dict]:
    """The row loop of every converter: progress, `limit`, row counts, and skipping the rows a resumed run
    already wrote. `items` gives `(key, where, record)` in key order; `make(record, key, where)` returns the
    sample, or None for a dropped row (counted by `ctx.drop`)."""
    with _progress(total, desc, ctx.opts.progress) as bar:
        for key, where, rec in items:
            bar.update()
            if ctx.resume_after is not None and key <= ctx.resume_after:
                continue
            if _limited(ctx):
                return
            ctx.counts.rows += 1
            sample = make(rec, key, where)
            if sample is not None:
                yield sample


def _write(out: str | os.PathLike, schema: str, samples: Iterator[dict], ctx: _Ctx, info: dict[str, Any]) -> Manifest:
    options = {"ties": ctx.opts.ties, "seed": ctx.opts.seed, "limit": ctx.opts.limit,
               "max_count": ctx.opts.max_count, "max_bytes": parse_size(ctx.opts.max_bytes)}
    identity = None if ctx.opts.overwrite else {**info, "options": options, "strict": ctx.opts.strict}
    with ShardSetWriter(out, schema, max_count=ctx.opts.max_count, max_bytes=ctx.opts.max_bytes,
                        overwrite=ctx.opts.overwrite, resume=identity) as writer:
        if writer.resumed_progress is not None:
            ctx.counts = Counts.from_state(writer.resumed_progress["counts"])
            ctx.resume_after = writer.resumed_progress["key"]
        for sample in samples:  # the generator starts here, after resume_after is known
            ctx.counts.kept += 1
            writer.write(sample, progress={"key": sample["__key__"], "counts": ctx.counts.state()})
        if not ctx.counts.kept:  # a shard set of nothing is an error, not a result
            writer.abort()
            (Path(out) / JOURNAL_NAME).unlink(missing_ok=True)
            inputs = [i["name"] for i in info.get("inputs", [])]
            names = ", ".join(inputs[:5]) + (f" and {len(inputs) - 5} more" if len(inputs) > 5 else "") or str(out)
            raise ConversionError(f"{names}: nothing usable: {ctx.counts.summary()}; no shard set was written")
        writer.set_conversion({**info, "options": options, "counts": ctx.counts.to_dict()})
        manifest = writer.close()
    return manifest


def _read_text(path: Path, what: str) -> str:
    """A text input, or a ConversionError naming the file (missing, unreadable, not UTF-8)."""
    try:
        return path.read_bytes().decode("utf-8")  # newlines as stored (the CSV reader wants them)
    except UnicodeDecodeError as err:
        raise ConversionError(f"{path}: not a {what} (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConversionError(f"{path}: cannot read: {err.strerror or err}") from None


def _open_parquet(pq: Any, path: Path) -> Any:
    """`pq.ParquetFile(path)`, or a ConversionError naming the file when it is not a readable parquet file."""
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowIOError / OSError for the same cause
        raise ConversionError(f"{path}: not a parquet file ({err})") from None


def _limited(ctx: _Ctx) -> bool:
    return ctx.opts.limit is not None and ctx.counts.rows >= ctx.opts.limit


def _read_file(base: Path, rel: str, where: str, what: str) -> bytes:
    path = safe_join(base, rel, what=what, source=where)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Pick-a-Pic v2


def _pickapic_items(pq: Any, files: list[tuple[str, Path]], ctx: _Ctx) -> Iterator[tuple[str, str, dict]]:
    """Rows of the parquet files (`pq`: pyarrow.parquet); row groups a resumed run already wrote are not read."""
    for stem, path in files:
        pf = _open_parquet(pq, path)
        names = pf.schema_arrow.names
        columns = list(PICKAPIC_COLUMNS) + [c for c in PICKAPIC_OPTIONAL_COLUMNS if c in names]
        row, groups = 0, list(range(pf.metadata.num_row_groups))
        while groups and ctx.resume_after is not None:
            n = pf.metadata.row_group(groups[0]).num_rows
            if _row_key(stem, row + n - 1) > ctx.resume_after:
                break
            row += n
            groups.pop(0)
        if not groups:
            continue
        for batch in pf.iter_batches(batch_size=128, row_groups=groups, columns=columns):
            for rec in batch.to_pylist():
                rec["__dir__"] = path.parent  # the base of image paths in `{bytes, path}` structs
                yield _row_key(stem, row), f"{path.name} row {row}", rec
                row += 1


def _pickapic_check(pq: Any, path: Path) -> tuple[int, list[str]]:
    """Open one Pick-a-Pic parquet and check the columns a pair needs and their types; returns (rows, the
    optional columns it lacks)."""
    import pyarrow.types as pat

    pf = _open_parquet(pq, path)
    schema = pf.schema_arrow
    names = schema.names
    missing = [c for c in PICKAPIC_COLUMNS if c not in names]
    if missing:
        raise ConversionError(f"{path}: not a Pick-a-Pic parquet: missing columns {missing} (found {names}); a pair "
                              f"needs {', '.join(PICKAPIC_COLUMNS)}")

    def image_type(t: Any) -> bool:
        if pat.is_binary(t) or pat.is_large_binary(t) or pat.is_fixed_size_binary(t):
            return True
        return pat.is_struct(t) and any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields))

    checks = {"caption": (lambda t: pat.is_string(t) or pat.is_large_string(t), "a string"),
              "jpg_0": (image_type, "image bytes or {bytes, path} structs"),
              "jpg_1": (image_type, "image bytes or {bytes, path} structs"),
              "label_0": (lambda t: pat.is_integer(t) or pat.is_floating(t), "a number"),
              "label_1": (lambda t: pat.is_integer(t) or pat.is_floating(t), "a number")}
    for column, (ok, expected) in checks.items():
        t = schema.field(column).type
        if not ok(t):
            raise ConversionError(f"{path}: column {column} holds {t}, expected {expected}")
    return pf.metadata.num_rows, [c for c in PICKAPIC_OPTIONAL_COLUMNS if c not in names]


def _label_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _pickapic_image(item: Any, base: Path | None, where: str) -> bytes:
    """Image bytes from a Pick-a-Pic cell: bytes, or a `{bytes, path}` struct (HF datasets' Image layout; a path
    is relative to the parquet file's folder)."""
    if isinstance(item, dict) and not item.get("bytes") and item.get("path") and base is None:
        raise ValueError("an image path without a base folder")
    if isinstance(item, str):  # a string column is refused up front; a row never names a file by itself
        raise ValueError("an image must be bytes or a {bytes, path} struct")
    data = _image_bytes(item, base or Path("."), where)
    if not data:
        raise ValueError("empty image bytes")
    return data


def _pickapic_sample(rec: dict, key: str, where: str, ctx: _Ctx) -> dict | None:
    if "has_label" in rec and not rec["has_label"]:
        ctx.drop(where, "unlabeled")
        return None
    l0, l1 = _label_number(rec["label_0"]), _label_number(rec["label_1"])
    if l0 not in (0, 0.5, 1) or l1 is None or abs(l0 + l1 - 1) > 1e-6:
        ctx.drop(where, "bad_label", f"label_0={rec['label_0']!r}, label_1={rec['label_1']!r} "
                                     "(valid: 0/1, 1/0, 0.5/0.5)")
        return None
    if not isinstance(rec["caption"], str):
        ctx.drop(where, "no_caption")
        return None
    try:
        images = [_pickapic_image(rec[c], rec.get("__dir__"), where) for c in ("jpg_0", "jpg_1")]
    except UnsafeSourceError:
        raise
    except OSError as err:
        ctx.drop(where, "missing_file", str(err))
        return None
    except (ValueError, TypeError) as err:
        ctx.drop(where, "bad_image", str(err))
        return None
    label = ctx.resolve_tie(l0, key, where)
    if label is None:
        return None
    ids = {c: rec[c] for c in PICKAPIC_ID_COLUMNS if rec.get(c) is not None}
    prov: dict[str, Any] = {"dataset": "pickapic_v2", "ids": ids}
    if "model_0" in rec or "model_1" in rec:
        prov["generators"] = [rec.get("model_0"), rec.get("model_1")]
    if label != l0:
        prov["tie_resolved_by_coin"] = True
    try:
        return pair_sample(key, images[0], images[1], caption=rec["caption"], label_0=label, provenance=prov)
    except SampleError as err:
        ctx.drop(where, "bad_image", err.reason)
        return None


def convert_pickapic(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                     options: ConvertOptions | None = None) -> Manifest:
    """Pick-a-Pic v2 parquet files (or folders of them) -> `pair` shards. Unlabeled rows are dropped; ties
    follow `options.ties` (drop / keep as label 0.5 / coin: a seeded coin flip per key picks a winner).

    A pair needs `caption, jpg_0, jpg_1, label_0, label_1`; the other Pick-a-Pic columns (`has_label`, the model
    names and ids) are carried when present, and the manifest's `conversion.absent_columns` lists the ones that were
    not (without `has_label` every row counts as labeled). Images are bytes or HF `datasets` `{bytes, path}` structs
    (a path is relative to the parquet file's folder and may not leave it)."""
    ctx = _Ctx(options or ConvertOptions())
    files = _sorted_inputs(inputs, (".parquet",))
    pq = require("pyarrow.parquet", "the pickapic converter (parquet input)")
    checked = [_pickapic_check(pq, p) for _, p in files]
    total = sum(n for n, _ in checked)
    absent = sorted({c for _, cols in checked for c in cols}, key=PICKAPIC_OPTIONAL_COLUMNS.index)
    if absent:
        logger.warning("pickapic: columns not in (every) input, so not carried: %s%s", ", ".join(absent),
                       " (has_label absent: every row counts as labeled)" if "has_label" in absent else "")
    info = {"from": "pickapic", "inputs": [{"name": p.name, "bytes": p.stat().st_size} for _, p in files],
            "absent_columns": absent}
    rows = _rows(_pickapic_items(pq, files, ctx), min(total, ctx.opts.limit or total), "pickapic", ctx,
                 lambda rec, key, where: _pickapic_sample(rec, key, where, ctx))
    return _write(out, "pair", rows, ctx, info)


# ---------------------------------------------------------------------------------------------------------------
# HPD v2


def convert_hpdv2(json_path: str | os.PathLike, out: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                  schema: Literal["pair", "ranked"] = "pair", options: ConvertOptions | None = None) -> Manifest:
    """HPD v2 train JSON (a list of `{"prompt", "file_path": [...], "human_preference": [...]}`) -> shards.

    `pair`: entries with two images; label_0 = 1 if human_preference[0] > [1], 0 if smaller, 0.5 (a tie) if equal.
    `ranked`: any K >= 2, scores = human_preference. Image paths are relative to `image_root` (default: the JSON's
    folder)."""
    if schema not in ("pair", "ranked"):
        raise ValueError(f"hpdv2 converts to 'pair' or 'ranked', got {schema!r}")
    ctx = _Ctx(options or ConvertOptions())
    path = Path(json_path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        entries = json.loads(_read_text(path, "HPD v2 JSON file"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: cannot read HPD v2 JSON: {err}") from None
    if not isinstance(entries, list):
        raise ConversionError(f"{path}: HPD v2 train JSON must be a list of entries")
    stem = sanitize_key(path.name.split(".")[0])
    items = ((_row_key(stem, i), f"{path.name} entry {i}", (i, entry)) for i, entry in enumerate(entries))
    rows = _rows(items, len(entries), "hpdv2", ctx,
                 lambda rec, key, where: _hpdv2_sample(rec[1], key, where, rec[0], root, schema, ctx))
    info = {"from": "hpdv2", "inputs": [{"name": path.name, "bytes": path.stat().st_size}], "schema": schema}
    return _write(out, schema, rows, ctx, info)


def _hpdv2_sample(entry: Any, key: str, where: str, index: int, root: Path, schema: str, ctx: _Ctx) -> dict | None:
    if not isinstance(entry, dict) or not all(k in entry for k in ("prompt", "file_path", "human_preference")):
        ctx.drop(where, "bad_entry", "needs prompt, file_path and human_preference")
        return None
    paths, prefs = entry["file_path"], entry["human_preference"]
    if not isinstance(paths, list) or not isinstance(prefs, list) or len(paths) != len(prefs) or len(paths) < 2:
        ctx.drop(where, "bad_entry", "file_path and human_preference must be lists of the same length >= 2")
        return None
    if schema == "pair" and len(paths) != 2:
        ctx.drop(where, "not_a_pair", f"{len(paths)} images; convert with schema='ranked' to keep them")
        return None
    try:
        images = [_read_file(root, p, where, "image path") for p in paths]
    except OSError as err:
        ctx.drop(where, "missing_file", str(err))
        return None
    prov = {"dataset": "hpdv2", "ids": {"index": index, "file_path": paths}}
    if "user_hash" in entry:
        prov["ids"]["user_hash"] = entry["user_hash"]
    try:
        if schema == "ranked":
            return ranked_sample(key, images, caption=entry["prompt"], scores=[float(p) for p in prefs],
                                 scorers=["human"], provenance=prov)
        a, b = float(prefs[0]), float(prefs[1])
        label = ctx.resolve_tie(1.0 if a > b else 0.0 if a < b else 0.5, key, where)
        if label is None:
            return None
        return pair_sample(key, images[0], images[1], caption=entry["prompt"], label_0=label, provenance=prov)
    except (SampleError, TypeError, ValueError) as err:
        ctx.drop(where, "bad_entry", getattr(err, "reason", str(err)))
        return None


# ---------------------------------------------------------------------------------------------------------------
# our JSONL manifest


def convert_jsonl(path: str | os.PathLike, out: str | os.PathLike, *, schema: Literal["pair", "ranked"] | None = None,
                  options: ConvertOptions | None = None) -> Manifest:
    """Our JSONL manifest -> `pair` or `ranked` shards. One JSON object per line:

    - pair: `{"caption", "images": [path_0, path_1], "label_0": 0 | 0.5 | 1, "provenance": {...}}`
    - ranked: `{"caption", "images": [...], "scores": [...], "scorers": [...], "provenance": {...}}`

    Image paths are relative to the manifest's folder and may not leave it. `schema` defaults to what the first
    line holds (`label_0` -> pair, `scores` -> ranked)."""
    ctx = _Ctx(options or ConvertOptions())
    path = Path(path)
    lines = _read_text(path, "JSONL manifest").splitlines()
    if schema is None:
        try:
            first = next((json.loads(ln) for ln in lines if ln.strip()), None)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: the first line is not JSON ({err}); pass schema=") from None
        if not isinstance(first, dict) or ("label_0" in first) == ("scores" in first):
            raise ConversionError(f"{path}: cannot tell pair from ranked from the first line (it needs exactly one "
                                  "of label_0, scores); pass schema=")
        schema = "pair" if "label_0" in first else "ranked"
    stem = sanitize_key(path.name.split(".")[0])
    numbered = [(i, line) for i, line in enumerate(lines) if line.strip()]
    items = ((_row_key(stem, i), f"{path.name} line {i + 1}", line) for i, line in numbered)
    rows = _rows(items, len(numbered), "jsonl", ctx,
                 lambda line, key, where: _jsonl_sample(line, key, where, path.parent, schema, ctx))
    info = {"from": "jsonl", "inputs": [{"name": path.name, "bytes": path.stat().st_size}], "schema": schema}
    return _write(out, schema, rows, ctx, info)


def _jsonl_sample(line: str, key: str, where: str, base: Path, schema: str, ctx: _Ctx) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        ctx.drop(where, "bad_json", str(err))
        return None
    images = rec.get("images") if isinstance(rec, dict) else None
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        ctx.drop(where, "bad_entry", "images must be a list of paths")
        return None
    try:
        data = [_read_file(base, p, where, "image path") for p in images]
    except OSError as err:
        ctx.drop(where, "missing_file", str(err))
        return None
    prov = rec.get("provenance") or {}
    try:
        if schema == "pair":
            if len(data) != 2:
                ctx.drop(where, "not_a_pair", f"{len(data)} images")
                return None
            if rec.get("label_0") not in (0, 0.5, 1) or isinstance(rec.get("label_0"), bool):
                ctx.drop(where, "bad_label", f"label_0={rec.get('label_0')!r} (valid: 0, 0.5, 1)")
                return None
            label = ctx.resolve_tie(float(rec["label_0"]), key, where)
            if label is None:
                return None
            return pair_sample(key, data[0], data[1], caption=rec.get("caption"), label_0=label, provenance=prov)
        return ranked_sample(key, data, caption=rec.get("caption"), scores=rec.get("scores"),
                             scorers=rec.get("scorers"), provenance=prov)
    except (SampleError, TypeError, ValueError) as err:
        ctx.drop(where, "bad_entry", getattr(err, "reason", str(err)))
        return None


# ---------------------------------------------------------------------------------------------------------------
# VideoAlign


def convert_videoalign(csv_path: str | os.PathLike, out: str | os.PathLike, *,
                       video_root: str | os.PathLike | None = None, options: ConvertOptions | None = None) -> Manifest:
    """VideoAlign train CSV (`path_A, path_B, prompt, VQ, MQ, TA, fps_A, num_frames_A, fps_B, num_frames_B`,
    labels A / B / same) -> `video_pair` shards. Video paths are relative to `video_root` (default: the CSV's
    folder). Per-dimension `same` labels are data, not ties to drop."""
    ctx = _Ctx(options or ConvertOptions())
    path = Path(csv_path)
    root = Path(video_root) if video_root is not None else path.parent
    text = _read_text(path, "CSV file")
    try:
        reader = csv.DictReader(text.splitlines(keepends=True))
        missing = [c for c in VIDEOALIGN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(f"{path}: not a VideoAlign CSV: missing columns {missing} "
                                  f"(found {reader.fieldnames})")
        records = list(reader)
    except csv.Error as err:
        raise ConversionError(f"{path}: not a readable CSV file: {err}") from None
    stem = sanitize_key(path.name.split(".")[0])
    items = ((_row_key(stem, i), f"{path.name} row {i + 1}", (i, rec)) for i, rec in enumerate(records))
    rows = _rows(items, len(records), "videoalign", ctx,
                 lambda rec, key, where: _videoalign_sample(rec[1], key, where, rec[0], root, ctx))
    info = {"from": "videoalign", "inputs": [{"name": path.name, "bytes": path.stat().st_size}]}
    return _write(out, "video_pair", rows, ctx, info)


def _videoalign_sample(rec: dict, key: str, where: str, index: int, root: Path, ctx: _Ctx) -> dict | None:
    labels = {}
    for dim in ("VQ", "MQ", "TA"):
        value = (rec.get(dim) or "").strip()
        norm = {"a": "A", "b": "B", "same": "same"}.get(value.lower())
        if norm is None:
            ctx.drop(where, "bad_label", f"{dim}={value!r} (valid: A, B, same)")
            return None
        labels[dim] = norm
    try:
        numbers = {"fps_a": float(rec["fps_A"]), "fps_b": float(rec["fps_B"]),
                   "num_frames_a": int(float(rec["num_frames_A"])), "num_frames_b": int(float(rec["num_frames_B"]))}
    except (TypeError, ValueError) as err:
        ctx.drop(where, "bad_number", f"fps / num_frames: {err}")
        return None
    try:
        videos = [_read_file(root, rec[c], where, "video path") for c in ("path_A", "path_B")]
    except OSError as err:
        ctx.drop(where, "missing_file", str(err))
        return None
    if not all(is_mp4(v) for v in videos):
        ctx.drop(where, "not_mp4", "videos must be mp4 files")
        return None
    prov = {"dataset": "videoalign", "ids": {"row": index, "path_A": rec["path_A"], "path_B": rec["path_B"]}}
    if rec.get("A_model") or rec.get("B_model"):
        prov["generators"] = [rec.get("A_model") or None, rec.get("B_model") or None]
    try:
        return video_pair_sample(key, videos[0], videos[1], prompt=rec["prompt"], labels=labels, provenance=prov,
                                 **numbers)
    except SampleError as err:
        ctx.drop(where, "bad_entry", err.reason)
        return None


# ---------------------------------------------------------------------------------------------------------------
# TRL preference rows and STIC rows


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _clean_turns(turns: Any) -> list[dict]:
    if isinstance(turns, str):
        return [{"role": "user", "content": turns}]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "role" in t for t in turns):
        raise ValueError("a prompt must be a string or a list of {role, content} messages")
    out = []
    for t in turns:
        content = t.get("content")
        if isinstance(content, list):  # parquet structs carry None for absent fields
            content = [{k: v for k, v in part.items() if v is not None} for part in content]
        out.append({"role": t["role"], "content": content if content is not None else ""})
    return out


def _split_conversation(prompt: Any, chosen: Any, rejected: Any) -> tuple[list[dict], str, str]:
    """TRL explicit-prompt rows (prompt + chosen/rejected as text or assistant messages) and implicit-prompt rows
    (chosen/rejected hold the whole conversation; the shared prefix is the prompt) -> (turns, chosen, rejected)."""
    if prompt is None:
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise ValueError("rows without a prompt need chosen and rejected as message lists")
        chosen, rejected = _clean_turns(chosen), _clean_turns(rejected)
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise ValueError("chosen and rejected share no prompt turns")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    turns = _clean_turns(prompt)

    def response(x: Any) -> str:
        if isinstance(x, str):
            return x
        msgs = _clean_turns(x)
        if any(m["role"] != "assistant" for m in msgs):
            raise ValueError("chosen / rejected messages after the prompt must be assistant turns")
        return "".join(_text_of(m["content"]) for m in msgs)

    return turns, response(chosen), response(rejected)


def _image_bytes(item: Any, base: Path, where: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return _read_file(base, item, where, "image path")
    if isinstance(item, dict):
        if item.get("bytes"):
            data = item["bytes"]
            return base64.b64decode(data) if isinstance(data, str) else bytes(data)
        if item.get("path"):
            return _read_file(base, item["path"], where, "image path")
    raise ValueError(f"cannot read an image from {type(item).__name__} (valid: bytes, a path, {{bytes}} or {{path}})")


def _trl_sample(rec: dict, key: str, where: str, base: Path, ctx: _Ctx, defaults: dict) -> dict | None:
    is_stic = "image" in rec and "images" not in rec and "prompt" not in rec
    try:
        if is_stic:
            images = [_image_bytes(rec["image"], base, where)]
            turns, chosen, rejected = _split_conversation(None, rec["chosen"], rec["rejected"])
            if isinstance(turns[0]["content"], str):  # STIC stores text only: the image goes with the first turn
                turns[0]["content"] = [{"type": "image"}, {"type": "text", "text": turns[0]["content"]}]
            prov = {"dataset": "stic", "origin": "self", **{k: v for k, v in defaults.items() if k != "origin"}}
            if rec.get("image_corruption"):
                prov["corruption"] = "image_corruption"
            elif rec.get("hallu_prompt"):
                prov["corruption"] = "hallucination_prompt"
                prov["hallu_prompt"] = rec["hallu_prompt"]
            rejected_images = []
        else:
            raw_images = rec.get("images") or []
            images = [_image_bytes(i, base, where) for i in raw_images]
            rejected_images = [_image_bytes(i, base, where) for i in (rec.get("rejected_images") or [])]
            turns, chosen, rejected = _split_conversation(rec.get("prompt"), rec["chosen"], rec["rejected"])
            prov = {**defaults, **{k: rec[k] for k in ("origin", "generator", "corruption", "similarity")
                                   if rec.get(k) is not None}, **(rec.get("provenance") or {})}
    except UnsafeSourceError:
        raise
    except OSError as err:
        ctx.drop(where, "missing_file", str(err))
        return None
    except (KeyError, ValueError, TypeError) as err:
        ctx.drop(where, "bad_entry", str(err))
        return None
    if not images:
        ctx.drop(where, "no_image", "vlm_pair needs at least one image")
        return None
    try:
        return vlm_pair_sample(key, images, prompt=turns, chosen=chosen, rejected=rejected,
                               rejected_images=rejected_images, provenance=prov)
    except SampleError as err:
        ctx.drop(where, "bad_entry", err.reason)
        return None


def _trl_records(path: Path) -> tuple[int, Callable[[], Iterator[dict]]]:
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", f"{path.name}: reading TRL rows from parquet")
        pf = _open_parquet(pq, path)

        def gen() -> Iterator[dict]:
            for batch in pf.iter_batches(batch_size=64):
                yield from batch.to_pylist()

        return pf.metadata.num_rows, gen
    if path.suffix == ".json":  # a JSON array of rows (STIC's convert_jsonl_to_json output)
        try:
            rows = json.loads(_read_text(path, "JSON file"))
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(rows, list):
            raise ConversionError(f"{path}: a .json input must hold a list of rows (use .jsonl for one per line)")
        return len(rows), lambda: iter(rows)
    lines = _read_text(path, "JSONL file").splitlines()

    def gen_lines() -> Iterator[dict]:
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    yield {"__bad_json__": str(err)}

    return len(lines), gen_lines


def convert_trl(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                image_root: str | os.PathLike | None = None, origin: str = "unknown", generator: str | None = None,
                options: ConvertOptions | None = None) -> Manifest:
    """TRL preference rows (`images`, `prompt`, `chosen`, `rejected`; JSONL or parquet, conversational or not,
    explicit or implicit prompt) and STIC JSONL rows (`image`, `chosen`/`rejected` conversations,
    `image_corruption`, `hallu_prompt`) -> `vlm_pair` shards.

    Images: bytes, `{"bytes", "path"}` structs (HF datasets' Image), base64 strings in `{"bytes"}`, or paths
    relative to `image_root` (default: the input file's folder). `origin` / `generator` fill provenance where a
    row does not say (STIC rows are `self`). Optional `rejected_images` (mDPO-style) are kept."""
    ctx = _Ctx(options or ConvertOptions())
    files = _sorted_inputs(inputs, (".jsonl", ".parquet", ".json"))
    defaults = {"origin": origin, **({"generator": generator} if generator else {})}
    readers = [(stem, path, *_trl_records(path)) for stem, path in files]

    def items() -> Iterator[tuple[str, str, tuple[Path, dict]]]:
        for stem, path, _, records in readers:
            base = Path(image_root) if image_root is not None else path.parent
            for i, rec in enumerate(records()):
                yield _row_key(stem, i), f"{path.name} row {i + 1}", (base, rec)

    def make(item: tuple[Path, dict], key: str, where: str) -> dict | None:
        base, rec = item
        if "__bad_json__" in rec:
            ctx.drop(where, "bad_json", rec["__bad_json__"])
            return None
        return _trl_sample(rec, key, where, base, ctx, defaults)

    rows = _rows(items(), sum(total for _, _, total, _ in readers), "trl", ctx, make)
    info = {"from": "trl", "inputs": [{"name": p.name, "bytes": p.stat().st_size} for _, p in files]}
    return _write(out, "vlm_pair", rows, ctx, info)


CONVERTERS = {"pickapic": convert_pickapic, "hpdv2": convert_hpdv2, "jsonl": convert_jsonl,
              "videoalign": convert_videoalign, "trl": convert_trl}
