"""Build the tiny shipped assets used by `configs/tiny/*.yaml`, CI and the pre-toy-world quickstart.

    python scripts/make_tiny_assets.py [--out assets/tiny] [--seed 0]

- `sd15/`, `sdxl/`: tiny SD-1.5- and SDXL-style pipelines with random weights (`mmalign.t2i.tiny.build_tiny_sd`),
  in diffusers format (load with `DiffusionPipeline.from_pretrained`).
- `sd3/`, `wan/`, `ltx/`: tiny SD3-, Wan-2.1- and LTX-Video-style rectified-flow pipelines (`mmalign.flow.tiny`),
  same format.
- `pairs/`: `pair` shards from the toy world: for each sampled caption, one scene it describes and one that
  differs only in colour; the ground-truth total reward decides the label (winner first is not assumed:
  positions are shuffled, `label_0` says which image won).
- `video_pairs/`: `video_pair` shards of toy clips (`mmalign.toy.video`, 9 frames at 32x32, lossless mp4): each
  caption's clip against the same clip in another colour or a clip moving the opposite way, labelled per dimension (VQ / MQ / TA)
  by the simulated video annotator on the ground-truth rewards.
- `ranked/`: `ranked` shards: K=4 scenes per caption (the right one and three recoloured), scored with the
  ground-truth total reward.
- `step_pairs/`: `step_pair` shards for SPO: `mmalign selfgen spo` on the tiny SD 1.5 (`sd15/`, built first) with
  the toy colour reward standing in for a step-aware model (10 DDIM steps, eta 1, guidance 5, k 4).
- `musicgen/`: a tiny MusicGen (`MusicgenForConditionalGeneration`: T5 text encoder, EnCodec, decoder with K=4
  codebooks of 64 codes; `mmalign.music.tiny`), random weights, loadable with `from_pretrained`.
- `music_pairs/`: `music_pair` shards of toy token music for `musicgen/` (K=4 codebooks of 64 codes, 6 to 16 frames,
  int16 codes): the chosen codes' codebook 0 follows the caption's pitch pattern (ascending, descending, repeating,
  alternating), the rejected codes' another pattern; codebooks 1..3 carry the caption instrument's timbre codes.

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


MUSIC_PATTERNS = ("ascending", "descending", "repeating", "alternating")
MUSIC_INSTRUMENTS = ("piano", "guitar", "violin", "flute")


def toy_music_codes(pattern: str, instrument: str, frames: int, rng, num_codebooks: int = 4,
                    vocab_size: int = 64) -> np.ndarray:
    """(K, T) toy codes: codebook 0 a pitch line following `pattern` from a random start, codebooks 1..K-1 the
    instrument's timbre code (one per codebook) with occasional neighbours."""
    start, step = int(rng.integers(8, vocab_size - 24)), int(rng.integers(1, 3))
    t = np.arange(frames)
    pitch = {"ascending": start + step * t, "descending": start + 16 - step * t,
             "repeating": np.full(frames, start), "alternating": start + step * 4 * (t % 2)}[pattern]
    codes = np.empty((num_codebooks, frames), dtype=np.int16)
    codes[0] = np.clip(pitch, 0, vocab_size - 1)
    base = MUSIC_INSTRUMENTS.index(instrument) * 12 + 4
    for k in range(1, num_codebooks):
        codes[k] = base + 2 * k + (rng.random(frames) < 0.2)
    return codes


def toy_music_pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        pattern, other = rng.choice(MUSIC_PATTERNS, size=2, replace=False)
        instrument = MUSIC_INSTRUMENTS[rng.integers(len(MUSIC_INSTRUMENTS))]
        caption = f"{'an' if pattern[0] in 'aeiou' else 'a'} {pattern} {instrument} melody"
        chosen = toy_music_codes(pattern, instrument, int(rng.integers(6, 17)), rng)
        rejected = toy_music_codes(other, instrument, int(rng.integers(6, 17)), rng)
        yield f"toy-{i:06d}", caption, chosen, rejected, str(other)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--ranked", type=int, default=64)
    ap.add_argument("--video-pairs", type=int, default=32)
    ap.add_argument("--music-pairs", type=int, default=48)
    ap.add_argument("--only", default="sd15,sdxl,sd3,wan,ltx,pairs,ranked,video_pairs,step_pairs,musicgen,music_pairs",
                    help="comma-separated parts to (re)build")
    args = ap.parse_args()
    parts = {p.strip() for p in args.only.split(",")}
    from mmalign.t2i.tiny import build_tiny_sd

    from mmalign.flow.tiny import build_tiny_ltx, build_tiny_sd3, build_tiny_wan
    from mmalign.music.tiny import build_tiny_musicgen

    out = Path(args.out)
    for part, build in (("sd15", lambda: build_tiny_sd(out / "sd15", kind="sd15", seed=args.seed)),
                        ("sdxl", lambda: build_tiny_sd(out / "sdxl", kind="sdxl", seed=args.seed)),
                        ("sd3", lambda: build_tiny_sd3(out / "sd3", seed=args.seed)),
                        ("wan", lambda: build_tiny_wan(out / "wan", seed=args.seed)),
                        ("ltx", lambda: build_tiny_ltx(out / "ltx", seed=args.seed)),
                        ("musicgen", lambda: build_tiny_musicgen(out / "musicgen", seed=args.seed))):
        if part in parts:
            build()
    if "pairs" in parts:
        write_pairs(out, args)
    if "ranked" in parts:
        write_ranked(out, args)
    if "video_pairs" in parts:
        write_video_pairs(out, args)
    if "step_pairs" in parts:
        write_step_pairs(out, args)
    if "music_pairs" in parts:
        write_music_pairs(out / "music_pairs", args.music_pairs, args.seed + 3)
    print(f"wrote {out}")


