"""Toy-world experiments: generate with a base model, label with the simulated annotator, evaluate and report.

These are the stages of `mmalign quickstart` and `mmalign bench toy`, kept as plain functions so each is testable
and reusable. Conventions:

- An image of the toy world is (32, 32, 3) uint8; batches are (N, 32, 32, 3).
- Every generated image has its own seed and its own `torch.Generator`, so an image depends only on (model,
  prompt, seed), never on batch composition: base and aligned models compared "at equal seeds" start from
  identical noise.
- The ground-truth reward is `mmalign.toy.rewards.total_reward` (0.5 colour + 0.25 shape + 0.25 position); its
  components are reported beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmalign.toy.annotator import agreement, label_pairs, rank
from mmalign.toy.rewards import reward_components

TIE_TOLERANCE = 0.05  # reward differences within this count as ties (worth 1/2) in win rates


def image_seed(seed: int, index: int) -> int:
    """The noise seed of the `index`-th image generated for a prompt whose (prompt, seed) pair has `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 20,
             batch_size: int = 128, desc: str = "generate", progress: bool = True) -> np.ndarray:
    """Images (N, 32, 32, 3) uint8 for (prompt, seed) pairs, one generator per image, batched."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        images = pipe(list(prompts[i:i + batch_size]), num_inference_steps=num_inference_steps, generator=gens,
                      output_type="np").images
        out.append(np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def rewards(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-image ground-truth rewards: color, shape, position and total (0.5 / 0.25 / 0.25)."""
    parts = {k: np.asarray(v, dtype=np.float64) for k, v in reward_components(images, list(prompts)).items()}
    parts["total"] = 0.5 * parts["color"] + 0.25 * parts["shape"] + 0.25 * parts["position"]
    return parts


# -- preference data ---------------------------------------------------------------------------------------------
@dataclass
class Annotator:
    """The simulated annotator's settings: Bradley-Terry temperature on the total reward and a tie margin."""

    temperature: float = 0.05
    tie_margin: float = 0.05
    seed: int = 0


def write_preference_data(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int],
                          images_per_prompt: int, out_dir: str | Path, annotator: Annotator,
                          ranked: bool = False) -> dict:
    """Label every pair of the K images of each prompt (and, with `ranked`, rank each list) and write shards.

    `images` are grouped by prompt: rows `g*K .. g*K+K-1` belong to `prompts[g]`. Writes `out_dir/pairs`
    (`pair` schema, ties kept as label 0.5 so the trainer's tie policy decides) and, if asked, `out_dir/ranked`
    (`ranked` schema, scores = K-1 .. 0 along the annotator's Plackett-Luce order). Returns counts and the
    annotator's agreement with the ground truth.
    """
    from mmalign.data.schemas import pair_sample, ranked_sample
    from mmalign.data.writer import ShardSetWriter

    k = images_per_prompt
    if len(images) != len(prompts) * k:
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts x {k} images per prompt")
    r = rewards(images, [p for p in prompts for _ in range(k)])["total"].reshape(len(prompts), k)
    ia, ib = np.triu_indices(k, 1)
    ra, rb = r[:, ia], r[:, ib]
    rng = np.random.default_rng(annotator.seed)
    labels = label_pairs(ra, rb, rng, annotator.temperature, annotator.tie_margin)
    prov = {"dataset": "mmalign-toy", "generators": ["toy-base", "toy-base"]}
    out = Path(out_dir)
    with ShardSetWriter(out / "pairs", "pair", max_count=2000, overwrite=True) as writer:
        for g, prompt in enumerate(prompts):
            for j, (a, b) in enumerate(zip(ia, ib)):
                writer.write(pair_sample(f"{g:06d}-{a}{b}", images[g * k + a], images[g * k + b], caption=prompt,
                                         label_0=float(labels[g, j]), provenance=prov,
                                         seeds=[int(seeds[g * k + a]), int(seeds[g * k + b])],
                                         true_rewards=[float(ra[g, j]), float(rb[g, j])]))
        counts = {"pairs": int(labels.size), "ties": int((labels == 0.5).sum())}
        writer.set_conversion({"from": "toy annotator", "annotator": annotator.__dict__, "counts": counts})
    decided = labels != 0.5
    stats = {**counts, "prompts": len(prompts), "images": int(len(images)),
             "annotator_agreement": agreement(labels[decided], ra[decided], rb[decided]),
             "mean_abs_reward_gap": float(np.abs(ra - rb)[decided].mean()) if decided.any() else 0.0}
    if ranked:
        order = rank(r, rng, annotator.temperature)
        with ShardSetWriter(out / "ranked", "ranked", max_count=1000, overwrite=True) as writer:
            for g, prompt in enumerate(prompts):
                scores = np.empty(k)
                scores[order[g]] = np.arange(k - 1, -1, -1, dtype=np.float64)
                writer.write(ranked_sample(f"{g:06d}", [images[g * k + i] for i in range(k)], caption=prompt,
                                           scores=scores.tolist(), scorers=["toy-annotator"], provenance=prov,
                                           true_rewards=r[g].tolist()))
        stats["ranked_lists"] = len(prompts)
    return stats


# -- evaluation --------------------------------------------------------------------------------------------------
def win_rate(candidate: np.ndarray, baseline: np.ndarray, tie_tolerance: float = TIE_TOLERANCE) -> dict:
    """Paired win rate of `candidate` over `baseline` (same prompts and seeds), ties worth 1/2, with a 95% CI.

    Each pair scores 1 (win: candidate reward higher by more than `tie_tolerance`), 0 (loss) or 1/2 (tie). The
    interval is the normal approximation on the mean of those scores: mean +- 1.96 * sd / sqrt(n), clipped to
    [0, 1].
    """
    c, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if c.shape != b.shape or c.ndim != 1 or len(c) < 2:
        raise ValueError(f"need two equal 1-D reward arrays of length >= 2, got {c.shape} and {b.shape}")
    diff = c - b
    score = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))
    mean = float(score.mean())
    half = 1.96 * float(score.std(ddof=1)) / math.sqrt(len(score))
    return {"value": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "n": int(len(score)),
            "wins": int((score == 1).sum()), "ties": int((score == 0.5).sum()), "losses": int((score == 0).sum()),
            "tie_tolerance": tie_tolerance}


def pixel_drift(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean RGB distance (0-255 units) between images generated at equal seeds, over all pixels."""
    if a.shape != b.shape:
        raise ValueError(f"drift needs images of the same shape, got {a.shape} and {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt((d * d).sum(axis=-1)).mean())


def compare(base_images: np.ndarray, aligned_images: np.ndarray, prompts: Sequence[str]) -> dict:
    """Mean rewards of both models, their gain, the aligned model's win rate over base and the drift."""
    rb, ra = rewards(base_images, prompts), rewards(aligned_images, prompts)
    return {"n": len(prompts),
            "base": {k: float(v.mean()) for k, v in rb.items()},
            "aligned": {k: float(v.mean()) for k, v in ra.items()},
            "gain": {k: float(ra[k].mean() - rb[k].mean()) for k in rb},
            "win_rate": win_rate(ra["total"], rb["total"]),
            "color_win_rate": win_rate(ra["color"], rb["color"]),
            "drift": pixel_drift(base_images, aligned_images)}


def side_by_side_grid(base: np.ndarray, aligned: np.ndarray, rows: int = 8, cols: int = 4, scale: int = 4,
                      captions: Sequence[str] | None = None, base_notes: Sequence[str] | None = None,
                      aligned_notes: Sequence[str] | None = None):
    """A PIL image: `rows` x `cols` base images on the left, the aligned images at the same seeds on the right,
    upscaled `scale` times (nearest neighbour) with a gap between the two panels.

    With `captions` (one prompt per image pair), each panel gets a header ("base" / "aligned") and every image a
    caption under it: its prompt and its note (`base_notes` / `aligned_notes`, e.g. its ground-truth scores)."""
    from PIL import Image

    from mmalign.grids import captioned_grid

    n = rows * cols
    if len(base) < n or len(aligned) < n:
        raise ValueError(f"the grid needs {n} images per model, got {len(base)} and {len(aligned)}")
    if captions is None:
        def panel(images: np.ndarray) -> np.ndarray:
            tiles = images[:n].reshape(rows, cols, *images.shape[1:])
            return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * images.shape[1], cols * images.shape[2], 3)

        gap = np.full((rows * base.shape[1], 8, 3), 255, np.uint8)
        grid = np.concatenate([panel(base), gap, panel(aligned)], axis=1)
        return Image.fromarray(np.kron(grid, np.ones((scale, scale, 1), np.uint8)))
    if len(captions) < n:
        raise ValueError(f"the grid needs {n} captions, got {len(captions)}")
    left = captioned_grid(base[:n], [_caption(captions[i], base_notes, i) for i in range(n)], cols, scale, "base")
    right = captioned_grid(aligned[:n], [_caption(captions[i], aligned_notes, i) for i in range(n)], cols, scale,
                           "aligned")
    out = Image.new("RGB", (left.width + 8 * scale + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + 8 * scale, 0))
    return out


def _caption(prompt: str, notes: Sequence[str] | None, i: int) -> str:
    return prompt if notes is None else f"{prompt}\n{notes[i]}"


def write_samples(out_dir: Path, base: np.ndarray, aligned: np.ndarray, prompts: Sequence[str],
                  seeds: Sequence[int]) -> None:
    """`samples/{base,aligned}/NNNN.png` and `samples/prompts.jsonl` (one line per image: file, prompt, seed)."""
    from PIL import Image

    lines = []
    for name, images in (("base", base), ("aligned", aligned)):
        folder = out_dir / "samples" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
            Image.fromarray(image).save(folder / f"{i:04d}.png")
            lines.append(json.dumps({"file": f"{name}/{i:04d}.png", "prompt": prompt, "seed": int(seed)}))
    (out_dir / "samples" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
