"""`mmalign selfgen COMMAND`: one sub-command per way of generating preference data.

To add one, add a row to `SELFGEN_COMMANDS`: the module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse

# name -> (module, help)
SELFGEN_COMMANDS: dict[str, tuple[str, str]] = {
    "ranked": ("mmalign.selfgen.ranked",
               "K images per prompt from diffusers generators, ranked by several reward models -> ranked shards"),
    "stic": ("mmalign.vlm.stic", "STIC: VLM preference pairs from unlabeled images (+ stage-2 SFT rows)"),
    "bdhs": ("mmalign.vlm.bdhs", "BDHS: VLM rejected answers with the image mostly hidden -> vlm_pair shards"),
    "spo": ("mmalign.selfgen.spo", "SPO's step-wise resampler: branches of one DDIM trajectory scored by a step-aware "
                                   "preference model -> step_pair shards"),
    "music": ("mmalign.selfgen.music", "N MusicGen samples per prompt scored by audio rewards (CLAP, your functions): "
                                       "best vs worst codes -> music_pair shards (--ranked: all N -> "
                                       "music_ranked lists)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmalign.cli import add_nested_commands

    add_nested_commands(parser, SELFGEN_COMMANDS, dest="selfgen_command")


def run(args: argparse.Namespace) -> int:
    from mmalign.cli import run_nested_command

    return run_nested_command(args, "selfgen", SELFGEN_COMMANDS)