def write_step_pairs(out: Path, args) -> None:
    from mmalign.selfgen.spo import SPOSamplingConfig, build_step_pairs
    from mmalign.toy.scenes import prompt_seed_pairs

    prompts = [p for p, _ in prompt_seed_pairs("train", 16)]
    cfg = SPOSamplingConfig(num_inference_steps=10, guidance_scale=5.0, eta=1.0, k=4, divert_start=2, threshold=0.1,
                            score_scale=50.0, seed=args.seed, batch_size=8)
    print(build_step_pairs(str(out / "sd15"), "toy_color_soft", prompts, out / "step_pairs", cfg, resolution=32,
                           device="cpu", overwrite=True, progress=False))


def write_video_pairs(out: Path, args) -> None:
    from mmalign.toy.scenes import COLORS
    from mmalign.toy.video import sample_clip
    from mmalign.toy.video_annotator import label_video_pairs, write_video_pair_shards
    from mmalign.toy.video_rewards import video_rewards

    rng = np.random.default_rng(args.seed + 2)
    good, bad, prompts = [], [], []
    for _ in range(args.video_pairs):
        clip = sample_clip(rng)
        other = [c for c in COLORS if c != clip.color][rng.integers(len(COLORS) - 1)]
        flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}.get(clip.direction)
        # Another direction means another start: a fresh clip of the flipped caption (same colour and shape).
        changed = (sample_clip(rng, caption=clip.caption.replace(clip.direction, flipped))
                   if flipped and rng.random() < 0.5 else dataclasses.replace(clip, color=other))
        good.append(clip.render())
        bad.append(changed.render())
        prompts.append(clip.caption)
    a, b = np.stack(good), np.stack(bad)
    swap = rng.random(len(prompts)) < 0.5  # the preferred clip is A or B at random
    a[swap], b[swap] = b[swap].copy(), a[swap].copy()
    ra, rb = video_rewards(a, prompts), video_rewards(b, prompts)
    labels = label_video_pairs(ra, rb, rng)
    write_video_pair_shards(out / "video_pairs", a, b, prompts, labels, rewards_a=ra, rewards_b=rb,
                            max_count=16, overwrite=True)


def write_pairs(out: Path, args) -> None:
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter

    with ShardSetWriter(out / "pairs", "pair", max_count=128, overwrite=True) as w:
        for key, imgs, caption, label, rewards in toy_pairs(args.pairs, args.seed):
            w.write(pair_sample(key, imgs[0], imgs[1], caption=caption, label_0=label,
                                provenance={"source": "mmalign-toy", "generator": "toy-renderer"},
                                rewards=rewards))
        w.set_conversion({"from": "toy", "seed": args.seed, "counts": {"pairs": args.pairs}})


def write_music_pairs(out: Path, n: int, seed: int) -> Path:
    """`n` toy `music_pair` samples (`toy_music_pairs`) into `out` (one shard)."""
    from mmalign.data.schemas import music_pair_sample
    from mmalign.data.writer import ShardSetWriter

    with ShardSetWriter(out, "music_pair", max_count=max(n, 1), overwrite=True) as w:
        for key, caption, chosen, rejected, other in toy_music_pairs(n, seed):
            w.write(music_pair_sample(key, chosen, rejected, prompt=caption, codec="tiny-encodec", frame_rate=50.0,
                                      provenance={"source": "mmalign-toy", "generator": "toy-token-music"},
                                      rejected_pattern=other))
        w.set_conversion({"from": "toy", "seed": seed, "counts": {"pairs": n}})
    return out


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
