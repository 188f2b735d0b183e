"""STIC: self-training on image comprehension (Deng et al. 2024), preference pairs from unlabeled images.

Stage 1 (`stic_pairs`), per image (all draws from `SeedSequence([seed, index])`):

- chosen: the model's answer to a step-by-step description prompt on the clean image;
- rejected: with probability `hallucination_prob` (default 1/2) the answer to a hallucination-inducing prompt on
  the clean image, otherwise the answer to a plain prompt on a corrupted image (one of `corruptions`, uniformly:
  resize to a 20 px shorter side, or colour jitter brightness 0.5 / hue 0.3). Corruptions are applied for real and
  recorded (`provenance.corruption_params`); one that leaves the pixels unchanged is redrawn, else the image is
  skipped and counted;
- the pair is stored under a short plain prompt drawn from `pair_prompts`, with the clean image, as `vlm_pair`.

A pair whose answers are empty or identical is skipped and counted. Generation is batched (left padding, KV cache).

Stage 2 (`stic_stage2`): description-infused SFT rows: for each instruction row (LLaVA conversation JSONL), the
model describes the row's image and "Image description: ..." is prepended to the first user turn.

Prompt lists are plain text files, one prompt per line (`--describe-prompts FILE`, ...).

    mmalign selfgen stic --model llava-hf/llava-v1.6-mistral-7b-hf --images unlabeled/ --out data/stic
    mmalign selfgen stic --stage 2 --model ... --instructions llava_instruct.jsonl --image-root coco/ --out sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mmalign.data.prompts import read_prompts
from mmalign.selfgen.common import chunked
from mmalign.selfgen.corrupt import (
    DEFAULT_CORRUPTIONS,
    Corruption,
    CorruptionNoOpError,
    corrupt_image,
)

logger = logging.getLogger("mmalign.selfgen")

# The prompt families of the STIC paper (step-by-step description, hallucination-inducing, plain).
DESCRIBE_PROMPTS = (
    "Illustrate the details of the picture, summarizing the main components step by step.",
    "Describe the image step by step: first the main objects, then their attributes, then how they are arranged.",
)
HALLUCINATION_PROMPTS = (
    "Describe the image with imaginative objects that may exist in the scene.",
    "Enrich the description by adding hypothetical objects or characters that could be part of the scene.",
    "Describe the scene, adding details that are plausible but not visible in the image.",
)
PLAIN_PROMPTS = (
    "Describe the image.",
    "What is in the image?",
    "Give a description of the image.",
    "Provide a brief description of the picture.",
)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class STICConfig:
    """STIC stage-1 settings; defaults follow the paper."""

    describe_prompts: Sequence[str] = DESCRIBE_PROMPTS
    hallucination_prompts: Sequence[str] = HALLUCINATION_PROMPTS
    corrupted_prompts: Sequence[str] = PLAIN_PROMPTS  # asked about the corrupted image
    pair_prompts: Sequence[str] = PLAIN_PROMPTS  # stored with the pair
    hallucination_prob: float = 0.5
    corruptions: Sequence[Corruption] = DEFAULT_CORRUPTIONS
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    strict: bool = False
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not 0.0 <= self.hallucination_prob <= 1.0:
            raise ValueError(f"hallucination_prob must be in [0, 1], got {self.hallucination_prob}")
        if self.hallucination_prob < 1.0 and not self.corruptions:
            raise ValueError("corruptions is empty but hallucination_prob < 1 asks for corrupted images")
        for name in ("describe_prompts", "hallucination_prompts", "corrupted_prompts", "pair_prompts"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give at least one prompt")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class _Plan:
    key: str
    image: Any
    describe: str
    pair_prompt: str
    rejected_prompt: str
    rejected_image: Any
    corruption: str
    params: dict


def _plan(index: int, key: str, image, cfg: STICConfig) -> _Plan:
    rng = np.random.default_rng([cfg.seed, index])
    image = image.convert("RGB")
    describe = cfg.describe_prompts[rng.integers(len(cfg.describe_prompts))]
    pair_prompt = cfg.pair_prompts[rng.integers(len(cfg.pair_prompts))]
    if rng.random() < cfg.hallucination_prob:
        prompt = cfg.hallucination_prompts[rng.integers(len(cfg.hallucination_prompts))]
        return _Plan(key, image, describe, pair_prompt, prompt, image, "hallucination_prompt", {})
    corruption = cfg.corruptions[rng.integers(len(cfg.corruptions))]
    prompt = cfg.corrupted_prompts[rng.integers(len(cfg.corrupted_prompts))]
    corrupted, record = corrupt_image(image, corruption, rng)
    return _Plan(key, image, describe, pair_prompt, prompt, corrupted, "image_corruption", record)


def stic_pairs(adapter, images: Iterable[tuple[str, Any]], cfg: STICConfig) -> Iterator[dict[str, bytes]]:
    """`vlm_pair` samples (sorted as `images`) from `(key, PIL image)` items; skips are counted in `cfg.counts`
    (`strict` raises instead)."""
    from mmalign.data.schemas import vlm_pair_sample

    gen = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
               top_p=cfg.top_p)
    for b, batch in enumerate(chunked(enumerate(images), cfg.batch_size)):
        plans = []
        for index, (key, image) in batch:
            try:
                plans.append(_plan(index, key, image, cfg))
            except CorruptionNoOpError as err:
                if cfg.strict:
                    raise ValueError(f"image {key}: {err}") from err
                logger.warning("skipping image %s: %s", key, err)
                cfg.counts["skipped_corruption_noop"] += 1
        if not plans:
            continue
        n = len(plans)
        # Chosen and rejected answers of the whole batch in one generate call.
        answers = adapter.generate([p.describe for p in plans] + [p.rejected_prompt for p in plans],
                                   [[p.image] for p in plans] + [[p.rejected_image] for p in plans],
                                   seed=cfg.seed * 1_000_003 + b, **gen)
        for p, chosen, rejected in zip(plans, answers[:n], answers[n:]):
            chosen, rejected = chosen.strip(), rejected.strip()
            reason = "skipped_empty_answer" if not chosen or not rejected else (
                "skipped_identical_answers" if chosen == rejected else None)
            if reason:
                if cfg.strict:
                    raise ValueError(f"image {p.key}: {reason.removeprefix('skipped_').replace('_', ' ')}")
                cfg.counts[reason] += 1
                continue
            cfg.counts[p.corruption] += 1
            provenance = {"origin": "self", "generator": adapter.pretrained, "corruption": p.corruption,
                          "corruption_params": p.params, "method": "stic",
                          "prompts": {"chosen": p.describe, "rejected": p.rejected_prompt}}
            yield vlm_pair_sample(p.key, [p.image], prompt=p.pair_prompt, chosen=chosen, rejected=rejected,
                                  provenance=provenance)


def image_items(folder: str | None = None, image_list: str | None = None, limit: int | None = None
                ) -> list[tuple[str, Path]]:
    """(key, path) of the images of a folder (sorted by relative path) or of a list file (one path per line,
    relative to the list's folder). Keys `000000042-<stem>` sort like the files."""
    from mmalign.data.schemas import sanitize_key

    if (folder is None) == (image_list is None):
        raise ValueError("give exactly one of --images FOLDER or --image-list FILE")
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"--images {folder}: not a folder")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not paths:
            raise ValueError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTS)})")
    else:
        lst = Path(image_list)
        lines = [line.strip() for line in lst.read_text().splitlines() if line.strip()]
        paths = [(lst.parent / line) for line in lines]
    paths = paths[:limit] if limit is not None else paths
    return [(f"{i:09d}-{sanitize_key(p.stem, 60)}", p) for i, p in enumerate(paths)]


