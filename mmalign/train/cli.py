"""`mmalign train CONFIG [key=value ...]`: load a recipe, apply overrides, train."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=1e-5 train.max_steps=10")
    parser.add_argument("--cache-only", action="store_true",
                        help="encode the shards into the latent/text-embedding cache at data.cache and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError, config_to_yaml, load_config
    from mmalign.train.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"mmalign train: invalid config:\n{err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.cache_only:
        print("mmalign train --cache-only: not built yet: the latent + text-embedding cache for training",
              file=sys.stderr)
        return 2
    from mmalign.train.trainer import train

    train(cfg)
    return 0
