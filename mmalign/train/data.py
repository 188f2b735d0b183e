"""Endless, deterministic micro-batch streams over `mmalign.data` readers, for any task.

Order depends only on (seed, epoch, rank, world size), so a resumed run replays the stream and skips the
micro-batches it already consumed: the data position is exact.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Callable, Iterator

import torch

# A DataLoader worker hands each tensor of a batch over in its own shared-memory segment (a file descriptor sent
# over a socket, then mapped): about 0.35 ms per tensor here, most of a tiny model's wait for a batch of five small
# tensors. Tensors up to this size travel pickled inline instead (as numpy arrays), and become tensors again in the
# training process; larger ones (image batches at training resolution) keep the shared-memory path.
INLINE_BYTES = 1 << 20


class _Inline:
    """A small tensor's values, pickled with the batch (a numpy array)."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def _walk(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`leaf` applied to every value inside (nested) dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: _walk(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, leaf) for v in value)
    return leaf(value)


def _to_inline(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype != torch.bfloat16 \
            and value.numel() * value.element_size() <= INLINE_BYTES:
        return _Inline(value.numpy())
    return value


def _from_inline(value: Any) -> Any:
    return torch.from_numpy(value.array) if isinstance(value, _Inline) else value


def _inline_small_tensors(collate: Callable, samples: list) -> Any:
    """Runs in the worker: the collated batch with its small tensors as `_Inline`."""
    return _walk(collate(samples), _to_inline)


def _skip_totals(dataset) -> tuple[int, Counter] | None:
    stats = getattr(dataset, "stats", None)
    return None if stats is None else (int(stats.skipped), Counter(stats.reasons))


def _add_skips(batch: dict, n: int, reasons: Counter) -> None:
    batch["skipped"] = int(batch.get("skipped", 0)) + n
    merged = Counter(batch.get("skip_reasons") or {})
    merged.update(reasons)
    batch["skip_reasons"] = dict(merged)


def _with_tail_skips(loader, dataset) -> Iterator[tuple[dict, tuple[int, Counter] | None]]:
    """(batch, None) for each batch of one pass, the last one as (batch, (n, reasons)): the skips of this pass
    that no batch reported (the dataset's shared counters, complete once the loader is exhausted, less what the
    batches carried). One batch is held back to know which is last."""
    before = _skip_totals(dataset)
    carried, carried_reasons = 0, Counter()
    held = None
    for batch in loader:
        carried += int(batch.get("skipped", 0))
        carried_reasons.update(batch.get("skip_reasons") or {})
        if held is not None:
            yield held, None
        held = batch
    if held is None:
        return
    after = _skip_totals(dataset)
    if before is None or after is None:
        yield held, None
        return
    reasons = after[1] - before[1]
    reasons.subtract(carried_reasons)
    reasons = Counter({k: v for k, v in reasons.items() if v > 0})
    n = max(0, after[0] - before[0] - carried)
    yield held, ((n, reasons) if n else None)


def _guard_worker_errors(batches: Iterator) -> Iterator:
    """A strict-mode corrupt sample raised in a DataLoader worker reaches the caller as its one-line error, not the
    worker's traceback text."""
    from mmalign.data.dataset import CorruptSampleError

    try:
        yield from batches
    except CorruptSampleError as err:
        clean = CorruptSampleError.from_worker(err)
        if clean is err:
            raise
        raise clean from None


def endless_batches(dataset, collate: Callable, batch_size: int, *, skip: int = 0, num_workers: int = 0,
                    what: str = "data.shards") -> Iterator[dict]:
    """Micro-batches of `batch_size` from a `mmalign.data` reader, epoch after epoch (`dataset.set_epoch`); the
    first `skip` are consumed silently. Each batch gains `epoch`.

    Incomplete last batches are dropped so every micro-batch has the same size. Raises ValueError naming `what`
    if an epoch yields no batch at all (too few usable samples for this rank).

    Skip counts: a batch's `skipped` / `skip_reasons` cover the bad samples read just before its samples; bad samples
    read after an epoch's last full batch (before the samples `drop_last` discards, or after a worker's last
    sample) are added to that epoch's last batch, from the dataset's `stats`. So the batches of an epoch count
    every bad sample the epoch read exactly once.
    """
    from torch.utils.data import DataLoader

    if num_workers > 0:
        collate = partial(_inline_small_tensors, collate)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, drop_last=True,
                        num_workers=num_workers, persistent_workers=False)
    epoch, produced = 0, 0
    while True:
        dataset.set_epoch(epoch)
        n = 0
        for batch, tail in _guard_worker_errors(_with_tail_skips(loader, dataset)):
            n += 1
            produced += 1
            if produced <= skip:
                continue
            if num_workers > 0:
                batch = _walk(batch, _from_inline)
            if tail is not None:
                _add_skips(batch, *tail)
            batch["epoch"] = epoch
            yield batch
        if n == 0:
            stats = getattr(dataset, "stats", None)
            raise ValueError(f"{what}: no usable batch of {batch_size} for this rank (too few samples, all ties, "
                             f"or all corrupt); skipped bad samples: {stats.skipped if stats else '?'}")
        epoch += 1
