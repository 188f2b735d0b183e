"""`mmalign quickstart`: the first command a new user runs.

Until the toy-world quickstart lands (base model pretrained on noisy captions, generated pairs, evaluation with a
ground-truth reward), this runs the smallest real end-to-end job: Diffusion-DPO on the tiny SD-1.5-style pipeline
and toy preference pairs shipped in `assets/tiny/`, through the same trainer and recipe format as SDXL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny"

DEFAULT = {
    "run": {"output_dir": "runs/quickstart", "seed": 0, "overwrite": True},
    "model": {"pretrained": str(ASSETS / "sd15")},
    "method": {"name": "dpo", "beta": 5000},
    "data": {"shards": str(ASSETS / "pairs"), "schema": "pair", "resolution": 32, "shuffle_buffer": 64},
    "optim": {"lr": 2e-5, "lr_warmup_steps": 2},
    "train": {"max_steps": 40, "batch_size": 4, "checkpoint_every": 20},
    "validation": {"prompts": ["a red circle on the left", "a blue square on the right"],
                   "num_inference_steps": 8, "images_per_prompt": 2},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override the embedded default config")


def run(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError, apply_overrides, validate_config
    from mmalign.train.config import TrainConfig
    from mmalign.train.trainer import train

    if not (ASSETS / "sd15" / "model_index.json").is_file():
        print(f"mmalign quickstart: the tiny assets are missing at {ASSETS}; run "
              "`python scripts/make_tiny_assets.py` from a clone of the repository", file=sys.stderr)
        return 2
    try:
        data, touched = apply_overrides(DEFAULT, args.overrides)
        cfg = validate_config(TrainConfig, data, "<quickstart default>", touched)
    except ConfigError as err:
        print(f"mmalign quickstart: invalid override:\n{err}", file=sys.stderr)
        return 2
    print("mmalign quickstart: the toy-world quickstart is not built yet; running the smallest end-to-end job: "
          "Diffusion-DPO on a tiny SD-1.5-style pipeline (random weights) with 256 toy preference pairs.")
    result = train(cfg)
    from mmalign.train.metrics import read_metrics

    rows = read_metrics(result.run_dir)
    last = rows[-10:]
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    print(f"\ndone: {result.global_step} steps. Step 1 loss {rows[0]['loss']:.4f} (ln 2 = 0.6931 when the policy "
          f"equals its reference); last {len(last)} steps: mean loss {mean('loss', last):.4f}, mean implicit "
          f"accuracy {mean('rewards/accuracies', last):.2f}")
    print(f"run folder: {result.run_dir} (config.yaml, metrics.jsonl, tb/, checkpoints/, unet/, samples/)")
    return 0
