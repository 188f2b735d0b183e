"""`mmalign train CONFIG [key=value ...]`: load a recipe of any registered task, apply overrides, train."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe (see configs/); its `task:` key picks the task (default t2i)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=1e-5 train.max_steps=10")
    parser.add_argument("--cache-only", action="store_true",
                        help="encode the shards once into the task's cache (t2i: VAE posteriors, text embeddings, "
                             "SDXL sizes; flow: VAE latents and text embeddings of images or clips; next to the "
                             "shards) and exit; then train with data.cache=true")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError, config_to_yaml
    from mmalign.train.tasks import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        sep = "\n" if "\n" in str(err) else " "  # one problem: one line
        print(f"mmalign train: invalid config:{sep}{err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.cache_only and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("mmalign train --cache-only: run it in one process (python -m mmalign.cli train CONFIG "
              "--cache-only), not under a multi-process launcher: one writer builds the cache", file=sys.stderr)
        return 2
    from mmalign.data.cache import StaleCacheError
    from mmalign.data.dataset import CorruptSampleError
    from mmalign.data.manifest import ManifestError
    from mmalign.data.safety import UnsafeSourceError
    from mmalign.models.loading import ModelLoadError
    from mmalign.train.tasks import task_for
    from mmalign.train.trainer import TrainingError, train

    what = "train --cache-only" if args.cache_only else "train"
    try:
        if args.cache_only:
            print(f"mmalign train --cache-only: wrote {task_for(cfg).build_cache()}")
        else:
            train(cfg)
    except (TrainingError, ModelLoadError, ManifestError, UnsafeSourceError, StaleCacheError, CorruptSampleError,
            NotImplementedError) as err:
        # Bad input found before or during the run (strict mode: a corrupt sample): the message names the key,
        # file or sample; no traceback needed.
        print(f"mmalign {what}: {err}", file=sys.stderr)
        return 2
    return 0