def _load_images(items: list[tuple[str, Path]], counts: Counter, strict: bool) -> Iterator[tuple[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    for key, path in items:
        try:
            with Image.open(path) as im:
                yield key, im.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            if strict:
                raise ValueError(f"{path}: not a readable image: {err}") from err
            logger.warning("skipping unreadable image %s: %s", path, err)
            counts["skipped_unreadable_image"] += 1


def toy_image_items(n: int, seed: int) -> list[tuple[str, Any]]:
    """`n` toy scenes as (key, PIL image): the toy world's unlabeled images."""
    from mmalign.toy.scenes import sample_scenes
    from mmalign.vlm.toy import scene_images

    return [(f"{i:09d}-toy", im) for i, im in enumerate(scene_images(sample_scenes(n, seed)))]


def write_pairs(out: str, samples: Iterable[dict[str, bytes]], conversion: dict, overwrite: bool = False,
                max_count: int = 1000):
    from mmalign.data.writer import ShardSetWriter

    with ShardSetWriter(out, "vlm_pair", max_count=max_count, overwrite=overwrite) as writer:
        for s in samples:
            writer.write(s)
        writer.set_conversion(conversion)
    return writer


# -- stage 2 ---------------------------------------------------------------------------------------------------
def _first_turns(row: dict, where: str) -> tuple[int, str]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict) or "value" not in conv[0]:
        raise ValueError(f"{where}: expected LLaVA-format 'conversations' [{{'from': 'human', 'value': ...}}, ...]")
    return 0, conv[0]["value"]


def infuse_description(value: str, description: str) -> str:
    """Prepend "Image description: ..." to a user turn, after a leading image placeholder if there is one."""
    head = ""
    for tag in ("<image>\n", "<image>"):
        if value.startswith(tag):
            head, value = tag, value[len(tag):]
            break
    return f"{head}Image description: {description.strip()}\n{value}"


def stic_stage2(adapter, instructions: str, image_root: str, out: str, cfg: STICConfig,
                progress: bool = True) -> Counter:
    """Description-infused SFT rows (JSONL, written atomically) from LLaVA-format instruction rows."""
    from PIL import Image
    from tqdm.auto import tqdm

    from mmalign.config import atomic_write_text

    rows = []
    with open(instructions, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{instructions}:{n}: not valid JSON: {err}") from None
    counts: Counter = Counter()
    out_lines = []
    root = Path(image_root).resolve()
    for batch in tqdm(list(chunked(rows, cfg.batch_size)), desc="STIC stage 2", disable=not progress):
        todo = []
        for n, row in batch:
            where = f"{instructions}:{n}"
            try:
                _first_turns(row, where)
                path = (root / str(row["image"])).resolve()
                if root not in path.parents:
                    raise ValueError(f"{where}: image path {row['image']!r} leaves --image-root {root}")
                with Image.open(path) as im:
                    todo.append((row, im.convert("RGB")))
            except (KeyError, OSError, ValueError) as err:
                if cfg.strict:
                    raise ValueError(f"{where}: {err}") from err
                logger.warning("skipping %s: %s", where, err)
                counts["skipped"] += 1
        if not todo:
            continue
        prompts = [cfg.describe_prompts[0]] * len(todo)
        descriptions = adapter.generate(prompts, [[im] for _, im in todo], max_new_tokens=cfg.max_new_tokens)
        for (row, _), desc in zip(todo, descriptions):
            new = json.loads(json.dumps(row))
            new["conversations"][0]["value"] = infuse_description(new["conversations"][0]["value"], desc)
            new["image_description"] = desc.strip()
            out_lines.append(json.dumps(new, ensure_ascii=False))
            counts["written"] += 1
    atomic_write_text(out, "\n".join(out_lines) + ("\n" if out_lines else ""))
    return counts


# -- command line ----------------------------------------------------------------------------------------------
def add_common_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VLM folder or hub id (LLaVA-style or Qwen2-VL-style)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete shard set in --out")


def load_adapter(args: argparse.Namespace):
    import torch

    from mmalign.vlm.adapter import load_vlm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_vlm(args.model, revision=args.revision, dtype=args.dtype, device=device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_model_arguments(parser)
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1,
                        help="1 = preference pairs (vlm_pair shards); 2 = description-infused SFT rows (JSONL)")
    src = parser.add_argument_group("images (stage 1: one of)")
    src.add_argument("--images", help="folder of unlabeled images (searched recursively)")
    src.add_argument("--image-list", help="text file, one image path per line")
    src.add_argument("--toy-scenes", type=int, help="use N toy-world scenes (seed --toy-seed) as the images")
    src.add_argument("--toy-seed", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--out", required=True, help="stage 1: shard folder; stage 2: output JSONL file")
    parser.add_argument("--describe-prompts", help="file: step-by-step description prompts (chosen)")
    parser.add_argument("--hallucination-prompts", help="file: hallucination-inducing prompts (rejected)")
    parser.add_argument("--corrupted-prompts", help="file: plain prompts asked about a corrupted image")
    parser.add_argument("--pair-prompts", help="file: short plain prompts stored with the pair")
    parser.add_argument("--hallucination-prob", type=float, default=0.5,
                        help="probability the rejected answer comes from a hallucination prompt (else a corrupted "
                             "image)")
    parser.add_argument("--corruption", action="append", default=None, metavar="SPEC",
                        help="corruption spec, repeatable (default: resize:shorter_side=20 and "
                             "jitter:brightness=0.5,hue=0.3, each equally likely)")
    parser.add_argument("--instructions", help="stage 2: LLaVA-format instruction JSONL")
    parser.add_argument("--image-root", default=".", help="stage 2: folder the instruction rows' images are under")


def config_from_args(args: argparse.Namespace) -> STICConfig:
    kw: dict[str, Any] = {}
    for name in ("describe_prompts", "hallucination_prompts", "corrupted_prompts", "pair_prompts"):
        if getattr(args, name):
            kw[name] = read_prompts(getattr(args, name))
    if args.corruption:
        kw["corruptions"] = tuple(Corruption.parse(s) for s in args.corruption)
    return STICConfig(hallucination_prob=args.hallucination_prob, max_new_tokens=args.max_new_tokens,
                      do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                      batch_size=args.batch_size, seed=args.seed, strict=args.strict, **kw)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmalign selfgen stic: {err}", file=sys.stderr)
        return 2
    if args.stage == 2:
        if not args.instructions:
            print("mmalign selfgen stic --stage 2 needs --instructions FILE.jsonl", file=sys.stderr)
            return 2
        counts = stic_stage2(load_adapter(args), args.instructions, args.image_root, args.out, cfg)
        print(f"wrote {counts['written']} rows to {args.out}; skipped {counts['skipped']}")
        return 0
    try:
        if args.toy_scenes is not None:
            items = toy_image_items(args.toy_scenes, args.toy_seed)[: args.limit]
            images: Iterable = items
        else:
            paths = image_items(args.images, args.image_list, args.limit)
            items = paths
            images = _load_images(paths, cfg.counts, cfg.strict)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmalign selfgen stic: {err}", file=sys.stderr)
        return 2
    adapter = load_adapter(args)
    bar = tqdm(images, total=len(items), desc="STIC pairs")
    conversion = {"from": "selfgen stic", "model": args.model, "options": {
        "hallucination_prob": cfg.hallucination_prob, "corruptions": [c.describe() for c in cfg.corruptions],
        "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample}, "counts": cfg.counts}
    write_pairs(args.out, stic_pairs(adapter, bar, cfg), conversion, overwrite=args.overwrite)
    print(f"wrote {args.out}: {dict(cfg.counts)}")
    return 0
