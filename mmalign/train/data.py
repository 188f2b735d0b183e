"""Endless, deterministic micro-batch streams over `mmalign.data` readers, for any task.

Order depends only on (seed, epoch, rank, world size), so a resumed run replays the stream and skips the
micro-batches it already consumed: the data position is exact.
"""

from __future__ import annotations

from typing import Callable, Iterator


def endless_batches(dataset, collate: Callable, batch_size: int, *, skip: int = 0, num_workers: int = 0,
                    what: str = "data.shards") -> Iterator[dict]:
    """Micro-batches of `batch_size` from a `mmalign.data` reader, epoch after epoch (`dataset.set_epoch`); the
    first `skip` are consumed silently. Each batch gains `epoch`.

    Incomplete last batches are dropped so every micro-batch has the same size. Raises ValueError naming `what`
    if an epoch yields no batch at all (too few usable samples for this rank).
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, drop_last=True,
                        num_workers=num_workers, persistent_workers=False)
    epoch, produced = 0, 0
    while True:
        dataset.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            produced += 1
            if produced <= skip:
                continue
            batch["epoch"] = epoch
            yield batch
        if n == 0:
            stats = getattr(dataset, "stats", None)
            raise ValueError(f"{what}: no usable batch of {batch_size} for this rank (too few samples, all ties, "
                             f"or all corrupt); skipped bad samples: {stats.skipped if stats else '?'}")
        epoch += 1
