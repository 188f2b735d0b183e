"""Prompt files: what `mmalign selfgen` (and later `mmalign guide`) read prompts from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Prompts from a `.jsonl` file (a string "prompt" or "caption" field per line) or any other text file (one
    prompt per line). Blank lines are skipped, and in text files so are lines starting with '#' (comments).
    `limit` stops after that many prompts. Errors name the file (and line)."""
    return [prompt for prompt, _ in read_prompt_rows(path, limit)]


def read_prompt_rows(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, int | None]]:
    """(prompt, seed) rows, read as `read_prompts` reads prompts; a JSONL row may give an integer "seed" in
    [0, 2^63) (None when absent)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} not found (one prompt per line, or JSONL with a 'prompt' field)")
    prompts: list[tuple[str, int | None]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{n}: not a JSON line ({err.msg})") from None
            text = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{p}:{n}: each JSON line needs a string 'prompt' (or 'caption') field")
            seed = row.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
                raise ValueError(f"{p}:{n}: 'seed' must be an integer in [0, 2^63), got {seed!r}")
            prompts.append((text, seed))
        elif not line.lstrip().startswith("#"):
            prompts.append((line.strip(), None))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompt (one per line; '#' starts a comment)")
    return prompts


def prompt_batches(path: str, batch_size: int, *, seed: int, rank: int, world_size: int, skip: int,
                   limit: int | None = None) -> Iterator[dict]:
    """Endless micro-batches `{"captions", "keys", "epoch"}` of prompts for online training: each epoch a fresh
    permutation (seeded by `seed` and the epoch), dealt to the ranks in turn, incomplete batches dropped; the first
    `skip` are consumed silently (resume)."""
    import numpy as np

    prompts = [p for p, _ in read_prompt_rows(path, limit=limit)]
    per_epoch = len(prompts) // (batch_size * world_size)
    if per_epoch == 0:
        raise ValueError(f"{path}: {len(prompts)} prompts are fewer than train.batch_size {batch_size} x "
                         f"{world_size} processes")
    produced, epoch = 0, 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        for j in range(per_epoch):
            produced += 1
            if produced <= skip:
                continue
            start = (j * world_size + rank) * batch_size
            idx = order[start:start + batch_size].tolist()
            yield {"captions": [prompts[i] for i in idx], "keys": [f"prompt-{i:06d}" for i in idx], "epoch": epoch}
        epoch += 1
