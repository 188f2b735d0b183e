"""Collators: samples of one reader -> one batch. Pass them as `collate_fn` to a DataLoader.

The pair convention shared by every loss: a pair batch is `[winners; losers]` along dim 0, so rows 0..B-1 are
the preferred items and rows B..2B-1 their rejected partners (row i and row B+i are one pair, with one transform).

Every batch also carries:
- `keys`, `shards`: where each sample came from;
- `skipped` (int), `skip_reasons` ({stage: count}): bad samples the worker skipped just before this batch's
  samples, for per-step logs (skips after a worker's last sample show only in the dataset's `stats`;
  `mmalign.train.data.endless_batches` adds them to the pass's last batch);
- `cursor`: the read position for `DataCursor` (exact resume).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import torch

VIDEO_LABEL_VALUES = {"A": 1.0, "B": 0.0, "same": 0.5}


def _common(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    reasons: Counter = Counter()
    for s in samples:
        reasons.update(s.get("__skip_reasons__") or {})
    first = samples[0]
    workers = {str(s["__worker__"]): [s["__pos__"], s["__yielded__"]] for s in samples}
    cursor = {"epoch": first["__epoch__"], "seed": first["__seed__"], "rank": first["__rank__"],
              "world_size": first["__world_size__"], "num_workers": first["__num_workers__"], "workers": workers,
              "last_worker": samples[-1]["__worker__"]}
    return {"keys": [s["__key__"] for s in samples], "shards": [s["__shard__"] for s in samples],
            "skipped": sum(s.get("__skipped__", 0) for s in samples), "skip_reasons": dict(reasons),
            "cursor": cursor}


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor for a batch; inside a DataLoader worker it is allocated in shared memory, so the
    batch reaches the main process without another copy (what torch's default_collate does)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for d in shape:
        numel *= d
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(numel, device=proto.device)).resize_(shape)


PixelFormat = Literal["float", "uint8"]


def _pixel_batch(rows: list[torch.Tensor], pixels: PixelFormat) -> tuple[str, torch.Tensor]:
    """uint8 (H,W,3) images -> `("pixel_values", float (N,3,H,W) in [-1, 1])`, converted once, straight into the
    batch buffer; or with `pixels="uint8"` -> `("pixels", uint8 (N,H,W,3))`, only stacked."""
    from mmalign.data.transforms import to_pixel_values

    if pixels not in ("float", "uint8"):
        raise ValueError(f"pixels must be 'float' or 'uint8', got {pixels!r}")
    sizes = {tuple(r.shape) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"images of one batch must share a size (one ImageTransforms.resolution), got "
                         f"{sorted(sizes)}")
    h, w, c = rows[0].shape
    if pixels == "uint8":
        return "pixels", torch.stack(rows, out=batch_buffer((len(rows), h, w, c), torch.uint8))
    return "pixel_values", to_pixel_values(torch.stack(rows), out=batch_buffer((len(rows), c, h, w)))


def _stack(values: list[Any]):
    """Stack arrays / tensors (or dicts of them) along a new batch dim; a list when shapes differ."""
    if isinstance(values[0], dict):
        return {k: _stack([v[k] for v in values]) for k in values[0]}
    tensors = [torch.as_tensor(v) for v in values]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    return tensors


def _cache(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if "cache" not in samples[0]:
        return {}
    return {"cache": {name: _stack([s["cache"][name] for s in samples]) for name in samples[0]["cache"]}}


def collate_pairs(samples: list[dict[str, Any]], pixels: PixelFormat = "float") -> dict[str, Any]:
    """`PairDataset` samples -> a pair batch.

    Returns `{"pixel_values": (2B,3,H,W) float in [-1, 1] as [winners; losers], "captions": list[str] (B),
    "original_sizes": (B,2) long (h, w) of the winner, "crop_top_lefts": (B,2) long (top, left),
    "label": (B,) float (1.0 = row i preferred to row B+i; 0.5 = a tie, only with PairDataset(ties="keep"),
    where rows keep the stored order),
    "winner_index": (B,) long (which stored image is in the winner row: reorder per-image caches with
    `winners_losers`), "provenance", "keys", "shards", "skipped", "skip_reasons", "cursor"}`, and "extra" (B dicts)
    when the dataset copies `extra_fields`.
    Without transforms, `"images"` (stored order, PIL) replaces the pixel entries.

    `pixels="uint8"` (`functools.partial(collate_pairs, pixels="uint8")`) gives `"pixels"`: (2B,H,W,3) uint8 in
    the same order instead of `"pixel_values"`; convert where the batch is used, on its device, with
    `to_pixel_values(batch["pixels"].to(device))`. A float batch is 4x the bytes: in a DataLoader worker, filling
    its fresh shared-memory buffer costs about as much CPU as decoding the JPEGs (see docs/data.md, Performance).
    """
    batch = _common(samples)
    batch["captions"] = [s["caption"] for s in samples]
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.float32)
    batch["winner_index"] = torch.tensor([s["winner_index"] for s in samples], dtype=torch.long)
    batch["provenance"] = [s["provenance"] for s in samples]
    if "extra" in samples[0]:
        batch["extra"] = [s["extra"] for s in samples]
    if "pixels" in samples[0]:
        name, value = _pixel_batch([s["pixels"][0] for s in samples] + [s["pixels"][1] for s in samples], pixels)
        batch[name] = value
        batch["original_sizes"] = torch.tensor([s["original_size"] for s in samples], dtype=torch.long)
        batch["crop_top_lefts"] = torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long)
    elif "images" in samples[0]:
        batch["images"] = [s["images"] for s in samples]
        batch["label_0"] = torch.tensor([s["label_0"] for s in samples], dtype=torch.float32)
    batch.update(_cache(samples))
    return batch


def winners_losers(per_image: torch.Tensor, winner_index: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) values in stored image order (e.g. cached latents) -> (2B, ...) as [winners; losers]."""
    rows = torch.arange(per_image.shape[0])
    return torch.cat([per_image[rows, winner_index], per_image[rows, 1 - winner_index]], dim=0)


