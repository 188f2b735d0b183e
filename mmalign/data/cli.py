"""`mmalign shards convert | validate | info`. Thin: each command calls one library function."""

from __future__ import annotations

import argparse
import json
import sys

FORMATS = ("pickapic", "hpdv2", "jsonl", "videoalign", "trl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="shards_command", metavar="{convert,validate,info}")

    conv = sub.add_parser("convert", help="convert a public preference format to webdataset shards",
                          description="Convert a public preference format to a shard set (tar shards + "
                                      "manifest.json). Same input -> byte-identical shards.")
    conv.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="input format")
    conv.add_argument("inputs", nargs="+", help="input files (pickapic/trl: files or folders; others: one file)")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--ties", choices=("drop", "keep", "coin"), default="drop",
                      help="pairs labelled 0.5: drop them, keep them as ties, or pick a winner by a seeded coin "
                           "(default: drop)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the tie coin (default 0)")
    conv.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    conv.add_argument("--max-bytes", default="512MiB", help="bytes per shard at most, e.g. 512MiB, 1GB")
    conv.add_argument("--overwrite", action="store_true", help="replace a complete shard set in --out")
    conv.add_argument("--limit", type=int, default=None, help="convert only the first N input rows")
    conv.add_argument("--strict", action="store_true", help="stop at the first unusable row instead of dropping it")
    conv.add_argument("--schema", choices=("pair", "ranked"), default=None,
                      help="hpdv2 / jsonl: output schema (hpdv2 default pair; jsonl: from the first line)")
    conv.add_argument("--image-root", default=None, help="hpdv2 / trl: folder image paths are relative to")
    conv.add_argument("--video-root", default=None, help="videoalign: folder video paths are relative to")
    conv.add_argument("--origin", choices=("human", "ai", "self", "unknown"), default="unknown",
                      help="trl: provenance origin for rows that do not say (STIC rows are 'self')")
    conv.add_argument("--generator", default=None, help="trl: provenance generator for rows that do not say")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    conv.set_defaults(_shards=_convert)

    val = sub.add_parser("validate", help="check every sample, decode every media file, verify checksums",
                         description="Check a shard set: schema of every sample, decoding of every image / video "
                                     "/ array, shard checksums and counts. Exit code 1 on any error.")
    val.add_argument("dir", help="shard-set folder (with manifest.json)")
    val.add_argument("--no-decode", action="store_true", help="skip decoding media (structure and checksums only)")
    val.add_argument("--max-print", type=int, default=200, help="print at most this many errors (default 200)")
    val.add_argument("--max-member-bytes", default=None,
                     help="report tar members larger than this without reading them, e.g. 512MiB (default: 512MiB "
                          "or MMALIGN_MAX_MEMBER_BYTES)")
    val.set_defaults(_shards=_validate)

    info = sub.add_parser("info", help="summarise a shard set from its manifest",
                          description="Print schema, counts, sizes, conversion counts and caches of a shard set.")
    info.add_argument("dir", help="shard-set folder (with manifest.json)")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(_shards=_info)


def run(args: argparse.Namespace) -> int:
    handler = getattr(args, "_shards", None)
    if handler is None:
        print("mmalign shards: choose a command: convert, validate or info (see --help)", file=sys.stderr)
        return 2
    return handler(args)


