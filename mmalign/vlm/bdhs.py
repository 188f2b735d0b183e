"""BDHS: bias-driven hallucination sampling (Amirloo et al. 2024), rejected answers from the model's own prior.

Input: (image, prompt, chosen answer) rows. Per row and attempt (all draws from `SeedSequence([seed, index,
attempt])`):

1. an image-token mask keeps each image token visible to attention with probability `1 - rho` (rho = 0.99 by
   default; rho = 1 hides the image completely); positions are unchanged (`VLMAdapter.generate`);
2. reference-guided completion: the chosen answer is split into sentences; for sentence i a random prefix of its
   words is kept (at least one word is left to generate) and the masked model finishes the sentence, conditioned
   on the ground-truth sentences before it. Sentences are independent given the ground truth, so every sentence of
   every row of a batch is one batched `generate` call. When the answer starts with yes/no, with probability
   `flip_prob` the first sentence's prefix is the opposite word;
3. semantic filter: if the cosine similarity of the rejected and the chosen answers' embeddings is >=
   `similarity_threshold` (0.97), the row is resampled (new mask, new prefixes) up to `max_resamples` (5) times, the
   last time unguided (the masked model answers from scratch). A row still too similar after that keeps its last
   answer and is marked `filter_passed: false`; a rejected answer identical to the chosen one is skipped and
   counted.

Output: `vlm_pair` shards; `provenance` records rho, attempts, guidance, the flip, the similarity and the mask seed.
Online mode (regenerating rejected answers from the current policy during training) uses `bdhs_rejected` from the
VLM training task.

    mmalign selfgen bdhs --model llava-hf/llava-v1.6-mistral-7b-hf --rows sft.jsonl --image-root coco/ --out data/bdhs
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mmalign.selfgen.common import chunked
from mmalign.vlm.stic import add_common_model_arguments, load_adapter, write_pairs

logger = logging.getLogger("mmalign.selfgen")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_POLARITY = {"yes": "no", "no": "yes"}


@dataclass
class BDHSConfig:
    rho: float = 0.99
    similarity_threshold: float = 0.97
    max_resamples: int = 5
    flip_prob: float = 0.5
    max_new_tokens: int = 64  # per sentence (guided) or per answer (unguided: 4x)
    do_sample: bool = False
    temperature: float = 1.0
    batch_size: int = 8
    seed: int = 0
    strict: bool = False
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1] (the share of image tokens hidden), got {self.rho}")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold is a cosine in [-1, 1], got {self.similarity_threshold}")
        if self.max_resamples < 0:
            raise ValueError(f"max_resamples must be >= 0, got {self.max_resamples}")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _first_sentence(text: str) -> str:
    m = re.search(r"[.!?](\s|$)", text)
    return text[: m.start() + 1] if m else text


def _flip(word: str) -> str | None:
    core = word.rstrip(",.!?;:")
    other = _POLARITY.get(core.lower())
    if other is None:
        return None
    other = other.capitalize() if core[:1].isupper() else other
    return other + word[len(core):]


@dataclass
class _Request:
    row: int
    sentence: int
    context: str  # ground truth before this sentence + kept prefix
    prefix: str  # kept prefix of this sentence


def plan_guided(chosen: str, rng: np.random.Generator, flip_prob: float) -> tuple[list[tuple[str, str]], bool]:
    """Per sentence of `chosen`: (context to continue, kept prefix of the sentence); and whether yes/no was
    flipped. The context is the ground-truth sentences before it plus the prefix."""
    sentences = split_sentences(chosen)
    out, flipped = [], False
    for i, sent in enumerate(sentences):
        words = sent.split(" ")
        keep = int(rng.integers(0, len(words)))  # 0..n-1 words kept: at least one is generated
        prefix_words = words[:keep]
        if i == 0 and rng.random() < flip_prob and (flip := _flip(words[0])) is not None:
            prefix_words, flipped = [flip], True
        prefix = " ".join(prefix_words)
        before = " ".join(sentences[:i])
        out.append(((before + " " + prefix).strip() if before else prefix, prefix))
    return out, flipped


def bdhs_rejected(adapter, rows: Sequence[dict], cfg: BDHSConfig, embedder, *, index_offset: int = 0,
                  model=None) -> list[dict]:
    """Rejected answers for `rows` (`{"key", "images", "prompt", "chosen"}`) with their records
    (`rejected`, `similarity`, `attempts`, `guided`, `flipped`, `filter_passed`, `mask_seed`)."""
    keep_prob = 1.0 - cfg.rho
    results: list[dict | None] = [None] * len(rows)
    pending = list(range(len(rows)))
    chosen_emb = embedder([r["chosen"] for r in rows])
    for attempt in range(cfg.max_resamples + 1):
        if not pending:
            break
        guided = attempt < cfg.max_resamples
        seeds, requests, flips = {}, [], {}
        for i in pending:
            rng = np.random.default_rng([cfg.seed, index_offset + i, attempt])
            seeds[i] = int(rng.integers(2**31))
            if guided:
                plan, flips[i] = plan_guided(rows[i]["chosen"], rng, cfg.flip_prob)
                requests += [_Request(i, j, ctx, prefix) for j, (ctx, prefix) in enumerate(plan)]
            else:
                flips[i] = False
                requests.append(_Request(i, 0, "", ""))
        texts = []
        for chunk in chunked(requests, cfg.batch_size):
            texts += adapter.generate([rows[r.row]["prompt"] for r in chunk], [rows[r.row]["images"] for r in chunk],
                                      prefixes=[r.context for r in chunk], image_keep_prob=keep_prob,
                                      mask_seeds=[seeds[r.row] for r in chunk], do_sample=cfg.do_sample,
                                      temperature=cfg.temperature, seed=seeds[chunk[0].row],
                                      max_new_tokens=cfg.max_new_tokens * (1 if guided else 4), model=model)
        parts: dict[int, list[str]] = {i: [] for i in pending}
        for r, text in zip(requests, texts):
            if guided:
                # The generated text continues the context; keep it to the end of this sentence.
                cont = _first_sentence(text)
                joiner = "" if not r.prefix or cont[:1] in ("", " ", ",", ".") else " "
                parts[r.row].append((r.prefix + joiner + cont).strip())
            else:
                parts[r.row].append(text.strip())
        answers = {i: " ".join(p for p in parts[i] if p) for i in pending}
        sims = (embedder([answers[i] for i in pending]) * chosen_emb[pending]).sum(-1).tolist()
        still = []
        for i, sim in zip(pending, sims):
            results[i] = {"rejected": answers[i], "similarity": float(sim), "attempts": attempt + 1,
                          "guided": guided, "flipped": flips[i], "mask_seed": seeds[i],
                          "filter_passed": sim < cfg.similarity_threshold}
            if sim >= cfg.similarity_threshold:
                still.append(i)
        cfg.counts["resampled"] += len(still) if attempt < cfg.max_resamples else 0
        pending = still
    return results  # type: ignore[return-value]


def bdhs_pairs(adapter, rows: Iterable[dict], cfg: BDHSConfig, embedder) -> Iterator[dict[str, bytes]]:
    """`vlm_pair` samples from rows `{"key", "images": [PIL], "prompt", "chosen"}` (in order)."""
    from mmalign.data.schemas import vlm_pair_sample

    offset = 0
    for batch in chunked(rows, cfg.batch_size):
        results = bdhs_rejected(adapter, batch, cfg, embedder, index_offset=offset)
        offset += len(batch)
        for row, res in zip(batch, results):
            rejected = res["rejected"]
            if not rejected or rejected == row["chosen"].strip():
                reason = "skipped_empty_rejected" if not rejected else "skipped_identical_answers"
                if cfg.strict:
                    raise ValueError(f"row {row['key']}: {reason.removeprefix('skipped_').replace('_', ' ')}")
                cfg.counts[reason] += 1
                continue
            cfg.counts["written"] += 1
            cfg.counts["filter_failed"] += 0 if res["filter_passed"] else 1
            cfg.counts["unguided"] += 0 if res["guided"] else 1
            cfg.counts["flipped"] += int(res["flipped"])
            provenance = {"origin": "self", "generator": adapter.pretrained, "corruption": "bdhs",
                          "similarity": res["similarity"], "method": "bdhs",
                          "bdhs": {"rho": cfg.rho, **{k: res[k] for k in ("attempts", "guided", "flipped",
                                                                           "filter_passed", "mask_seed")}}}
            yield vlm_pair_sample(row["key"], row["images"], prompt=row["prompt"], chosen=row["chosen"],
                                  rejected=rejected, provenance=provenance)


# -- inputs ----------------------------------------------------------------------------------------------------
def read_rows(path: str, image_root: str, counts: Counter, strict: bool = False, limit: int | None = None
              ) -> Iterator[dict]:
    """Rows of a JSONL file: `{"image": path, "prompt": str, "chosen": str}` (`answer` is accepted for `chosen`),
    or LLaVA conversations (`{"image", "conversations": [human, gpt, ...]}`: the first exchange is used).
    Image paths are relative to `image_root` and must stay inside it."""
    from PIL import Image

    from mmalign.data.schemas import sanitize_key

    root = Path(image_root).resolve()
    n_rows = 0
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and n_rows >= limit:
                return
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
                if "conversations" in row:
                    conv = row["conversations"]
                    prompt = conv[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
                    chosen = conv[1]["value"]
                else:
                    prompt, chosen = row["prompt"], row.get("chosen", row.get("answer"))
                if not isinstance(chosen, str) or not chosen.strip():
                    raise ValueError("no chosen answer ('chosen', 'answer' or the first gpt turn)")
                image_path = (root / str(row["image"])).resolve()
                if root not in image_path.parents:
                    raise ValueError(f"image path {row['image']!r} leaves --image-root {root}")
                with Image.open(image_path) as im:
                    image = im.convert("RGB")
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, OSError, ValueError) as err:
                if strict:
                    raise ValueError(f"{where}: {err}") from err
                logger.warning("skipping %s: %s", where, err)
                counts["skipped_bad_row"] += 1
                continue
            key = f"{n:09d}-{sanitize_key(str(row.get('id', Path(str(row['image'])).stem)), 60)}"
            n_rows += 1
            yield {"key": key, "images": [image], "prompt": prompt, "chosen": chosen.strip()}


def toy_rows(n: int, seed: int, p_true: float = 1.0, prompt: str | None = None) -> list[dict]:
    """Toy-world rows: scenes with their captions as chosen answers (true colour with probability `p_true`)."""
    from mmalign.toy.scenes import noisy_caption, sample_scenes
    from mmalign.vlm.toy import TOY_PLAIN_PROMPT, scene_images

    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng([seed, 2])
    captions = [noisy_caption(s, rng, p_true) for s in scenes]
    return [{"key": f"{i:09d}-toy", "images": [im], "prompt": prompt or TOY_PLAIN_PROMPT, "chosen": c}
            for i, (im, c) in enumerate(zip(scene_images(scenes), captions))]


# -- command line ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_model_arguments(parser)
    src = parser.add_argument_group("rows (one of)")
    src.add_argument("--rows", help="JSONL rows {image, prompt, chosen} or LLaVA conversations")
    src.add_argument("--toy-scenes", type=int, help="use N toy-world scenes with their captions as chosen answers")
    src.add_argument("--toy-seed", type=int, default=1)
    src.add_argument("--toy-p-true", type=float, default=1.0, help="toy chosen captions name the true colour with "
                                                                   "this probability")
    parser.add_argument("--image-root", default=".", help="folder the rows' image paths are relative to")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", required=True, help="output shard folder (vlm_pair)")
    parser.add_argument("--rho", type=float, default=0.99, help="share of image tokens hidden (1 = blind)")
    parser.add_argument("--similarity-threshold", type=float, default=0.97)
    parser.add_argument("--max-resamples", type=int, default=5, help="resamples of a too-similar answer; the "
                                                                     "last is unguided")
    parser.add_argument("--flip-prob", type=float, default=0.5, help="yes/no polarity flip probability")
    parser.add_argument("--embedder", default="vlm", help="'vlm' (the VLM's token embeddings) or a text-encoder "
                                                          "folder / hub id (mean pooling)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from mmalign.selfgen.embed import load_embedder

    try:
        cfg = BDHSConfig(rho=args.rho, similarity_threshold=args.similarity_threshold,
                         max_resamples=args.max_resamples, flip_prob=args.flip_prob,
                         max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                         batch_size=args.batch_size, seed=args.seed, strict=args.strict)
        if (args.rows is None) == (args.toy_scenes is None):
            raise ValueError("give exactly one of --rows FILE.jsonl or --toy-scenes N")
        if args.rows is not None and not Path(args.rows).is_file():
            raise FileNotFoundError(f"--rows {args.rows}: file not found")
    except (ValueError, FileNotFoundError) as err:
        print(f"mmalign selfgen bdhs: {err}", file=sys.stderr)
        return 2
    if args.toy_scenes is not None:
        rows: Any = toy_rows(args.toy_scenes, args.toy_seed, args.toy_p_true)[: args.limit]
        total = len(rows)
    else:
        rows = read_rows(args.rows, args.image_root, cfg.counts, cfg.strict, args.limit)
        total = None
    adapter = load_adapter(args)
    embedder = load_embedder(args.embedder, adapter, next(adapter.model.parameters()).device)
    conversion = {"from": "selfgen bdhs", "model": args.model, "options": {
        "rho": cfg.rho, "similarity_threshold": cfg.similarity_threshold, "max_resamples": cfg.max_resamples,
        "flip_prob": cfg.flip_prob, "embedder": args.embedder, "seed": cfg.seed}, "counts": cfg.counts}
    write_pairs(args.out, bdhs_pairs(adapter, tqdm(rows, total=total, desc="BDHS pairs"), cfg, embedder),
                conversion, overwrite=args.overwrite)
    print(f"wrote {args.out}: {dict(cfg.counts)}")
    return 0
