"""The `mmalign` command: a thin layer over library functions users can also call from Python.

Each subcommand lives in the package that owns its capability and exposes two functions:
`add_arguments(parser)` and `run(args) -> int`. This file only wires them together, so importing it stays
cheap (heavy imports happen inside `run`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    module: str | None  # "package.module" exposing add_arguments/run; None = not built yet
    missing: str = ""  # what is not built yet, shown when module is None


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("train", "train a model with a preference recipe (CONFIG + key=value overrides)", "mmalign.train.cli"),
    Subcommand("score", "score shards with reward models", "mmalign.rewards.cli"),
    Subcommand("guide", "sample with inference-time reward guidance or best-of-N (CONFIG + key=value overrides)",
               "mmalign.guidance.cli"),
    Subcommand("selfgen", "generate preference data with the model itself (STIC, BDHS, ranked sets)",
               "mmalign.selfgen.cli"),
    Subcommand("shards", "convert, validate and inspect webdataset shards", "mmalign.data.cli"),
    Subcommand("eval", "evaluate reward models and aligned models", "mmalign.eval.cli"),
    Subcommand("quickstart", "prove alignment end to end on the toy world (the first command to run)",
               "mmalign.quickstart"),
    Subcommand("bench", "run a benchmark and print ratios against a baseline measured in the same run",
               "mmalign.bench.cli"),
)


def _load(sub: Subcommand):
    if sub.module is None:
        return None
    try:
        return importlib.import_module(sub.module)
    except ModuleNotFoundError as err:
        # Only "the module itself is absent" means not built; a missing dependency inside it is a real error.
        if err.name == sub.module or sub.module.startswith(f"{err.name}."):
            return None
        raise


def comma_choices(flag: str, text: str, valid: Sequence[str], allow_empty: bool = False) -> list[str]:
    """A command's comma-separated subset of `valid` (`"dpo, sft"` -> `["dpo", "sft"]`). ValueError naming the
    flag, what it got and what is valid when it names anything else, or nothing (unless `allow_empty`)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if any(n not in valid for n in names) or not (names or allow_empty):
        raise ValueError(f"{flag} {text!r}: valid are {', '.join(valid)}")
    return names


def add_nested_commands(parser: argparse.ArgumentParser, table: dict[str, tuple[str, str]], dest: str) -> None:
    """Sub-commands of a sub-command (`mmalign eval reward`): `table` maps a name to (module exposing
    add_arguments/run, help)."""
    sub = parser.add_subparsers(dest=dest, metavar="{" + ",".join(table) + "}")
    for name, (module, help_text) in table.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(sp)
        sp.set_defaults(_nested_run=mod.run)


def run_nested_command(args: argparse.Namespace, command: str, table: dict[str, tuple[str, str]]) -> int:
    handler = getattr(args, "_nested_run", None)
    if handler is None:
        print(f"mmalign {command}: choose one of {', '.join(table)} (see --help)", file=sys.stderr)
        return 2
    return int(handler(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmalign",
        description="Align generative and vision-language models with preferences.",
    )
    from mmalign import __version__

    parser.add_argument("--version", action="version", version=f"mmalign {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for sub in SUBCOMMANDS:
        sp = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        module = _load(sub)
        if module is None:
            sp.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            sp.set_defaults(_missing=sub.missing or sub.help)
        else:
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


class _TorchvisionFallbackFilter:
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" warnings. diffusers imports several image processors at import time, so every command
    printed them, and on a torchvision-free install (ours on CPU) the PIL processors are the intended path."""

    def filter(self, record) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


_TORCHVISION_FALLBACK_FILTER = _TorchvisionFallbackFilter()  # one instance: addFilter() skips it when present


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("transformers.utils.import_utils").addFilter(_TORCHVISION_FALLBACK_FILTER)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may come after options (`train cfg.yaml --print-config optim.lr=1e-5`).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None)
    if missing is not None:
        print(f"mmalign {args.command}: not built yet: {missing}.", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
