"""Training data for the text-to-image trainer: shards -> an endless, deterministic stream of micro-batches.

Order depends only on (seed, epoch, rank, world size), so a resumed run replays the stream and skips the
micro-batches it already consumed: the data position is exact. Pairs come out as `[winners; losers]`.
"""

from __future__ import annotations

from typing import Iterator

from mmalign.train.config import TrainConfig


def build_dataset(cfg: TrainConfig, rank: int, world_size: int):
    from mmalign.data.collate import collate_pairs, collate_ranked
    from mmalign.data.dataset import PairDataset, RankedDataset

    d = cfg.data
    transforms = {"resolution": d.resolution, "crop": "center" if d.center_crop else "random",
                  "random_flip": d.random_flip}
    common = dict(transforms=transforms, shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1),
                  seed=cfg.run.seed, rank=rank, world_size=world_size, strict=d.strict)
    if d.schema_name == "ranked":
        return RankedDataset(d.shards, **common), collate_ranked
    # Tied pairs carry no direction for the T2I objectives: they are dropped (and counted in the manifest).
    return PairDataset(d.shards, ties="drop", **common), collate_pairs


def iterate_batches(cfg: TrainConfig, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[dict]:
    """Endless micro-batches of `train.batch_size` groups for this rank; the first `skip` are consumed silently.

    Each epoch is one pass over this rank's share (incomplete last batches are dropped so every micro-batch has
    the same size). Raises if an epoch yields no batch at all (no usable pairs).
    """
    from torch.utils.data import DataLoader

    dataset, collate = build_dataset(cfg, rank, world_size)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=collate, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=False)
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
            raise ValueError(f"data.shards {cfg.data.shards}: no usable batch of {cfg.train.batch_size} for rank "
                             f"{rank} of {world_size} (too few samples, all ties, or all corrupt); "
                             f"skipped bad samples: {dataset.stats.skipped if hasattr(dataset, 'stats') else '?'}")
        epoch += 1
