r"""Benchmark: seconds per Diffusion-DPO step and peak memory, three ways, in one run.

  (a) naive   : the reference scripts' step: VAE + text encoders every step, a separate frozen reference UNet
                copy, and their optimizer (`--optim adafactor`: `transformers.Adafactor(scale_parameter=False,
                relative_step=False)`, as the Diffusion-DPO authors' SDXL launcher; `adamw`: `torch.optim.AdamW`)
  (a') naive, mmalign's optimizer (only with `--optim adafactor`): (a) with `mmalign.train.optim.Adafactor`, the
                same update in fewer memory passes, to show what the optimizer alone changes
  (b) cached  : mmalign's step: latents and text embeddings read from mmalign's cache (`mmalign train CONFIG
                --cache-only`, built here once, before timing), reference copy, mmalign's optimizer; the VAE and
                text encoders stay off the device
  (c) lora    : cached inputs, LoRA, the reference is the same UNet with adapters disabled (no second copy)

Every variant is mmalign's own text-to-image task (`mmalign.t2i.task.T2ITask`): its batches, its
`compute_loss` and backward; the optimizer is mmalign's (`--optim`, built by
`mmalign.train.trainer.build_optimizer`) except in (a); batches are read before timing, so the numbers compare the
steps, not the image decoding. Each variant runs in its
own subprocess, so its peak memory is its own. CPU: the peak resident set size (VmHWM) during the warm-up and
timed steps, reset (`/proc/self/clear_refs`) once the models are loaded, minus the resident size the process had
after its imports, before any model loaded: the models, the reference, the optimizer state and the activations,
not the loading transients (a state dict beside the model) and not the ~0.5 GB of imported libraries. On CPU the
VAE and text encoders of (b) and (c) stay loaded in the same memory (on a GPU they stay off the device). CUDA:
torch.cuda.max_memory_allocated over the steps. Prints a table and ratios against (a), and the memory of (c)
against (b) (both full-size inputs from the cache: the target compares LoRA with a full fine-tune with a copy).
Each variant also counts the FLOPs of its first warm-up step's forward and backward (`FlopCounterMode`: matmuls,
convolutions, attention, gradient checkpointing's recomputation included; the optimizer is not counted), which
`scripts/bench/gpu_suite.py` turns into MFU.

    python scripts/bench/t2i_step.py                       # tiny SD-1.5-style pipeline + toy pairs, on CPU
    python scripts/bench/t2i_step.py --sd15-full --resolution 256 --batch 1 --steps 3 --warmup 1 \
        --gradient-checkpointing --optim adafactor         # the real SD 1.5 architecture, random weights, CPU
    python scripts/bench/t2i_step.py --sdxl-full --device cuda --dtype bf16 --resolution 1024 --batch 1 \
        --gradient-checkpointing --optim adafactor         # SDXL base, random weights, GPU
    python scripts/bench/t2i_step.py --sdxl-full --resolution 1024 --batch 1 --gradient-checkpointing --flops
                                                           # FLOPs of the step's parts, on the meta device

`--sd15-full` and `--sdxl-full` build the pipeline from the published configs with random weights (nothing is
downloaded; see `sd15_modules`, `sdxl_modules`): SD 1.5 = UNet (block_out_channels 320/640/1280/1280,
cross_attention_dim 768, attention_head_dim 8; 860 M parameters), the SD VAE (128/256/512/512, 4 latent channels;
84 M) and a CLIP ViT-L/14 text encoder (12 layers, width 768; 123 M); SDXL = its UNet (2.6 B), the same VAE, CLIP
ViT-L/14 and OpenCLIP ViT-bigG/14 (32 layers, width 1280; 695 M). Data: `--pairs` pairs of photo-like JPEGs at the
training resolution. The random weights are drawn on `--device` (seconds on a GPU; a 2.6 B-parameter UNet takes
minutes on a CPU) and, with `--dtype bf16`, the VAE and text encoders are saved in bfloat16, the dtype every variant
runs them in (the UNet stays float32: the policy's master weights).

`--prepare DIR` only writes the model, the pairs and the cache into DIR and prints them as JSON; `--variant` (with
`--model` and `--shards` from it) then runs one variant in its own process and prints its JSON line. This is how
`scripts/bench/gpu_suite.py` runs each variant under its own time limit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]


def _clip_text(hidden: int, layers: int, heads: int, act: str, projection: bool = False):
    """A CLIP text encoder of the given size, random weights, 77 tokens; ids 0 / 1 are the tokenizer's bos / eos."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _sd_vae(scaling_factor: float):
    """The SD / SDXL VAE architecture (128/256/512/512 channels, 8x downsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=scaling_factor)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def sd15_modules() -> dict:
    """SD 1.5 from its configs, random weights: UNet (860 M parameters), VAE (84 M), CLIP ViT-L/14 text encoder
    (123 M). The tokenizer is mmalign's small word tokenizer with the 77-token context: token ids only index the
    embedding table, so its vocabulary does not change the cost."""
    from diffusers import UNet2DConditionModel

    from mmalign.models.tiny import word_clip_tokenizer

    return dict(vae=_sd_vae(0.18215), text_encoder=_clip_text(768, 12, 12, "quick_gelu"),
                tokenizer=word_clip_tokenizer(model_max_length=77), scheduler=_scheduler(),
                unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                          block_out_channels=(320, 640, 1280, 1280)))


def sdxl_modules() -> dict:
    """SDXL base from its configs, random weights: UNet (2.6 B parameters), VAE (84 M), CLIP ViT-L/14 (123 M) and
    OpenCLIP ViT-bigG/14 with projection (695 M) text encoders."""
    from diffusers import UNet2DConditionModel

    from mmalign.models.tiny import word_clip_tokenizer

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    return dict(vae=_sd_vae(0.13025), text_encoder=_clip_text(768, 12, 12, "quick_gelu"),
                text_encoder_2=_clip_text(1280, 32, 20, "gelu", projection=True),
                tokenizer=word_clip_tokenizer(model_max_length=77),
                tokenizer_2=word_clip_tokenizer(model_max_length=77), scheduler=_scheduler(), unet=unet)


def save_pipeline(modules: dict, out_dir: str, encoder_dtype=None) -> str:
    """Save the modules as a diffusers pipeline folder; `encoder_dtype` casts the VAE and text encoders first."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if encoder_dtype is not None:
        for name in ("vae", "text_encoder", "text_encoder_2"):
            if name in modules:
                modules[name].to(encoder_dtype)

    if "text_encoder_2" in modules:
        pipe = StableDiffusionXLPipeline(**modules)
    else:
        pipe = StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def jpeg_pairs(out_dir: str, pairs: int, size: int) -> str:
    """`pairs` pair samples of photo-like JPEGs (smooth structure + texture) at `size` px, one shard."""
    import numpy as np
    from PIL import Image

    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        coarse = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((size, size),
                                                                                          Image.BICUBIC)
        img = (np.asarray(coarse, dtype=np.int16) + rng.integers(-16, 17, (size, size, 3))).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    with ShardSetWriter(out_dir, "pair") as writer:
        for i in range(pairs):
            writer.write(pair_sample(f"p{i:06d}", jpeg(), jpeg(), caption=f"a photo of thing number {i}",
                                     label_0=float(i % 2)))
    return out_dir


