"""`mmalign eval reward --scorers SPECS --in SHARDS [--scores DIR] [--out report.json]` (see
`mmalign.rewards.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorers", required=True, help="comma-separated scorer specs (see mmalign score --help)")
    parser.add_argument("--in", dest="source", required=True, help="labelled shard set: pair, ranked or video_pair")
    parser.add_argument("--scores", default=None, help="score folder of mmalign score to reuse / complete")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--batch-size", type=int, default=32, help="images (or videos) per forward pass (32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable/unscorable sample")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mmalign.rewards.base import ScorerError
    from mmalign.rewards.cli import scorer_specs
    from mmalign.rewards.evaluate import evaluate_reward, format_table
    from mmalign.rewards.scoring import ScoreError

    try:
        result = evaluate_reward(args.source, scorer_specs(args.scorers), scores_dir=args.scores,
                                 batch_size=args.batch_size, device=args.device, strict=args.strict,
                                 progress=not args.no_progress)
    except (ScoreError, ScorerError, ValueError, FileNotFoundError) as err:
        print(f"mmalign eval reward: {err}", file=sys.stderr)
        return 2
    if args.out:
        from mmalign.config import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    return 0
