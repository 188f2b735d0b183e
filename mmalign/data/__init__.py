"""Preference data as webdataset shards: schemas, writers, readers, collators, converters, validation, caches.

    from mmalign.data import PairDataset, ImageTransforms, collate_pairs, DataCursor
    ds = PairDataset("shards/", transforms=ImageTransforms(resolution=512, crop="random", random_flip=True),
                     shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=4, collate_fn=collate_pairs)

Names are imported lazily (importing `mmalign.data` does not import torch); see docs/data.md.
"""

from __future__ import annotations

from mmalign._lazy import lazy_exports

_EXPORTS = {
    # readers
    "ShardDataset": "dataset", "PairDataset": "dataset", "RankedDataset": "dataset", "VideoPairDataset": "dataset",
    "VLMPairDataset": "dataset", "MusicPairDataset": "dataset", "StepPairDataset": "dataset", "READERS": "dataset",
    "MusicRankedDataset": "dataset",
    "DataCursor": "dataset", "SkipCounter": "dataset", "CorruptSampleError": "dataset",
    # collators
    "collate_pairs": "collate", "collate_ranked": "collate", "collate_video_pairs": "collate",
    "collate_vlm_pairs": "collate", "collate_music_pairs": "collate", "collate_music_ranked": "collate",
    "collate_step_pairs": "collate",
    "winners_losers": "collate",
    "COLLATORS": "collate",
    # transforms and video
    "ImageTransforms": "transforms", "transform_images": "transforms", "to_pixel_values": "transforms",
    "read_frames": "video",
    "video_info": "video", "FrameSampling": "video",
    # schemas and writing
    "SCHEMA_VERSIONS": "schemas", "SampleError": "schemas", "pair_sample": "schemas", "ranked_sample": "schemas",
    "video_pair_sample": "schemas", "vlm_pair_sample": "schemas", "music_pair_sample": "schemas",
    "music_ranked_sample": "schemas",
    "step_pair_sample": "schemas",
    "sanitize_key": "schemas", "ShardSetWriter": "writer",
    # manifests, safety, caches
    "Manifest": "manifest", "ManifestError": "manifest", "load_manifest": "manifest", "open_source": "manifest",
    "UnsafeSourceError": "safety", "MissingDependencyError": "deps", "cache_key": "cache", "CacheWriter": "cache",
    "open_cache": "cache",
    "list_caches": "cache", "StaleCacheError": "cache",
    # converters and validation
    "ConvertOptions": "convert", "ConversionError": "convert", "convert_pickapic": "convert",
    "convert_hpdv2": "convert", "convert_jsonl": "convert", "convert_videoalign": "convert", "convert_trl": "convert",
    "validate_shards": "validate",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
