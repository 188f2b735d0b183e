"""`mmalign bench NAME`: one sub-command per benchmark.

To add one, add a row to `BENCH_COMMANDS`: the module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse

# name -> (module, help)
BENCH_COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("mmalign.toy.bench",
            "every text-to-image method (sft, dpo, mapo, rankdpo) on the same toy data over several seeds: "
            "reward gain, win rate and drift from the base"),
    "toy-sweep": ("mmalign.toy.sweep",
                  "the fair method table: sft, dpo, mapo, rankdpo and spo each with a 3 beta x 2 lr sweep chosen on "
                  "validation prompts, reported on held-out prompts over 3 seeds, with gain against training compute"),
    "toy-video": ("mmalign.flow.proof",
                  "Flow-DPO, Flow-RWR and SFT (offline pairs and online) on the video toy world over several seeds: "
                  "per-dimension gains, win rates and drift from the base"),
    "toy-video-sweep": ("mmalign.flow.sweep",
                        "the video world's fair method table: sft, flow_dpo, flow_rwr and online Flow-DPO each with a "
                        "small sweep (beta or tau x 2 lr) chosen on validation prompts, reported on held-out prompts "
                        "over 3 seeds"),
    "toy-music": ("mmalign.music.proof",
                  "DPO and SFT (the control) on the token-music toy world over several seeds: pattern adherence and "
                  "quality gains, win rates and drift from the base at equal seeds"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmalign.cli import add_nested_commands

    add_nested_commands(parser, BENCH_COMMANDS, dest="bench_command")


def run(args: argparse.Namespace) -> int:
    from mmalign.cli import run_nested_command

    return run_nested_command(args, "bench", BENCH_COMMANDS)
