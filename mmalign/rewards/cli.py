"""`mmalign score --scorers hps,pickscore --in SHARDS --out DIR`: batch scoring of shards (see `scoring.py`).

Several processes: `torchrun --nproc_per_node N -m mmalign.cli score ...` or `accelerate launch -m mmalign.cli
score ...`; every process scores its own shards. `--ray` runs on Ray Data instead (the `ray` extra).
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("fp32", "fp16", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorers", required=True,
                        help="comma-separated scorer specs: NAME[=SOURCE] (clip_score, pickscore, hps, aesthetic, "
                             "video, toy, toy_color, ...), an exported reward-model folder, or package.module:function")
    parser.add_argument("--in", dest="source", required=True, help="shard-set folder (with manifest.json)")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per scorer)")
    parser.add_argument("--batch-size", type=int, default=32, help="images (or videos) per forward pass (32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="scorer weights dtype (fp32)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (0)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable/unscorable sample")
    parser.add_argument("--ray", action="store_true", help="run on Ray Data (needs the ray extra; RAY_ADDRESS)")
    parser.add_argument("--ray-actors", type=int, default=1, help="Ray: scoring actors (1)")
    parser.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="Ray: GPUs per actor (0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def scorer_specs(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    import torch

    from mmalign.rewards.base import ScorerError
    from mmalign.rewards.scoring import ScoreError, score_shards, score_shards_ray

    specs = scorer_specs(args.scorers)
    try:
        if args.ray:
            report = score_shards_ray(args.source, args.out, specs, batch_size=args.batch_size,
                                      num_actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
                                      strict=args.strict, progress=not args.no_progress)
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
            report = score_shards(args.source, args.out, specs, batch_size=args.batch_size, device=args.device,
                                  dtype=dtype, strict=args.strict, num_workers=args.num_workers,
                                  progress=not args.no_progress)
    except (ScoreError, ScorerError, ValueError, FileNotFoundError) as err:
        print(f"mmalign score: {err}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.skip_reasons.items())) or "none"
    print(f"mmalign score: {report.shards_scored} shards scored, {report.shards_already_done} already done, "
          f"{report.samples} samples, {report.skipped} skipped ({reasons}) -> {args.out}")
    from mmalign.rewards.scoring import format_summary, score_summary

    for name in report.scorers:
        try:  # once every shard is scored (other processes may still be writing theirs)
            print(f"mmalign score: {format_summary(score_summary(args.out, name, args.source))}")
        except ScoreError:
            pass
    return 0
