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


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of prompt `prompt_index` in a run seeded `seed` (`selfgen ranked`,
    `selfgen music`): one stream per (prompt, sample), whatever the batching or the point a run resumed from."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])