def collate_ranked(samples: list[dict[str, Any]], pixels: PixelFormat = "float") -> dict[str, Any]:
    """`RankedDataset` samples -> `{"pixel_values": (B,K,3,H,W), "scores": (B,K) (higher is better),
    "captions", "scorers", "original_sizes": (B,2), "crop_top_lefts": (B,2), ...}`. All samples need the same K.
    `pixels="uint8"`: `"pixels"` (B,K,H,W,3) uint8 instead of `"pixel_values"` (see `collate_pairs`)."""
    batch = _common(samples)
    ks = {len(s["scores"]) for s in samples}
    if len(ks) != 1:
        raise ValueError(f"ranked samples in one batch must have the same number of images K, got {sorted(ks)} "
                         f"(keys {batch['keys']}); write one shard set per K or batch by K")
    batch["captions"] = [s["caption"] for s in samples]
    batch["scores"] = torch.stack([s["scores"] for s in samples])
    batch["scorers"] = [s["scorers"] for s in samples]
    batch["provenance"] = [s["provenance"] for s in samples]
    if "pixels" in samples[0]:
        k = len(samples[0]["pixels"])
        name, value = _pixel_batch([im for s in samples for im in s["pixels"]], pixels)
        batch[name] = value.unflatten(0, (-1, k))
        batch["original_sizes"] = torch.tensor([s["original_size"] for s in samples], dtype=torch.long)
        batch["crop_top_lefts"] = torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long)
    elif "images" in samples[0]:
        batch["images"] = [s["images"] for s in samples]
    batch.update(_cache(samples))
    return batch


def collate_video_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`VideoPairDataset` samples -> `{"prompts", "labels": {dim: (B,) float P(A preferred): A=1, B=0, same=0.5},
    "fps": (B,2) float (a, b), "num_frames": (B,2) long, "videos_a"/"videos_b" (mp4 bytes) or
    "frames_a"/"frames_b" (lists of (T,H,W,3) uint8: T may differ), ...}`."""
    batch = _common(samples)
    batch["prompts"] = [s["prompt"] for s in samples]
    dims = list(samples[0]["labels"])
    batch["labels"] = {d: torch.tensor([VIDEO_LABEL_VALUES[s["labels"][d]] for s in samples]) for d in dims}
    batch["fps"] = torch.tensor([s["fps"] for s in samples], dtype=torch.float32)
    batch["num_frames"] = torch.tensor([s["num_frames"] for s in samples], dtype=torch.long)
    batch["provenance"] = [s["provenance"] for s in samples]
    if "extra" in samples[0]:
        batch["extra"] = [s["extra"] for s in samples]
    for side in ("a", "b"):
        if f"frames_{side}" in samples[0]:
            batch[f"frames_{side}"] = [s[f"frames_{side}"] for s in samples]
        elif f"video_{side}" in samples[0]:  # absent with VideoPairDataset(decode_videos=False)
            batch[f"videos_{side}"] = [s[f"video_{side}"] for s in samples]
    batch.update(_cache(samples))
    return batch


def collate_vlm_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`VLMPairDataset` samples -> lists: `{"images", "rejected_images", "prompts" (chat turns), "chosen",
    "rejected", "provenance", ...}`. Tokenisation and image processing belong to the model's processor."""
    batch = _common(samples)
    for name, field in (("prompts", "prompt"), ("chosen", "chosen"), ("rejected", "rejected"),
                        ("provenance", "provenance")):
        batch[name] = [s[field] for s in samples]
    if "images" in samples[0]:
        batch["images"] = [s["images"] for s in samples]
        batch["rejected_images"] = [s["rejected_images"] for s in samples]
    batch.update(_cache(samples))
    return batch


