"""Benchmark: seconds per Diffusion-DPO step and peak memory, three ways, in one run.

  (a) naive   : VAE + text encoders every step, a separate frozen reference UNet copy (the reference scripts)
  (b) cached  : latents and text embeddings precomputed once (mmalign's cache), reference copy
  (c) lora    : cached inputs, LoRA, the reference is the same UNet with adapters disabled (no second copy)

Each variant runs in its own subprocess so peak memory is its own (CPU: peak RSS growth over the loaded
baseline; CUDA: torch.cuda.max_memory_allocated). Prints a table and ratios against (a) measured in the same run.

    python scripts/bench/t2i_step.py                       # tiny SD-1.5-style config on CPU
    python scripts/bench/t2i_step.py --sdxl-full --device cuda --dtype bf16 --resolution 1024 --batch 1 \
        --gradient-checkpointing                           # full-size SDXL UNet config, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def full_size_sdxl(out_dir: str) -> str:
    """An SDXL-shaped pipeline folder: the real SDXL UNet config with random weights and tiny encoders/VAE
    stand-ins of the right output widths (encoders and VAE do not matter for (b) and (c))."""
    import torch
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
    unet = UNet2DConditionModel(**cfg)
    unet.save_pretrained(os.path.join(out_dir, "unet"))
    return out_dir


def run_variant(args) -> dict:
    import torch

    from mmalign.adapters.t2i import T2IAdapter, TextConditioning, load_t2i_components

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    comps = load_t2i_components(args.model)
    for m in [comps.vae, *comps.text_encoders]:
        m.to(device)
    unet = comps.unet
    if args.variant == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False).to(device, dtype)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        adapter = T2IAdapter(comps, reference="disabled_adapters")
    else:
        unet.to(device, dtype)
        adapter = T2IAdapter(comps, reference="frozen_copy", reference_dtype=dtype)
        adapter.ref_unet.to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    b, res = args.batch, args.resolution
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2 * b, 3, res, res, generator=g) * 2 - 1).to(device)
    captions = ["a red circle on the left"] * b
    sizes = torch.tensor([[res, res]] * b)
    crops = torch.zeros(b, 2)
    cached = None
    if args.variant != "naive":
        post = adapter.encode_images(pixels).view(2, b, -1, res // adapter_down(comps), res // adapter_down(comps))
        cached = (post, adapter.encode_text(captions))

    def step(i):
        gen = torch.Generator().manual_seed(i)
        if cached is None:
            post = adapter.encode_images(pixels)
            post = post.view(2, b, *post.shape[1:])
            cond = adapter.encode_text(captions)
        else:
            post, cond = cached
        lat = adapter.sample_latents(post, gen).to(device)
        tid = adapter.time_ids(sizes, crops, (res, res)).to(device) if comps.is_sdxl else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pol, ref, _ = adapter.group_errors(unet, lat, TextConditioning(cond.prompt_embeds, cond.pooled),
                                               tid, gen, True)
        z = -2500.0 * ((pol[0] - pol[1]) - (ref[0] - ref[1]))
        loss = -torch.nn.functional.logsigmoid(z).mean()
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
    for i in range(args.steps):
        step(1000 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024 + model_mb(comps, adapter)
    return {"variant": args.variant, "s_per_step": sec, "peak_mb": peak_mb}


def adapter_down(comps) -> int:
    return 2 ** (len(comps.vae.config.block_out_channels) - 1)


def model_mb(comps, adapter) -> float:
    """On CPU, RSS growth misses weights loaded before the baseline: add UNet (+ reference copy) bytes."""
    size = sum(p.numel() * p.element_size() for p in comps.unet.parameters())
    if adapter.ref_unet is not None:
        size += sum(p.numel() * p.element_size() for p in adapter.ref_unet.parameters())
    return size / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder; default: a tiny SD-1.5 config built now")
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
            if args.sdxl_full:
                args.model = full_size_sdxl(os.path.join(tmp, "sdxl_full"))
            else:
                from mmalign.tiny import build_tiny_sd

                args.model = str(build_tiny_sd(os.path.join(tmp, "sd15")))
        rows = []
        for variant in ["naive", "cached", "lora"]:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--device", args.device,
                   "--dtype", args.dtype, "--resolution", str(args.resolution), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"model={args.model if not args.sdxl_full else 'SDXL UNet config (random)'} device={args.device} "
          f"dtype={args.dtype} res={args.resolution} pairs/step={args.batch}")
    print(f"{'variant':<8} {'s/step':>9} {'x naive':>8} {'peak MB':>9} {'x naive':>8}")
    for r in rows:
        print(f"{r['variant']:<8} {r['s_per_step']:>9.4f} {r['s_per_step'] / base['s_per_step']:>8.2f} "
              f"{r['peak_mb']:>9.1f} {r['peak_mb'] / base['peak_mb']:>8.2f}")


if __name__ == "__main__":
    main()
