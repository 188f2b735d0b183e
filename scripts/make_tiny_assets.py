"""Build the tiny shipped assets used by `configs/tiny/*.yaml`, CI and the pre-toy-world quickstart.

    python scripts/make_tiny_assets.py [--out assets/tiny] [--seed 0]

- `sd15/`, `sdxl/`: tiny SD-1.5- and SDXL-style pipelines with random weights (`mmalign.t2i.tiny.build_tiny_sd`),
  in diffusers format (load with `DiffusionPipeline.from_pretrained`).
- `sd3/`, `wan/`: tiny SD3- and Wan-2.1-style rectified-flow pipelines (`mmalign.flow.tiny`), same format.
- `pairs/`: `pair` shards from the toy world: for each sampled caption, one scene it describes and one that
  differs only in colour; the ground-truth total reward decides the label (winner first is not assumed:
  positions are shuffled, `label_0` says which image won).
- `ranked/`: `ranked` shards: K=4 scenes per caption (the right one and three recoloured), scored with the
  ground-truth total reward.

Deterministic from --seed (same bytes every run).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np


def toy_pairs(n: int, seed: int):
    from mmalign.toy.rewards import total_reward
    from mmalign.toy.scenes import PALETTE, all_prompts, sample_scene

    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    colors = list(PALETTE)
    for i in range(n):
        caption = prompts[rng.integers(len(prompts))]
        good = sample_scene(rng, caption)
        other = [c for c in colors if c != good.color][rng.integers(len(colors) - 1)]
        bad = dataclasses.replace(good, color=other)
        imgs = [good.render(), bad.render()]
        rewards = total_reward(np.stack(imgs), [caption, caption])
        if rng.random() < 0.5:
            imgs, rewards = imgs[::-1], rewards[::-1]
        label_0 = 1.0 if rewards[0] > rewards[1] else 0.0 if rewards[0] < rewards[1] else 0.5
        yield f"toy-{i:06d}", imgs, caption, label_0, [float(r) for r in rewards]


def toy_ranked(n: int, k: int, seed: int):
    from mmalign.toy.rewards import total_reward
    from mmalign.toy.scenes import PALETTE, all_prompts, sample_scene

    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    for i in range(n):
        caption = prompts[rng.integers(len(prompts))]
        good = sample_scene(rng, caption)
        colors = list(PALETTE)
        rng.shuffle(colors)
        scenes = [dataclasses.replace(good, color=c) for c in colors[:k]]
        imgs = [s.render() for s in scenes]
        scores = total_reward(np.stack(imgs), [caption] * k)
        yield f"toy-{i:06d}", imgs, caption, [float(s) for s in scores]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--ranked", type=int, default=64)
    ap.add_argument("--only", default="sd15,sdxl,sd3,wan,pairs,ranked", help="comma-separated parts to (re)build")
    args = ap.parse_args()
    parts = {p.strip() for p in args.only.split(",")}
    from mmalign.t2i.tiny import build_tiny_sd

    from mmalign.flow.tiny import build_tiny_sd3, build_tiny_wan

    out = Path(args.out)
    for part, build in (("sd15", lambda: build_tiny_sd(out / "sd15", kind="sd15", seed=args.seed)),
                        ("sdxl", lambda: build_tiny_sd(out / "sdxl", kind="sdxl", seed=args.seed)),
                        ("sd3", lambda: build_tiny_sd3(out / "sd3", seed=args.seed)),
                        ("wan", lambda: build_tiny_wan(out / "wan", seed=args.seed))):
        if part in parts:
            build()
    if "pairs" in parts:
        write_pairs(out, args)
    if "ranked" in parts:
        write_ranked(out, args)
    print(f"wrote {out}")


def write_pairs(out: Path, args) -> None:
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter

    with ShardSetWriter(out / "pairs", "pair", max_count=128, overwrite=True) as w:
        for key, imgs, caption, label, rewards in toy_pairs(args.pairs, args.seed):
            w.write(pair_sample(key, imgs[0], imgs[1], caption=caption, label_0=label,
                                provenance={"source": "mmalign-toy", "generator": "toy-renderer"},
                                rewards=rewards))
        w.set_conversion({"from": "toy", "seed": args.seed, "counts": {"pairs": args.pairs}})


def write_ranked(out: Path, args) -> None:
    from mmalign.data.schemas import ranked_sample
    from mmalign.data.writer import ShardSetWriter

    with ShardSetWriter(out / "ranked", "ranked", max_count=64, overwrite=True) as w:
        for key, imgs, caption, scores in toy_ranked(args.ranked, 4, args.seed + 1):
            w.write(ranked_sample(key, imgs, caption=caption, scores=scores, scorers=["toy_total_reward"],
                                  provenance={"source": "mmalign-toy", "generator": "toy-renderer"}))
        w.set_conversion({"from": "toy", "seed": args.seed + 1, "counts": {"lists": args.ranked}})


if __name__ == "__main__":
    main()
