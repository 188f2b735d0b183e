"""Precomputed reference log-probs (`reference: precomputed`): every pair of a `vlm_pair` shard set scored once
under the reference and stored in a cache next to the shards, so training needs no reference model in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from mmalign.vlm.logprobs import ResponseLogps
from mmalign.vlm.processing import pair_rows

if TYPE_CHECKING:
    from mmalign.vlm.adapter import VLMAdapter


def image_hash(images: Sequence[Any]) -> str:
    """sha256 of decoded RGB pixels and sizes of a sample's images (what a cached reference log-prob saw)."""
    h = hashlib.sha256()
    for im in images:
        im = im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im
        h.update(f"{im.size[0]}x{im.size[1]};".encode())
        h.update(im.tobytes())
    return h.hexdigest()


REF_CACHE_NAME = "vlm_ref_logps"


def reference_cache_producer(adapter: VLMAdapter, rejected_images: bool) -> dict[str, Any]:
    return {**adapter.producer(), "rejected_images": bool(rejected_images)}


def precompute_reference_logps(adapter: VLMAdapter, shards: str, *, batch_size: int = 8,
                               rejected_images: bool = False, overwrite: bool = False,
                               progress: bool = True) -> Path:
    """Score every pair of a `vlm_pair` shard set once under the reference and store the log-probs in a cache
    next to the shards (keyed by model, revision and processor settings; each entry also records the image hash
    and the sample key), so training needs no reference model in memory. Returns the cache folder."""
    from tqdm.auto import tqdm

    from mmalign.data.cache import CacheWriter
    from mmalign.data.collate import collate_vlm_pairs
    from mmalign.data.dataset import VLMPairDataset

    producer = reference_cache_producer(adapter, rejected_images)
    ds = VLMPairDataset(shards, strict=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_vlm_pairs)
    device = next(adapter.model.parameters()).device
    with CacheWriter(shards, REF_CACHE_NAME, producer, overwrite=overwrite) as writer:
        for batch in tqdm(loader, total=-(-len(ds) // batch_size), desc="reference log-probs", disable=not progress):
            p, i, r, k = pair_rows(batch, rejected_images)
            lp = adapter.reference_logps(adapter.encode(p, i, r, k).to(device))
            groups = lp.split(len(batch["keys"]))
            for j, (shard, key) in enumerate(zip(batch["shards"], batch["keys"])):
                entry = {"image_sha256": _hex_bytes(image_hash(batch["images"][j]))}
                for name, g in zip(("chosen", "rejected", "chosen_rejected_image"), groups):
                    entry[f"{name}_sum"] = g.sum[j].detach().double().cpu().numpy()
                    entry[f"{name}_count"] = g.count[j].cpu().numpy()
                writer.add(shard, key, entry)
    return writer.dir


def _hex_bytes(hexdigest: str):
    import numpy as np

    return np.frombuffer(bytes.fromhex(hexdigest), dtype=np.uint8).copy()


def cached_reference(batch: dict[str, Any], rejected_images: bool = False) -> list[ResponseLogps]:
    """The cached reference log-probs of a batch read with `caches={REF_CACHE_NAME: producer}`, checked against
    the batch's images. Returns [chosen, rejected] (+ [chosen under rejected image])."""
    cache = batch.get("cache", {}).get(REF_CACHE_NAME)
    if cache is None:
        raise ValueError(f"the batch has no {REF_CACHE_NAME!r} cache; read the shards with "
                         f"caches={{'{REF_CACHE_NAME}': reference_cache_producer(adapter, ...)}}")
    for j, (key, ims) in enumerate(zip(batch["keys"], batch["images"])):
        stored = bytes(cache["image_sha256"][j].to(torch.uint8).tolist()).hex()
        if stored != image_hash(ims):
            raise ValueError(f"sample {key}: its images differ from those the cached reference log-probs were "
                             "computed on; rebuild the cache (precompute_reference_logps)")
    names = ("chosen", "rejected") + (("chosen_rejected_image",) if rejected_images else ())
    out = []
    for name in names:
        s, c = cache[f"{name}_sum"].double(), cache[f"{name}_count"].long()
        out.append(ResponseLogps(s, s / c.clamp_min(1), c))
    return out
