"""`mmalign eval COMMAND`: one sub-command per kind of evaluation.

To add one, add a row to `EVAL_COMMANDS`: the module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse

# name -> (module, help)
EVAL_COMMANDS: dict[str, tuple[str, str]] = {
    "reward": ("mmalign.eval.reward",
               "reward models vs labelled shards: pairwise accuracy, accuracy with ties, inversion score"),
    "reward-toy": ("mmalign.eval.reward_toy",
                   "toy proof: RankDPO on data ranked by a learned reward model vs by the ground truth"),
    "guide-toy": ("mmalign.eval.guide_toy",
                  "toy proof of reward guidance: colour and noisy-latent rewards, scale sweep, best-of-N vs compute"),
    "vlm-toy": ("mmalign.vlm.proof", "toy proof of VLM DPO on STIC / BDHS pairs vs SFT-only, over seeds"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmalign.cli import add_nested_commands

    add_nested_commands(parser, EVAL_COMMANDS, dest="eval_command")


def run(args: argparse.Namespace) -> int:
    from mmalign.cli import run_nested_command

    return run_nested_command(args, "eval", EVAL_COMMANDS)
