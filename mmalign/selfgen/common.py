"""Helpers the self-generation pipelines share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def chunked(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of `n` items (the last may be shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of prompt `prompt_index` in a run seeded `seed` (`selfgen ranked`,
    `selfgen music`): one stream per (prompt, sample), whatever the batching or the point a run resumed from."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def open_stage(stage: Path, run_info: dict, overwrite: bool, changes: Callable[[Any, dict], list[str]],
               what: str, logger: str) -> None:
    """Make (or reuse) a resumable run's staging folder keyed by `run_info` (written to `stage/run.json`).

    A staging folder of another run (another key, or no readable key) is refused, naming `changes(staged, run_info)`
    (its differences in words) and what the staged `what` are; with `overwrite` it is discarded with a warning
    instead."""
    import json
    import logging
    import shutil

    from mmalign.config import atomic_write_text

    stage.mkdir(parents=True, exist_ok=True)
    info_path = stage / "run.json"
    if info_path.is_file() or any(stage.iterdir()):
        try:
            staged = json.loads(info_path.read_text())
        except (OSError, ValueError):
            staged = None
        if staged != run_info:
            differ = changes(staged, run_info)
            if not overwrite:
                raise ValueError(f"{stage} holds an unfinished run made with other {', '.join(differ)}; its staged "
                                 f"{what} cannot be reused. Pass --overwrite (overwrite=True) to discard it and "
                                 "start again, or use another --out")
            logging.getLogger(logger).warning("discarding the staged run in %s (other %s)", stage, ", ".join(differ))
            shutil.rmtree(stage)
            stage.mkdir(parents=True)
    atomic_write_text(info_path, json.dumps(run_info))