def _convert(args: argparse.Namespace) -> int:
    from mmalign.data.convert import CONVERTERS, ConversionError, ConvertOptions
    from mmalign.data.deps import MissingDependencyError
    from mmalign.data.safety import UnsafeSourceError
    from mmalign.data.writer import parse_size

    single = {"hpdv2", "jsonl", "videoalign"}
    if args.fmt in single and len(args.inputs) != 1:
        print(f"mmalign shards convert: --from {args.fmt} takes one input file, got {len(args.inputs)}",
              file=sys.stderr)
        return 2
    misplaced = [name for name, value, formats in (
        ("--schema", args.schema, {"hpdv2", "jsonl"}), ("--image-root", args.image_root, {"hpdv2", "trl"}),
        ("--video-root", args.video_root, {"videoalign"}), ("--generator", args.generator, {"trl"}),
    ) if value is not None and args.fmt not in formats]
    if misplaced:
        print(f"mmalign shards convert: {', '.join(misplaced)} do(es) not apply to --from {args.fmt}",
              file=sys.stderr)
        return 2
    try:
        opts = ConvertOptions(max_count=args.max_count, max_bytes=parse_size(args.max_bytes),
                              overwrite=args.overwrite, ties=args.ties, seed=args.seed, limit=args.limit,
                              strict=args.strict, progress=False if args.no_progress else None)
        fn = CONVERTERS[args.fmt]
        if args.fmt in ("pickapic",):
            manifest = fn(args.inputs, args.out, options=opts)
        elif args.fmt == "trl":
            manifest = fn(args.inputs, args.out, image_root=args.image_root, origin=args.origin,
                          generator=args.generator, options=opts)
        elif args.fmt == "hpdv2":
            manifest = fn(args.inputs[0], args.out, image_root=args.image_root, schema=args.schema or "pair",
                          options=opts)
        elif args.fmt == "jsonl":
            manifest = fn(args.inputs[0], args.out, schema=args.schema, options=opts)
        else:
            manifest = fn(args.inputs[0], args.out, video_root=args.video_root, options=opts)
    except (ConversionError, UnsafeSourceError, FileExistsError, ValueError, OSError, MissingDependencyError) as err:
        print(f"mmalign shards convert: {err}", file=sys.stderr)
        return 1
    counts = manifest.conversion.get("counts", {})
    reasons = ", ".join(f"{k} {v}" for k, v in counts.get("dropped_reasons", {}).items()) or "none"
    print(f"{args.fmt}: {counts.get('rows', 0)} rows read, {counts.get('kept', 0)} kept, "
          f"{counts.get('dropped', 0)} dropped ({reasons})")
    print(f"ties: {counts.get('ties', 0)} seen, {counts.get('ties_dropped', 0)} dropped, "
          f"{counts.get('ties_kept', 0)} kept, {counts.get('ties_coin', 0)} resolved by coin (policy {args.ties})")
    absent = manifest.conversion.get("absent_columns")
    if absent:
        print(f"absent columns (not carried): {', '.join(absent)}"
              + ("; without has_label every row counts as labeled" if "has_label" in absent else ""))
    print(f"wrote {manifest.num_samples} {manifest.schema_name} samples in {len(manifest.shards)} shard(s), "
          f"{manifest.total_bytes / 2**20:.1f} MiB, to {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from mmalign.data.deps import MissingDependencyError
    from mmalign.data.validate import validate_shards
    from mmalign.data.writer import parse_size

    try:
        limit = None if args.max_member_bytes is None else parse_size(args.max_member_bytes)
    except ValueError as err:
        print(f"mmalign shards validate: --max-member-bytes: {err}", file=sys.stderr)
        return 2
    try:
        report = validate_shards(args.dir, decode=not args.no_decode, max_member_bytes=limit)
    except MissingDependencyError as err:
        print(f"mmalign shards validate: {err}", file=sys.stderr)
        return 1
    for issue in report.issues[: args.max_print]:
        print(f"ERROR\t{issue}")
    if len(report.issues) > args.max_print:
        print(f"... {len(report.issues) - args.max_print} more error(s)")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(report.summary())
    return 0 if report.ok else 1


def _info(args: argparse.Namespace) -> int:
    from mmalign.data.cache import list_caches
    from mmalign.data.manifest import ManifestError, load_manifest

    try:
        man = load_manifest(args.dir)
    except ManifestError as err:
        print(f"mmalign shards info: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(man.to_json(), end="")
        return 0
    counts = [s.count for s in man.shards]
    print(f"{args.dir}: schema {man.schema_name} v{man.schema_version}, {man.num_samples} samples, "
          f"{len(man.shards)} shard(s), {man.total_bytes / 2**20:.1f} MiB ({man.created_by})")
    if counts:
        print(f"samples per shard: min {min(counts)}, max {max(counts)}")
    if man.schema_name == "pair":
        print(f"ties (label_0 = 0.5): {sum(s.ties or 0 for s in man.shards)}")
    if man.conversion:
        conv = {k: v for k, v in man.conversion.items() if k != "inputs"}
        print("conversion: " + json.dumps(conv, sort_keys=True))
    for cache in list_caches(args.dir):
        print(f"cache {cache.name} [{cache.key}] ({cache.storage}): producer {json.dumps(cache.producer)}")
    return 0
