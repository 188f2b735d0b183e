"""Benchmark: seconds per Diffusion-DPO step and peak memory, three ways, in one run.

  (a) naive   : VAE + text encoders every step, a separate frozen reference UNet copy (the reference scripts)
  (b) cached  : latents and text embeddings read from mmalign's cache (`mmalign train CONFIG --cache-only`, built
                here once, before timing), reference copy; the VAE and text encoders stay off the device
  (c) lora    : cached inputs, LoRA, the reference is the same UNet with adapters disabled (no second copy)

Every variant is mmalign's own text-to-image task (`mmalign.train.t2i.T2ITask`): its batches, its
`compute_loss`, backward and an AdamW step; batches are read before timing, so the numbers compare the steps, not
the image decoding. Each variant runs in its own subprocess so peak memory is its own (CPU: peak RSS growth over
the loaded baseline plus the UNet and reference weights; CUDA: torch.cuda.max_memory_allocated). Prints a table
and ratios against (a) measured in the same run.

    python scripts/bench/t2i_step.py                       # tiny SD-1.5-style pipeline + toy pairs, on CPU
    python scripts/bench/t2i_step.py --sdxl-full --device cuda --dtype bf16 --resolution 1024 --batch 1 \
        --gradient-checkpointing                           # full-size SDXL UNet config, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]


def full_size_sdxl(out_dir: str) -> str:
    """An SDXL-shaped pipeline folder: the real SDXL UNet config with random weights and tiny encoders/VAE
    stand-ins of the right output widths (encoders and VAE do not matter for (b) and (c))."""
    from diffusers import UNet2DConditionModel

    from mmalign.tiny import build_tiny_sd

    build_tiny_sd(out_dir, kind="sdxl")
    cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                      "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    shutil.rmtree(os.path.join(out_dir, "unet"))
    UNet2DConditionModel(**cfg).save_pretrained(os.path.join(out_dir, "unet"))
    return out_dir


def bench_config(args, variant: str):
    from mmalign.config import validate_config
    from mmalign.train.config import T2ITrainConfig

    model = {"pretrained": args.model, "gradient_checkpointing": args.gradient_checkpointing}
    if variant == "lora":
        model["lora"] = {"rank": 8}
    return validate_config(T2ITrainConfig, {
        "model": model, "method": {"name": "dpo", "beta": 5000},
        "data": {"shards": args.shards, "resolution": args.resolution, "shuffle_buffer": 0,
                 "cache": variant != "naive"},
        "train": {"max_steps": 1, "batch_size": args.batch,
                  "mixed_precision": {"fp32": "no", "bf16": "bf16"}[args.dtype]},
    }, "<benchmark>")


def run_variant(args) -> dict:
    import torch

    from mmalign.train.t2i import T2ITask

    device = torch.device(args.device)
    cfg = bench_config(args, args.variant)
    task = T2ITask(cfg)
    task.check_inputs()
    built = task.build(device)
    unet, adapter = built.module, built.model
    opt = torch.optim.AdamW(built.params, lr=1e-6)
    stream = task.batches(0, 1, 0)
    batches = [next(stream) for _ in range(args.warmup + args.steps)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(i):
        with autocast:
            loss, _ = T2ITask.compute_loss(cfg, adapter, unet, unet, batches[i], torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024 + model_mb(unet, adapter)
    return {"variant": args.variant, "s_per_step": sec, "peak_mb": peak_mb}


def model_mb(unet, adapter) -> float:
    """On CPU, RSS growth misses weights loaded before the baseline: add UNet (+ reference copy) bytes."""
    size = sum(p.numel() * p.element_size() for p in unet.parameters())
    if adapter.ref_unet is not None:
        size += sum(p.numel() * p.element_size() for p in adapter.ref_unet.parameters())
    return size / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder; default: assets/tiny/sd15 (--sdxl-full: built)")
    ap.add_argument("--shards", default=None, help="pair shard folder; default: a copy of assets/tiny/pairs (the "
                                                   "cache is written next to the shards)")
    ap.add_argument("--sdxl-full", action="store_true", help="full-size SDXL UNet config, random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--variant", choices=["naive", "cached", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = full_size_sdxl(os.path.join(tmp, "sdxl_full")) if args.sdxl_full \
                else str(ROOT / "assets" / "tiny" / "sd15")
        if args.shards is None:
            args.shards = shutil.copytree(ROOT / "assets" / "tiny" / "pairs", os.path.join(tmp, "pairs"))
        from mmalign.train.t2i import build_cache

        t0 = time.perf_counter()
        build_cache(bench_config(args, "cached"), device=args.device, progress=False)
        cache_s = time.perf_counter() - t0
        rows = []
        for variant in ["naive", "cached", "lora"]:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", str(args.model), "--shards",
                   str(args.shards), "--device", args.device, "--dtype", args.dtype, "--resolution",
                   str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                   str(args.warmup)]
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"model={'SDXL UNet config (random)' if args.sdxl_full else args.model} device={args.device} "
          f"dtype={args.dtype} res={args.resolution} pairs/step={args.batch} steps={args.steps} "
          f"(cache built once in {cache_s:.1f} s, not timed below)")
    print(f"{'variant':<8} {'s/step':>9} {'x naive':>8} {'peak MB':>9} {'x naive':>8}")
    for r in rows:
        print(f"{r['variant']:<8} {r['s_per_step']:>9.4f} {r['s_per_step'] / base['s_per_step']:>8.2f} "
              f"{r['peak_mb']:>9.1f} {r['peak_mb'] / base['peak_mb']:>8.2f}")


if __name__ == "__main__":
    main()