def _pad_codes(codes: list[torch.Tensor], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code arrays (K, T_i) of one K -> (N, K, T_max) long right-padded with `pad_value`, and (N, T_max) bool real
    frames."""
    ks = {c.shape[0] for c in codes}
    if len(ks) != 1:
        raise ValueError(f"music samples in one batch must share the codebook count K, got {sorted(ks)}")
    t_max = max(c.shape[1] for c in codes)
    out = torch.full((len(codes), ks.pop(), t_max), pad_value, dtype=torch.long)
    mask = torch.zeros((len(codes), t_max), dtype=torch.bool)
    for i, c in enumerate(codes):
        out[i, :, : c.shape[1]] = c
        mask[i, : c.shape[1]] = True
    return out, mask


def collate_music_pairs(samples: list[dict[str, Any]], pad_value: int = 0) -> dict[str, Any]:
    """`MusicPairDataset` samples -> `{"codes": (2B,K,T) long as [chosen; rejected], right-padded with
    `pad_value`, "codes_mask": (2B,T) bool (True = real frame), "lengths": (2B,), "prompts", "chosen_audio",
    "rejected_audio", ...}`. Use functools.partial to set pad_value (e.g. the model's pad token id)."""
    batch = _common(samples)
    out, mask = _pad_codes([s["chosen_codes"] for s in samples] + [s["rejected_codes"] for s in samples], pad_value)
    batch.update(codes=out, codes_mask=mask, lengths=mask.sum(1), prompts=[s["prompt"] for s in samples],
                 chosen_audio=[s["chosen_audio"] for s in samples],
                 rejected_audio=[s["rejected_audio"] for s in samples],
                 provenance=[s["provenance"] for s in samples])
    batch.update(_cache(samples))
    return batch


def collate_music_ranked(samples: list[dict[str, Any]], pad_value: int = 0) -> dict[str, Any]:
    """`MusicRankedDataset` samples (B lists of N code arrays each) -> `{"codes": (N·B, K, T) long, item-major (row
    j·B + b is item j of list b, as `collate_music_pairs` puts [chosen; rejected]), right-padded with `pad_value`,
    "codes_mask": (N·B, T) bool, "lengths", "items": N, "scores": (B, N) float32, "prompts" (B), ...}`. Every list
    of a batch needs the same N and K."""
    batch = _common(samples)
    ns = {len(s["codes"]) for s in samples}
    if len(ns) != 1:
        raise ValueError(f"music_ranked lists in one batch must have the same number of items N, got {sorted(ns)} "
                         f"(keys {batch['keys']}); write lists of one length")
    n = ns.pop()
    out, mask = _pad_codes([s["codes"][j] for j in range(n) for s in samples], pad_value)
    batch.update(codes=out, codes_mask=mask, lengths=mask.sum(1), items=n,
                 scores=torch.stack([s["scores"] for s in samples]), prompts=[s["prompt"] for s in samples],
                 provenance=[s["provenance"] for s in samples])
    batch.update(_cache(samples))
    return batch


def collate_step_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`StepPairDataset` samples -> one batch of transitions (row i of every entry is one transition):

    `{"x_t", "x_w", "x_l": (B, ...) float32, "timesteps": (B,) long (of x_t), "prev_timesteps": (B,) long (of
    x_w / x_l; -1 after the final step), "step_indices": (B,) long, "num_inference_steps": (B,) long,
    "guidance_scale": (B,) float32, "eta": (B,) float32, "scores_w", "scores_l": (B,) float32, "captions" (B str),
    "seeds" (B, int or None), "schedulers" (B str), "provenance", "keys", "shards", "skipped", "skip_reasons",
    "cursor"}`. All samples need one latent shape."""
    batch = _common(samples)
    shapes = {tuple(s["x_t"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"step_pair samples in one batch must share one latent shape, got {sorted(shapes)} "
                         f"(keys {batch['keys']}); write one shard set per resolution or batch by shape")
    shape = (len(samples), *shapes.pop())
    for name in ("x_t", "x_w", "x_l"):
        batch[name] = torch.stack([s[name] for s in samples], out=batch_buffer(shape))
    for name, field, dtype in (("timesteps", "timestep", torch.long), ("prev_timesteps", "prev_timestep", torch.long),
                               ("step_indices", "step_index", torch.long),
                               ("num_inference_steps", "num_inference_steps", torch.long),
                               ("guidance_scale", "guidance_scale", torch.float32), ("eta", "eta", torch.float32),
                               ("scores_w", "scores_w", torch.float32), ("scores_l", "scores_l", torch.float32)):
        batch[name] = torch.tensor([s[field] for s in samples], dtype=dtype)
    for name, field in (("captions", "prompt"), ("seeds", "seed"), ("schedulers", "scheduler"),
                        ("provenance", "provenance")):
        batch[name] = [s[field] for s in samples]
    batch.update(_cache(samples))
    return batch


COLLATORS = {"pair": collate_pairs, "ranked": collate_ranked, "video_pair": collate_video_pairs,
             "vlm_pair": collate_vlm_pairs, "music_pair": collate_music_pairs, "step_pair": collate_step_pairs,
             "music_ranked": collate_music_ranked}
