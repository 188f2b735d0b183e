"""Helpers the self-generation pipelines share."""

from __future__ import annotations

from typing import Iterable, Iterator


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
