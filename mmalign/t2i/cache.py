"""The text-to-image latent + text-embedding cache (`mmalign train CONFIG --cache-only`, then `data.cache=true`).

Every image's VAE posterior parameters (mean and log-variance, so a latent drawn from the cache equals one drawn
from a fresh encode with the same generator), the caption's text embeddings (SDXL: and the pooled embedding) and
the winner's original size and crop (SDXL time_ids), written with `mmalign.data.cache` next to the shards (or in
the folder `data.cache` names) and keyed by the encoders (model id, revision, variant, a hash of the local encoder
files, dtype), the resolution and the crop. Training from it never runs the VAE or the text encoders and keeps
them off the accelerator; building it never loads the UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmalign.data.cache import files_fingerprint
from mmalign.models.loading import move_module
from mmalign.t2i.adapter import CACHE_NAME, T2IAdapter, encoder_dtype, load_t2i_components
from mmalign.train.trainer import TrainingError

if TYPE_CHECKING:
    from mmalign.t2i.task import T2ITrainConfig

CACHE_FORMAT_VERSION = 1
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"  # the "" embedding (proportion_empty_prompts), beside the cache


def _encoder_fingerprint(pretrained: str) -> str | None:
    """sha256 over the files of a local pipeline's VAE, text encoders and tokenizers (what the cache holds the
    output of); None for a hub id (then the id and revision key the cache)."""
    return files_fingerprint(pretrained, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))


def cache_producer(cfg: T2ITrainConfig) -> dict:
    """What makes a T2I cache entry: the cache key is a hash of this (see `mmalign.data.cache.cache_key`)."""
    m, d = cfg.model, cfg.data
    return {"kind": "t2i_posterior_text", "version": CACHE_FORMAT_VERSION, "model": m.pretrained,
            "revision": m.revision, "variant": m.variant, "encoders_sha256": _encoder_fingerprint(m.pretrained),
            "encoder_dtype": str(encoder_dtype(cfg.train.mixed_precision)).removeprefix("torch."),
            "resolution": d.resolution,
            "crop": "center"}


def build_cache(cfg: T2ITrainConfig, device: torch.device | str | None = None, progress: bool = True) -> Path:
    """Encode every sample of `data.shards` once (ties and all, so the cache matches the manifest) and write the
    cache for `cfg`; returns its folder. One process; on the accelerator when there is one."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from mmalign.data.cache import CacheWriter
    from mmalign.data.collate import collate_pairs, collate_ranked
    from mmalign.data.dataset import PairDataset, RankedDataset

    d = cfg.data
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    common = dict(transforms={"resolution": d.resolution, "crop": "center", "random_flip": False},
                  shuffle=False, rank=0, world_size=1, strict=d.strict)
    if d.schema_name == "ranked":
        dataset, collate = RankedDataset(d.shards, **common), collate_ranked
    else:
        dataset, collate = PairDataset(d.shards, ties="keep", **common), collate_pairs
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=collate, num_workers=d.num_workers)
    m = cfg.model  # the encoders load only once the shards opened; the UNet is not needed at all
    comps = load_t2i_components(m.pretrained, revision=m.revision, variant=m.variant, load_unet=False,
                                resolution=d.resolution)
    for module in [x for x in (comps.vae, *comps.text_encoders) if x is not None]:
        move_module(module, device, encoder_dtype(cfg.train.mixed_precision))
    adapter = T2IAdapter(comps, reference="none")
    writer = CacheWriter(d.shards, CACHE_NAME, cache_producer(cfg), overwrite=True, root=d.cache_root)
    bar = tqdm(total=len(dataset), desc="cache", disable=not progress)
    for batch in loader:
        pixels = batch["pixel_values"]
        if pixels.ndim == 5:  # ranked (B, K, 3, H, W), stored order
            b, k = pixels.shape[:2]
            post = adapter.encode_images(pixels.flatten(0, 1).to(device)).cpu().unflatten(0, (b, k))
        else:  # pairs [winners; losers] -> stored order (B, 2, ...)
            b = pixels.shape[0] // 2
            post = adapter.encode_images(pixels.to(device)).cpu().unflatten(0, (2, b)).transpose(0, 1)
            swap = batch["winner_index"].bool()  # stored image 1 won: the winner row holds image 1
            post[swap] = post[swap].flip(1)
        cond = adapter.encode_text(list(batch["captions"]))
        for i, (shard, key) in enumerate(zip(batch["shards"], batch["keys"])):
            entry = {"latents": post[i], "prompt_embeds": cond.prompt_embeds[i].cpu(),
                     "original_size": batch["original_sizes"][i], "crop_top_left": batch["crop_top_lefts"][i]}
            if cond.pooled is not None:
                entry["pooled"] = cond.pooled[i].cpu()
            writer.add(shard, key, entry)
        bar.update(b)
    bar.close()
    empty = adapter.encode_text([""])
    tensors = {"prompt_embeds": empty.prompt_embeds[0].cpu().contiguous()}
    if empty.pooled is not None:
        tensors["pooled"] = empty.pooled[0].cpu().contiguous()
    save_file(tensors, str(writer.dir / EMPTY_PROMPT_FILE))
    try:
        return writer.close()
    except ValueError as err:
        raise TrainingError(f"{err}; {dataset.stats.skipped} samples could not be read or decoded "
                            f"({dict(dataset.stats.reasons)}): fix or remove them (mmalign shards validate) "
                            "so every sample has a cache entry") from None
