"""Prompt files: what `mmalign selfgen` (and later `mmalign guide`) read prompts from."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
