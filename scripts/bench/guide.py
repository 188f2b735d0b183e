"""Benchmark: the cost of reward-guided sampling per image, as ratios against unguided sampling in the same run.

For each pipeline, the same prompts and seeds are sampled four ways with `mmalign.guidance.guided_sample`:

- `unguided` (guidance.scale 0: the pipeline's own sampling);
- `latent`: a noisy-latent reward model (`mmalign.rewards.latent`, random weights: the cost does not depend on them)
  scores x_t at every step; no VAE decode, no denoiser backward. Target: at most 1.3x unguided;
- `pixel, x0`: a pixel reward on the VAE-decoded clean estimate with the prediction held fixed (decode + scorer
  backward every step, no denoiser backward);
- `pixel, model`: the same with the exact gradient through the denoiser (its backward every step).

Pipelines: the toy world's (pixel space, its colour reward) and a tiny SD 1.5 (tiny CLIP scorer) by default;
`--sd15-full` instead builds SD 1.5 from its published configs with random weights (860 M UNet, 512 px) and a
ViT-L/14-sized CLIP scorer at 224 px (the GPU row of `scripts/bench/gpu.sh`).

    python scripts/bench/guide.py                                   # CPU, toy + tiny SD 1.5
    python scripts/bench/guide.py --sd15-full --device cuda --dtype bfloat16 --n 4

Each variant is timed `--repeats` times after one warm-up; the best time is reported (ms per image and the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VARIANTS = (("unguided", None), ("latent", "latent"), ("pixel, x0", "x0"), ("pixel, model", "model"))


def pipelines(args, workdir: Path) -> list[tuple[str, str, str]]:
    """(name, pipeline folder, pixel scorer spec) for each benchmarked pipeline."""
    from mmalign.rewards.tiny import build_tiny_clip
    from mmalign.toy.recipe import BASE_MODEL

    if args.sd15_full:
        sys.path.insert(0, str(ROOT / "scripts" / "bench"))
        from t2i_step import save_pipeline, sd15_modules

        folder = save_pipeline(sd15_modules(), str(workdir / "sd15"))
        clip = build_tiny_clip(workdir / "clip", image_size=224, patch_size=14, width=1024, layers=24, embed_dim=768)
        return [("SD 1.5 (published config) 512 px", folder, f"clip_score={clip}")]
    from mmalign.t2i.tiny import build_tiny_sd

    clip = build_tiny_clip(workdir / "clip")
    return [("toy (pixel space) 32 px", str(BASE_MODEL), "toy_color_soft"),
            ("tiny SD 1.5 32 px", str(build_tiny_sd(workdir / "sd15")), f"clip_score={clip}")]


def bench(args) -> list[dict]:
    import torch

    from mmalign.guidance import GuidanceConfig, RewardSet, SamplerConfig, guided_sample, load_pipeline
    from mmalign.rewards.latent import build_latent_reward
    from mmalign.toy.scenes import all_prompts

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    prompts = [all_prompts()[i % 36] for i in range(args.n)]
    seeds = list(range(args.n))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder, pixel_spec in pipelines(args, Path(tmp)):
            pipe = load_pipeline(folder, dtype=dtype, device=args.device)
            latent_dir = Path(tmp) / f"latent_{len(rows)}"
            build_latent_reward(folder, name="bench_latent").save_pretrained(latent_dir)
            sampler = SamplerConfig(steps=args.steps, batch_size=args.n, cfg_scale=args.cfg_scale)
            timed: dict[str, tuple[float, float | None]] = {}
            # Unguided runs first and again last (the baseline is its better time), so a GPU still raising its
            # clocks or an allocator still growing does not flatter the guided variants.
            for label, mode in (*VARIANTS, VARIANTS[0]):
                rewards = None
                if mode is not None:
                    spec = str(latent_dir) if mode == "latent" else pixel_spec
                    rewards = RewardSet.load([(spec, 1.0)], device=args.device)
                    rewards.terms[0].model.to(dtype)
                guidance = GuidanceConfig(scale=0.0 if mode is None else 1.0,
                                          grad_through=mode if mode in ("x0", "model") else "model")
                times = []
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                for i in range(args.repeats + 1):
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    guided_sample(pipe, prompts, seeds, rewards, guidance=guidance, sampler=sampler, progress=False)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if i:  # the first run warms up
                        times.append(time.perf_counter() - t0)
                ms = 1000 * min(times) / args.n
                peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
                if label in timed:
                    ms = min(ms, timed[label][0])
                timed[label] = (ms, peak)
            base_ms = timed[VARIANTS[0][0]][0]
            for label, _ in VARIANTS:
                ms, peak = timed[label]
                rows.append({"pipeline": name, "variant": label, "ms_per_image": ms, "ratio": ms / base_ms,
                             "peak_gb": peak, "n": args.n, "steps": args.steps})
                print(f"{name:36s} {label:14s} {ms:9.1f} ms/image  {ms / base_ms:5.2f}x", flush=True,
                      file=sys.stderr if args.json_stdout else sys.stdout)
            del pipe
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per run (one batch; 16)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (20)")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1.0 = off)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant after one warm-up (3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--sd15-full", action="store_true", help="SD 1.5 from its published configs, 512 px")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--json-stdout", action="store_true", help="print the rows as one JSON line last (for gpu.sh)")
    args = ap.parse_args()
    rows = bench(args)
    if args.json_stdout:
        print(json.dumps({"rows": rows}))
        return
    print("\n| pipeline | variant | ms / image | x unguided |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['variant']} | {r['ms_per_image']:.1f} | {r['ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
