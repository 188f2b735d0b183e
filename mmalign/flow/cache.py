"""The flow task's latent + text-embedding cache (`mmalign train CONFIG --cache-only`, then `data.cache: true`).

For every sample of `data.shards` (ties and short clips too, so the cache matches the manifest) it stores what
`FlowAdapter.inputs` would compute: the VAE latents of both items in stored order (video pairs: clip A and clip B,
decoded with `read_frames` at `data.fps` and cut to `data.num_frames` x `data.resolution` as training does; image
pairs: image 0 and image 1), the caption's conditioning (`FlowConditioning`: prompt_embeds, and pooled for SD3), and
for video the number of frames each clip decoded to. The latents are `FlowAdapter.encode`'s, the posterior MEAN
(normalised as the pipeline does), which draws nothing from the step's generator: a cached run sees the same
latents and the same random stream as an uncached one with the same seed. Winners are decided when a batch is read
(`video_pair_batch`'s vote over `data.dims`, or the pair's label), so one cache serves every `data.dims` and method.

Written with `mmalign.data.cache` next to the shards (or in the folder `data.cache` names) and keyed by the producer:
the model id, revision and variant, a sha256 of the local VAE / text encoder / tokenizer files, the encoders'
dtypes, the resolution, and for video the frame count and fps. Building it never loads the transformer; training
from it never runs the VAE or the text encoders and keeps them off the accelerator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmalign.flow.adapter import VIDEO_FAMILIES, FlowAdapter, check_flow_model, load_flow_components
from mmalign.train.trainer import TrainingError

if TYPE_CHECKING:
    from mmalign.flow.task import FlowTrainConfig

CACHE_NAME = "flow"  # the cache's name in `mmalign.data.cache`: `<shards>/cache/flow-<key>/`
CACHE_FORMAT_VERSION = 1
COND_FIELDS = ("prompt_embeds", "pooled", "attention_mask")  # FlowConditioning's tensors, stored where not None
ENCODER_FOLDERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                   "tokenizer_3")


def cache_producer(cfg: FlowTrainConfig) -> dict:
    """What makes a flow cache entry: the cache key is a hash of this (see `mmalign.data.cache.cache_key`)."""
    from mmalign.data.cache import files_fingerprint

    m, d = cfg.model, cfg.data
    family, _ = check_flow_model(m.pretrained, m.revision)
    video = family in VIDEO_FAMILIES
    return {"kind": "flow_latents_text", "version": CACHE_FORMAT_VERSION, "family": family, "model": m.pretrained,
            "revision": m.revision, "variant": m.variant,
            "encoders_sha256": files_fingerprint(m.pretrained, ENCODER_FOLDERS),
            "vae_dtype": "float32", "encoder_dtype": "bfloat16" if cfg.train.mixed_precision == "bf16" else "float32",
            "latents": "mean", "resolution": d.resolution, "crop": "center",
            "num_frames": d.num_frames if video else None, "fps": d.fps if video else None}


def read_cached_pairs(batch: dict) -> dict:
    """An image pair batch read with the cache (`collate_pairs`, `batch["cache"]["flow"]` in stored image order) ->
    `{"latents": (2B, C, h, w) [winners; losers], "prompt_embeds": (B, L, D), "pooled": (B, D2)}`, the keys
    `FlowAdapter.inputs` takes instead of pixels."""
    from mmalign.data.collate import winners_losers

    entry = batch["cache"][CACHE_NAME]
    out = {"latents": winners_losers(torch.as_tensor(entry["latents"]), batch["winner_index"])}
    out.update({f: torch.as_tensor(entry[f]) for f in COND_FIELDS if f in entry})
    return out


def _video_latents(adapter: FlowAdapter, batch: dict, num_frames: int, resolution: int, device) -> list[Tensor]:
    """Per pair (B): latents (2, ...) of clips A and B; (2, 0) when a clip has fewer than `num_frames` frames (the
    pair is skipped when read, as without the cache)."""
    from mmalign.data.transforms import video_to_tensor

    pairs = list(zip(batch["frames_a"], batch["frames_b"]))
    usable = [i for i, (a, b) in enumerate(pairs) if min(len(a), len(b)) >= num_frames]
    out = [torch.zeros(2, 0) for _ in pairs]
    if usable:
        clips = torch.stack([video_to_tensor(clip, num_frames, resolution) for i in usable for clip in pairs[i]])
        latents = adapter.encode(clips.to(device)).cpu()
        for j, i in enumerate(usable):
            out[i] = latents[2 * j:2 * j + 2]
    return out


def build_cache(cfg: FlowTrainConfig, device: torch.device | str | None = None, progress: bool = True) -> Path:
    """Encode every sample of `data.shards` once and write the cache for `cfg`; returns its folder. One process; on
    the accelerator when there is one. The VAE and text encoders run in the dtypes training would run them in."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from mmalign.data.cache import CacheWriter
    from mmalign.data.collate import collate_pairs, collate_video_pairs
    from mmalign.data.dataset import PairDataset, VideoPairDataset
    from mmalign.data.video import FrameSampling

    d, m = cfg.data, cfg.model
    if d.shards is None:
        raise TrainingError("--cache-only encodes data.shards; this config has none (online training)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    producer = cache_producer(cfg)
    video = producer["family"] in VIDEO_FAMILIES
    common = dict(shuffle=False, rank=0, world_size=1, strict=d.strict)
    if video:  # the frames training decodes (FlowTask.batches)
        dataset = VideoPairDataset(d.shards, frames=FrameSampling(fps=d.fps, max_frames=None), **common)
        collate = collate_video_pairs
    else:
        dataset = PairDataset(d.shards, transforms={"resolution": d.resolution, "crop": "center"}, ties="keep",
                              **common)
        collate = collate_pairs
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=collate, num_workers=d.num_workers)
    comps = load_flow_components(m.pretrained, revision=m.revision, variant=m.variant, load_transformer=False)
    comps.move_encoders(device, cfg.train.mixed_precision)
    adapter = FlowAdapter(comps, reference="none")
    writer = CacheWriter(d.shards, CACHE_NAME, producer, overwrite=True, root=d.cache_root)
    bar = tqdm(total=len(dataset), desc="cache", disable=not progress)
    for batch in loader:
        if video:
            latents = _video_latents(adapter, batch, d.num_frames, d.resolution, device)
            captions = batch["prompts"]
        else:  # [winners; losers] -> stored order (B, 2, ...)
            b = len(batch["keys"])
            latents = adapter.encode(batch["pixel_values"].to(device)).cpu().unflatten(0, (2, b)).transpose(0, 1)
            swap = batch["winner_index"].bool()  # stored image 1 won: the winner row holds image 1
            latents[swap] = latents[swap].flip(1)
            captions = batch["captions"]
        cond = adapter.encode_text(list(captions))
        for i, (shard, key) in enumerate(zip(batch["shards"], batch["keys"])):
            entry = {"latents": latents[i].contiguous()}
            entry.update({f: getattr(cond, f)[i].cpu() for f in COND_FIELDS if getattr(cond, f, None) is not None})
            if video:
                entry["frames"] = torch.tensor([len(batch["frames_a"][i]), len(batch["frames_b"][i])])
            writer.add(shard, key, entry)
        bar.update(len(batch["keys"]))
    bar.close()
    try:
        return writer.close()
    except ValueError as err:
        raise TrainingError(f"{err}; {dataset.stats.skipped} samples could not be read or decoded "
                            f"({dict(dataset.stats.reasons)}): fix or remove them (mmalign shards validate) "
                            "so every sample has a cache entry") from None
