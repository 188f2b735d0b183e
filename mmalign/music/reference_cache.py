"""Precomputed reference log-probs (`reference: precomputed`): every pair of a `music_pair` shard set scored once
under the reference and stored in a cache next to the shards, so training needs no reference model in memory.

Each entry holds the chosen and rejected code log-probs (sums and token counts) and the sha256 of what they were
computed on (the prompt and both code arrays), checked against every batch that reads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmalign.music.adapter import MusicAdapter

REF_CACHE_NAME = "music_ref_logps"


def pair_hash(prompt: str, chosen: Tensor, rejected: Tensor) -> str:
    """sha256 of a pair as scored: the prompt and both (K, T) code arrays (as int64, with their shapes)."""
    h = hashlib.sha256(prompt.encode() + b"\0")
    for codes in (chosen, rejected):
        arr = np.ascontiguousarray(codes.detach().cpu().numpy().astype(np.int64))
        h.update(f"{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _batch_pairs(batch: dict[str, Any]) -> list[tuple[str, Tensor, Tensor]]:
    """(prompt, chosen codes, rejected codes) per pair of a `collate_music_pairs` batch, padding removed."""
    n = len(batch["keys"])
    codes, lengths = batch["codes"], batch["lengths"]
    return [(batch["prompts"][i], codes[i, :, : int(lengths[i])], codes[n + i, :, : int(lengths[n + i])])
            for i in range(n)]


def precompute_reference_logps(adapter: MusicAdapter, shards: str, *, batch_size: int = 8, overwrite: bool = False,
                               progress: bool = True) -> Path:
    """Score every pair of a `music_pair` shard set once under the adapter's reference and store the log-probs in a
    cache next to the shards (keyed by `adapter.producer()`). Samples the model cannot score are skipped and logged
    (training skips them too). Returns the cache folder."""
    from tqdm.auto import tqdm

    from mmalign.data.cache import CacheWriter
    from mmalign.data.collate import collate_music_pairs
    from mmalign.music.codes import CheckedMusicPairDataset

    ds = CheckedMusicPairDataset(shards, num_codebooks=adapter.num_codebooks, vocab_size=adapter.vocab_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_music_pairs)
    device = next(adapter.model.parameters()).device
    with CacheWriter(shards, REF_CACHE_NAME, adapter.producer(), overwrite=overwrite) as writer:
        for batch in tqdm(loader, desc="reference log-probs", disable=not progress):
            n = len(batch["keys"])
            inputs = adapter.encode(list(batch["prompts"]) * 2, batch["codes"], batch["codes_mask"],
                                    [f"{k} ({s})" for s in ("chosen", "rejected") for k in batch["keys"]])
            lp = adapter.reference_logps(inputs.to(device))
            for j, (shard, key, pair) in enumerate(zip(batch["shards"], batch["keys"], _batch_pairs(batch))):
                entry = {"pair_sha256": np.frombuffer(bytes.fromhex(pair_hash(*pair)), dtype=np.uint8).copy()}
                for r, side in enumerate(("chosen", "rejected")):
                    entry[f"{side}_sum"] = lp.sum[r * n + j].detach().double().cpu().numpy()
                    entry[f"{side}_count"] = lp.count[r * n + j].cpu().numpy()
                writer.add(shard, key, entry)
    return writer.dir


def cached_reference(batch: dict[str, Any]) -> Tensor:
    """The cached reference log-probs (2, B) [chosen; rejected] of a batch read with
    `caches={REF_CACHE_NAME: adapter.producer()}`, checked against the batch's prompts and codes."""
    cache = batch.get("cache", {}).get(REF_CACHE_NAME)
    if cache is None:
        raise ValueError(f"the batch has no {REF_CACHE_NAME!r} cache; read the shards with "
                         f"caches={{'{REF_CACHE_NAME}': adapter.producer()}} (built by mmalign train CONFIG "
                         "--cache-only)")
    for j, (key, pair) in enumerate(zip(batch["keys"], _batch_pairs(batch))):
        stored = bytes(cache["pair_sha256"][j].to(torch.uint8).tolist()).hex()
        if stored != pair_hash(*pair):
            raise ValueError(f"sample {key}: its prompt or codes differ from those the cached reference log-probs "
                             "were computed on; rebuild the cache (precompute_reference_logps)")
    return torch.stack([cache["chosen_sum"].double(), cache["rejected_sum"].double()])