def bench_config(args, variant: str):
    from mmalign.config import validate_config
    from mmalign.t2i.task import T2ITrainConfig

    model = {"pretrained": args.model, "gradient_checkpointing": args.gradient_checkpointing}
    if variant == "lora":
        model["lora"] = {"rank": 8}
    return validate_config(T2ITrainConfig, {
        "model": model, "method": {"name": "dpo", "beta": 5000},
        "data": {"shards": args.shards, "resolution": args.resolution, "shuffle_buffer": 0,
                 "cache": variant != "naive"},
        "train": {"max_steps": 1, "batch_size": args.batch, "progress": False,
                  "mixed_precision": {"fp32": "no", "bf16": "bf16"}[args.dtype]},
        "optim": {"name": args.optim, "lr": 1e-6},
    }, "<benchmark>")


def flop_counts(modules: dict, resolution: int, batch: int) -> dict:
    """Forward FLOPs of one step's parts, counted on the meta device (no weights, no compute): the VAE encoding
    2 x `batch` images, the text encoder(s) on `batch` prompts, and the UNet on the 2 x `batch` latents."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with FlopCounterMode(display=False) as mode:
            fn()
        return mode.get_total_flops()

    n = 2 * batch
    pixels = torch.empty(n, 3, resolution, resolution, device="meta")
    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    unet = modules["unet"]
    cross = unet.config.cross_attention_dim
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(n, 1280, device="meta"),
                                       "time_ids": torch.empty(n, 6, device="meta")}
    latents = torch.empty(n, 4, resolution // 8, resolution // 8, device="meta")
    text = count(lambda: modules["text_encoder"](ids))
    if "text_encoder_2" in modules:
        text += count(lambda: modules["text_encoder_2"](ids, output_hidden_states=True))
    return {"vae_encode": count(lambda: modules["vae"].encode(pixels).latent_dist.sample()), "text": text,
            "unet_forward": count(lambda: unet(latents, torch.zeros(n, dtype=torch.long, device="meta"),
                                               torch.empty(n, 77, cross, device="meta"), **kwargs))}


def print_flops(args) -> None:
    """`--flops`: what caching removes from a step, by FLOPs. The step's UNet work is a policy forward, its
    recomputation under gradient checkpointing, a backward of about twice the forward, and the reference forward:
    5 UNet forwards (4 without checkpointing)."""
    import torch

    with torch.device("meta"):
        modules = sdxl_modules() if args.sdxl_full else sd15_modules()
    f = flop_counts(modules, args.resolution, args.batch)
    unet = (5 if args.gradient_checkpointing else 4) * f["unet_forward"]
    encode = f["vae_encode"] + f["text"]
    name = "SDXL" if args.sdxl_full else "SD 1.5"
    print(f"{name} configs, {args.resolution} px, {args.batch} pair(s), gradient checkpointing "
          f"{args.gradient_checkpointing}: VAE encode {f['vae_encode'] / 1e12:.3f} TFLOP, text encoder(s) "
          f"{f['text'] / 1e12:.3f}, UNet forward {f['unet_forward'] / 1e12:.3f} (step's UNet work "
          f"{unet / 1e12:.3f}); cached / naive by FLOPs = {unet / (unet + encode):.3f} (optimizer not counted)")


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_variant(args) -> dict:
    import torch

    from mmalign.t2i.task import T2ITask
    from mmalign.train.trainer import build_optimizer

    import diffusers
    import peft  # noqa: F401
    import transformers

    import mmalign.data.dataset  # noqa: F401

    for name in ("UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler"):
        getattr(diffusers, name)  # diffusers and transformers import their submodules on first use
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
        getattr(transformers, name)
    base_kib = _status_kib("VmRSS")  # imports only: nothing of the run is loaded yet
    device = torch.device(args.device)
    cfg = bench_config(args, "naive" if args.variant.startswith("naive") else args.variant)
    task = T2ITask(cfg)
    task.check_inputs()
    built = task.build(device)
    unet, adapter = built.module, built.model
    if args.variant == "naive" and args.optim == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(built.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, clip_threshold=1.0,
                        scale_parameter=False, relative_step=False, warmup_init=False)
    else:
        opt, _, _ = build_optimizer(cfg, built.params, 1)
    stream = task.batches(0, 1, 0)
    batches = [next(stream) for _ in range(args.warmup + args.steps)]
    del stream
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward_backward(i):
        with autocast:
            loss, _ = T2ITask.compute_loss(cfg, adapter, unet, unet, batches[i], torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(i):
        forward_backward(i)
        opt.step()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak_from_reset = reset_peak_rss()
    flops = None
    for i in range(args.warmup):
        if i == 0:  # count the step's FLOPs once, outside the timed steps (the counter slows the step down)
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                forward_backward(i)
            flops = counter.get_total_flops()
            opt.step()
        else:
            step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / args.steps
    cpu_sec = (time.process_time() - c0) / args.steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    elif peak_from_reset:
        peak_mb = (_status_kib("VmHWM") - base_kib) / 1024
    else:  # no clear_refs: the peak of the whole process, loading included
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    trainable = sum(p.numel() for p in built.params)
    return {"variant": args.variant, "s_per_step": sec, "cpu_s_per_step": cpu_sec, "peak_mb": peak_mb,
            "flops_per_step": flops, "trainable": trainable, "load_avg": os.getloadavg()[0],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_measure": "cuda" if device.type == "cuda" else ("steps" if peak_from_reset else "process")}


def prepare(args, workdir: str) -> dict:
    """Write what the variants read into `workdir`: the pipeline (`--sd15-full` / `--sdxl-full`: built with random
    weights; else `--model` or assets/tiny/sd15), the pair shards (JPEGs at the resolution, or a copy of
    assets/tiny/pairs) and mmalign's latent + text cache of them. Sets `args.model` / `args.shards`."""
    import torch

    from mmalign.t2i.task import T2ITask

    t0 = time.perf_counter()
    if args.model is None and (args.sd15_full or args.sdxl_full):
        torch.manual_seed(0)
        with torch.device(args.device):
            modules = sdxl_modules() if args.sdxl_full else sd15_modules()
        args.model = save_pipeline(modules, os.path.join(workdir, "pipeline"),
                                   torch.bfloat16 if args.dtype == "bf16" else None)
        del modules
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif args.model is None:
        args.model = str(ROOT / "assets" / "tiny" / "sd15")
    if args.shards is None and (args.sd15_full or args.sdxl_full or args.pairs):
        n = args.pairs or (args.warmup + args.steps) * args.batch + 1
        args.shards = jpeg_pairs(os.path.join(workdir, "pairs"), n, args.resolution)
    elif args.shards is None:
        args.shards = shutil.copytree(ROOT / "assets" / "tiny" / "pairs", os.path.join(workdir, "pairs"))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    T2ITask(bench_config(args, "cached")).build_cache()  # what `mmalign train CONFIG --cache-only` runs
    return {"model": str(args.model), "shards": str(args.shards), "build_s": build_s,
            "cache_s": time.perf_counter() - t0}


def variant_command(args, variant: str) -> list[str]:
    """The command line that runs one variant in its own process (it prints one JSON line)."""
    cmd = [sys.executable, __file__, "--variant", variant, "--model", str(args.model), "--shards",
           str(args.shards), "--device", args.device, "--dtype", args.dtype, "--resolution", str(args.resolution),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--optim",
           args.optim]
    return cmd + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder; default: assets/tiny/sd15 (--sd15-full, "
                                                  "--sdxl-full: built)")
    ap.add_argument("--shards", default=None, help="pair shard folder; default: a copy of assets/tiny/pairs (the "
                                                   "cache is written next to the shards)")
    ap.add_argument("--sd15-full", action="store_true", help="the SD 1.5 UNet, VAE and text encoder configs, "
                                                              "random weights, JPEG pairs at --resolution")
    ap.add_argument("--sdxl-full", action="store_true", help="the SDXL UNet, VAE and both text encoder configs, "
                                                              "random weights, JPEG pairs at --resolution")
    ap.add_argument("--pairs", type=int, default=None, help="JPEG pairs written at --resolution (default with "
                                                            "--sd15-full / --sdxl-full: (warmup + steps) x batch + "
                                                            "1; else a copy of assets/tiny/pairs)")
    ap.add_argument("--optim", default="adamw", choices=["adamw", "adafactor"],
                    help="mmalign's optimizer for every variant (the SDXL recipes use Adafactor)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--flops", action="store_true", help="with --sd15-full or --sdxl-full: print the forward FLOPs "
                                                          "of the step's parts (meta device, nothing runs) and exit")
    ap.add_argument("--prepare", metavar="DIR", help="only write the model, pairs and cache into DIR and print "
                                                     "them as JSON (then run --variant on them)")
    ap.add_argument("--variant", choices=["naive", "naive-mmalign-optim", "cached", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sd15_full and args.sdxl_full:
        ap.error("--sd15-full and --sdxl-full exclude each other")
    if args.flops:
        if not (args.sd15_full or args.sdxl_full):
            ap.error("--flops needs --sd15-full or --sdxl-full")
        print_flops(args)
        return
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return
    if args.prepare:
        os.makedirs(args.prepare, exist_ok=True)
        print(json.dumps(prepare(args, args.prepare)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(args, tmp)
        build_s, cache_s = prepared["build_s"], prepared["cache_s"]
        rows = []
        variants = ["naive", "naive-mmalign-optim", "cached", "lora"] if args.optim == "adafactor" \
            else ["naive", "cached", "lora"]
        for variant in variants:
            t1 = time.perf_counter()
            out = subprocess.run(variant_command(args, variant), capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {variant}: {time.perf_counter() - t1:.0f} s wall in its process", file=sys.stderr)
    base, cached, lora = rows[0], rows[-2], rows[-1]
    model = "SD 1.5 configs (random)" if args.sd15_full else "SDXL configs (random)" if args.sdxl_full \
        else args.model
    print(f"model={model} device={args.device} dtype={args.dtype} res={args.resolution} pairs/step={args.batch} "
          f"warmup={args.warmup} steps={args.steps} optim={args.optim} gradient_checkpointing="
          f"{args.gradient_checkpointing} (models and data built in {build_s:.0f} s, cache in {cache_s:.0f} s, "
          f"neither timed below; peak memory: {rows[0]['peak_measure']})")
    # CPU seconds (this process, all its threads) hardly change with other jobs' load; wall seconds do.
    print(f"{'variant':<19} {'s/step':>9} {'x naive':>8} {'CPU s':>9} {'x naive':>8} {'peak MB':>9} {'x naive':>8} "
          f"{'x cached':>9} {'trainable':>12} {'load':>5}")
    for r in rows:
        print(f"{r['variant']:<19} {r['s_per_step']:>9.4f} {r['s_per_step'] / base['s_per_step']:>8.2f} "
              f"{r['cpu_s_per_step']:>9.3f} {r['cpu_s_per_step'] / base['cpu_s_per_step']:>8.2f} "
              f"{r['peak_mb']:>9.1f} {r['peak_mb'] / base['peak_mb']:>8.2f} {r['peak_mb'] / cached['peak_mb']:>9.2f} "
              f"{r['trainable']:>12,d} {r['load_avg']:>5.1f}")
    time_ok = cached["s_per_step"] <= 0.7 * base["s_per_step"]  # the target is about wall time
    mem_ok = lora["peak_mb"] <= 0.6 * cached["peak_mb"]
    print(f"targets: (b) <= 0.7x the time of (a): {'met' if time_ok else 'NOT met'}; (c) <= 0.6x the peak memory of "
          f"the full fine-tune with a reference copy (b): {'met' if mem_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
