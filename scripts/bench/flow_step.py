r"""Benchmark: seconds per Flow-DPO step and peak memory of a Wan text-to-video model, three ways, in one run.

  (a) naive  : the VAE and the text encoder run in every step (clips decoded before timing), a full fine-tune with a
               frozen reference copy of the transformer
  (b) cached : latents and text embeddings read from mmalign's latent cache (`mmalign train CONFIG --cache-only`,
               built here once, before timing), full fine-tune, reference copy; the VAE and text encoder stay off
               the device
  (c) lora   : cached inputs, LoRA on the attention projections, the reference is the same transformer with its
               adapters disabled (no second copy)

Two configurations, each with the three variants (ratios are against (a) of the same configuration, same run):

  tiny        `assets/tiny/wan` (the tiny recipe's pipeline: 2 layers of width 24, the Wan VAE at width 8, a 1-layer
              UMT5 of width 16) on the shipped toy video pairs: 9 frames at 32 px, 2 pairs per step, LoRA rank 4
  wan-shaped  Wan-2.1-T2V-1.3B's shapes with random weights (nothing is downloaded): transformer width 1536, 12 heads
              x 128, ffn 8960, text_dim 4096, patch (1, 2, 2), `--layers` of its 30 layers; the Wan 2.1 VAE at its
              real size (`AutoencoderKLWan()`, 127 M parameters); UMT5-XXL's layer shape (d_model 4096, 64 heads,
              d_ff 10240, gated GELU, 226 tokens) for `--text-layers` of its 24 layers, over a small word vocabulary
              (token ids only index the embedding table); the UniPC flow scheduler Wan ships. Clips: `--num-frames`
              at `--resolution` px (square crops, as the task trains), random smooth video in H.264. LoRA rank 32,
              alpha 64 (the published recipe's, `configs/flow/wan21_t2v_1.3b_flow_dpo_lora.yaml`). On a CPU the
              defaults (2 layers, 1 text layer, 9 frames at 64 px, 1 pair per step) keep a step at seconds; the
              real model is `--layers 30 --text-layers 24 --num-frames 33 --resolution 480` (what
              `scripts/bench/gpu_suite.py`'s wan row runs on a GPU in bf16).

Every variant is mmalign's own flow task (`mmalign.flow.task.FlowTask`): its batches, its `compute_loss` and
backward, and mmalign's AdamW (`build_optimizer`); batches are read before timing, so the numbers compare the steps,
not the video decoding. Each variant runs in its own subprocess, so its peak memory is its own. Peak memory: CUDA
`torch.cuda.max_memory_allocated` over the steps; CPU the peak resident set (VmHWM, reset once the models are loaded)
minus the resident size after the imports (as `scripts/bench/t2i_step.py` measures it): the models, reference,
optimizer state and activations. On a CPU the VAE and text encoder of (b) and (c) stay loaded in the same memory
(on a GPU they stay off the device), so CPU peaks overstate what caching saves there. The first warm-up step's
forward and backward FLOPs are counted (`FlopCounterMode`) for the GPU suite's MFU.

    python scripts/bench/flow_step.py --out runs/flow_bench        # both configurations on the CPU
    python scripts/bench/flow_step.py --configs tiny --steps 1 --warmup 1   # the smoke run (tests)
    python scripts/bench/flow_step.py --configs wan-shaped --device cuda --dtype bf16 --layers 30 \
        --text-layers 24 --num-frames 33 --resolution 480 --gradient-checkpointing   # the real sizes on a GPU

`--out DIR` writes `flow_step.json` (every variant's numbers) and `flow_step.md` (the table). `--prepare DIR` with
one `--configs` only writes the pipeline, the pairs and the cache into DIR and prints them as JSON; `--variant` (with
`--model` and `--shards` from it) then runs one variant and prints its JSON line: how `gpu_suite.py` runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # t2i_step: the CPU peak-memory helpers

import t2i_step  # noqa: E402

CONFIGS = ("tiny", "wan-shaped")
VARIANTS = (("naive", "(a) naive: VAE + text encoder every step, reference copy"),
            ("cached", "(b) cached latents + text, reference copy"),
            ("lora", "(c) LoRA, cached, reference = disabled adapters"))
# Wan-2.1-T2V-1.3B's transformer (its config.json) and UMT5-XXL's layer shape.
WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128)
WORDS = ("a", "red", "blue", "green", "cat", "dog", "car", "running", "jumping", "slowly", "on", "the", "beach",
         "street", "video", "of", "at", "night", "sunny", "day")


def settings(config: str, args) -> dict:
    """Sizes of one configuration: the tiny recipe's, or the Wan-shaped ones from the command line."""
    if config == "tiny":
        return dict(config=config, model=str(ROOT / "assets" / "tiny" / "wan"), resolution=32, num_frames=9,
                    batch=2, lora_rank=4, layers=None, text_layers=None)
    return dict(config=config, model=None, resolution=args.resolution, num_frames=args.num_frames, batch=args.batch,
                lora_rank=32, layers=args.layers, text_layers=args.text_layers)


def describe(s: dict) -> str:
    if s["config"] == "tiny":
        return "tiny Wan (assets/tiny/wan), 9 frames at 32 px, 2 pairs/step, LoRA r 4"
    size = "the real 1.3B" if (s["layers"], s["text_layers"]) == (30, 24) else "CPU-sized"
    return (f"Wan-2.1-1.3B-shaped, random weights ({size}: {s['layers']} of 30 transformer layers, "
            f"{s['text_layers']} of 24 UMT5-XXL layers, full-size VAE), {s['num_frames']} frames at "
            f"{s['resolution']} px, {s['batch']} pair(s)/step, LoRA r 32")


# -- building the Wan-shaped pipeline and its pairs ----------------------------------------------------------------
def wan_shaped_modules(layers: int, text_layers: int) -> dict:
    """WanPipeline components of Wan-2.1-T2V-1.3B's shapes with random weights (see the module docstring)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from mmalign.models.tiny import word_clip_tokenizer

    tokenizer = word_clip_tokenizer(WORDS, model_max_length=226)
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **{**UMT5_XXL, "num_layers": text_layers},
                                       pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    return dict(tokenizer=tokenizer, text_encoder=text, vae=AutoencoderKLWan(),
                scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0),
                transformer=WanTransformer3DModel(**{**WAN_13B, "num_layers": layers}))


def save_pipeline(modules: dict, out_dir: str, encoder_dtype=None) -> str:
    """Save as a WanPipeline folder; `encoder_dtype` casts the VAE and text encoder first (the transformer stays
    float32: the policy's master weights)."""
    from diffusers import WanPipeline

    if encoder_dtype is not None:
        for name in ("vae", "text_encoder"):
            modules[name].to(encoder_dtype)
    WanPipeline(**modules).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def video_pairs(out_dir: str, pairs: int, frames: int, size: int) -> str:
    """`pairs` video_pair samples of random smooth clips (coarse colour fields drifting over time, plus texture) in
    H.264 at `size` px, every pair decided (no ties), one shard."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmalign.data.schemas import video_pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.video_annotator import encode_mp4

    rng = np.random.default_rng(0)

    def clip() -> bytes:
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 2, 6, 6)).astype(np.float32))
        x = F.interpolate(coarse, size=(frames, size, size), mode="trilinear", align_corners=True)[0]
        x = x.permute(1, 2, 3, 0).numpy() + rng.integers(-16, 17, (frames, size, size, 3))
        return encode_mp4(x.clip(0, 255).astype(np.uint8), fps=16.0, codec="h264")

    with ShardSetWriter(out_dir, "video_pair") as writer:
        for i in range(pairs):
            prompt = " ".join(rng.choice(WORDS, 8))
            labels = {"VQ": "A", "MQ": "A", "TA": "B"} if i % 2 else {"VQ": "B", "MQ": "same", "TA": "B"}
            writer.write(video_pair_sample(f"v{i:06d}", clip(), clip(), prompt=prompt, labels=labels, fps_a=16.0,
                                           fps_b=16.0, num_frames_a=frames, num_frames_b=frames))
    return out_dir


# -- one variant (child process) -----------------------------------------------------------------------------------
def bench_config(args, variant: str):
    from mmalign.config import validate_config
    from mmalign.flow.task import FlowTrainConfig

    model = {"pretrained": args.model, "gradient_checkpointing": args.gradient_checkpointing}
    if variant == "lora":
        model["lora"] = {"rank": args.lora_rank, "alpha": 2 * args.lora_rank}
    return validate_config(FlowTrainConfig, {
        "task": "flow", "model": model, "method": {"name": "flow_dpo", "beta": 100.0},
        "data": {"shards": args.shards, "resolution": args.resolution, "num_frames": args.num_frames,
                 "shuffle_buffer": 0, "cache": variant != "naive"},
        "train": {"max_steps": 1, "batch_size": args.batch, "progress": False,
                  "mixed_precision": {"fp32": "no", "bf16": "bf16"}[args.dtype]},
        "optim": {"name": "adamw", "lr": 1e-6},
    }, "<benchmark>")


def run_variant(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import diffusers
    import peft  # noqa: F401
    import transformers

    import mmalign.data.dataset  # noqa: F401
    from mmalign.flow.task import FlowTask
    from mmalign.train.trainer import build_optimizer

    for name in ("WanTransformer3DModel", "AutoencoderKLWan", "WanPipeline"):
        getattr(diffusers, name)  # diffusers and transformers import their submodules on first use
    for name in ("UMT5EncoderModel", "CLIPTokenizer"):
        getattr(transformers, name)
    base_kib = t2i_step._status_kib("VmRSS")  # imports only: nothing of the run is loaded yet
    device = torch.device(args.device)
    cfg = bench_config(args, args.variant)
    task = FlowTask(cfg)
    task.check_inputs()
    built = task.build(device)
    transformer, adapter = built.module, built.model
    opt, _, _ = build_optimizer(cfg, built.params, 1)
    batches, stream = [], task.batches(0, 1, 0)
    while len(batches) < args.warmup + args.steps:  # decided pairs only, as the training loop keeps them
        batch = next(stream)
        if task.skip_reason(batch) is None:
            batches.append(batch)
    del stream
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward_backward(i):
        with autocast:
            loss, _ = FlowTask.compute_loss(cfg, adapter, transformer, transformer, batches[i],
                                            torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak_from_reset = t2i_step.reset_peak_rss()
    counter = FlopCounterMode(display=False)
    with counter:  # the step's FLOPs, once, outside the timed steps (the counter slows the step down)
        forward_backward(0)
    flops = counter.get_total_flops()
    with_grad = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in built.params)
    if with_grad == 0:
        raise SystemExit(f"{args.variant}: no trainable parameter got a gradient: the step does not train")
    opt.step()
    for i in range(1, args.warmup):
        forward_backward(i)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = forward_backward(i)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / args.steps
    cpu_sec = (time.process_time() - c0) / args.steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    elif peak_from_reset:
        peak_mb = (t2i_step._status_kib("VmHWM") - base_kib) / 1024
    else:  # no clear_refs: the peak of the whole process, loading included
        import resource

        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    return {"config": args.config, "variant": args.variant, "s_per_step": sec, "cpu_s_per_step": cpu_sec,
            "peak_mb": peak_mb, "flops_per_step": flops, "loss": float(loss),
            "trainable": sum(p.numel() for p in built.params), "params_with_grad": with_grad,
            "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
            "load_avg": os.getloadavg()[0],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_measure": "cuda" if device.type == "cuda" else ("steps" if peak_from_reset else "process")}


# -- preparing a configuration and running its variants ------------------------------------------------------------
def prepare(args, workdir: str) -> dict:
    """Write what the variants read into `workdir`: the pipeline (wan-shaped: built with random weights on
    `--device`; tiny: assets/tiny/wan as it is), the pairs (wan-shaped: random clips; tiny: a copy of the toy video
    pairs) and mmalign's latent cache of them. Sets `args.model` / `args.shards`."""
    import torch

    from mmalign.flow.task import FlowTask

    t0 = time.perf_counter()
    if args.config == "tiny":
        args.model = args.model or str(ROOT / "assets" / "tiny" / "wan")
        args.shards = args.shards or shutil.copytree(ROOT / "assets" / "tiny" / "video_pairs",
                                                     os.path.join(workdir, "pairs"))
    else:
        if args.model is None:
            torch.manual_seed(0)
            with torch.device(args.device):
                modules = wan_shaped_modules(args.layers, args.text_layers)
            args.model = save_pipeline(modules, os.path.join(workdir, "pipeline"),
                                       torch.bfloat16 if args.dtype == "bf16" else None)
            del modules
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.shards is None:
            n = (args.warmup + args.steps) * args.batch + 1
            args.shards = video_pairs(os.path.join(workdir, "pairs"), n, args.num_frames, args.resolution)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    FlowTask(bench_config(args, "cached")).build_cache()  # what `mmalign train CONFIG --cache-only` runs
    return {"model": str(args.model), "shards": str(args.shards), "build_s": build_s,
            "cache_s": time.perf_counter() - t0}


def variant_command(args, variant: str) -> list[str]:
    """The command line that runs one variant in its own process (it prints one JSON line)."""
    cmd = [sys.executable, __file__, "--variant", variant, "--configs", args.config, "--model", str(args.model),
           "--shards", str(args.shards), "--device", args.device, "--dtype", args.dtype, "--resolution",
           str(args.resolution), "--num-frames", str(args.num_frames), "--batch", str(args.batch), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--lora-rank", str(args.lora_rank)]
    return cmd + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def run_config(args, config: str) -> dict:
    """Prepare one configuration in a temporary folder and run its three variants; ratios against (a)."""
    s = argparse.Namespace(**{**vars(args), **settings(config, args)})
    if args.lora_rank is not None:
        s.lora_rank = args.lora_rank
    with tempfile.TemporaryDirectory(prefix="mmalign-flow-bench-") as tmp:
        prepared = prepare(s, tmp)
        rows = []
        for variant, _ in VARIANTS:
            t0 = time.perf_counter()
            out = subprocess.run(variant_command(s, variant), capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{config} / {variant} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {config} / {variant}: {time.perf_counter() - t0:.0f} s wall in its process", file=sys.stderr)
    base = rows[0]
    for r in rows:
        r["x_naive_time"] = r["s_per_step"] / base["s_per_step"]
        r["x_naive_peak"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
    return {"config": config, "description": describe(vars(s)), "prepare": prepared, "variants": rows}


def table(results: list[dict], args) -> str:
    lines = [f"Flow-DPO step, device {args.device}, {args.dtype}, warmup {args.warmup}, {args.steps} timed steps, "
             f"AdamW, gradient checkpointing {args.gradient_checkpointing}; peak = "
             f"{'max allocated' if args.device.startswith('cuda') else 'resident set over the steps minus imports'}"
             "; ratios against (a) of the same configuration, same run", ""]
    for res in results:
        lines += [f"**{res['config']}**: {res['description']} (models and data built in "
                  f"{res['prepare']['build_s']:.0f} s, cache in {res['prepare']['cache_s']:.1f} s, neither timed)", "",
                  "| variant | s/step | x naive | CPU s/step | peak MB | x naive | trainable | GFLOP/step | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (v, label), r in zip(VARIANTS, res["variants"]):
            peak_ratio = f"{r['x_naive_peak']:.2f}" if r["x_naive_peak"] is not None else "n/a"
            lines.append(f"| {label} | {r['s_per_step']:.3f} | {r['x_naive_time']:.2f} | {r['cpu_s_per_step']:.3f} | "
                         f"{r['peak_mb']:.0f} | {peak_ratio} | {r['trainable']:,d} | "
                         f"{r['flops_per_step'] / 1e9:.3g} | {r['load_avg']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--layers", type=int, default=2, help="wan-shaped: transformer layers (the 1.3B has 30)")
    ap.add_argument("--text-layers", type=int, default=1, help="wan-shaped: UMT5-XXL-shaped layers (it has 24)")
    ap.add_argument("--num-frames", type=int, default=9, help="wan-shaped: frames per clip (4k + 1)")
    ap.add_argument("--resolution", type=int, default=64, help="wan-shaped: square clip size (a multiple of 16)")
    ap.add_argument("--batch", type=int, default=1, help="wan-shaped: pairs per step")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: tiny 4, wan-shaped 32)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps (the first one's FLOPs are counted)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", help="write flow_step.json and flow_step.md here")
    ap.add_argument("--prepare", metavar="DIR", help="with one --configs: only write the model, pairs and cache into "
                                                     "DIR and print them as JSON (then run --variant on them)")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=[v for v, _ in VARIANTS], help=argparse.SUPPRESS)
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if any(c not in CONFIGS for c in configs):
        ap.error(f"--configs: valid are {', '.join(CONFIGS)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1 (the first warm-up step counts the FLOPs)")
    if args.variant or args.prepare:
        if len(configs) != 1:
            ap.error("--variant and --prepare take one configuration (--configs tiny or --configs wan-shaped)")
        args.config = configs[0]
        if args.variant:  # child process: the sizes come on the command line
            args.lora_rank = args.lora_rank or settings(args.config, args)["lora_rank"]
            print(json.dumps(run_variant(args)))
            return
        s = argparse.Namespace(**{**vars(args), **settings(args.config, args)})
        s.lora_rank = args.lora_rank or s.lora_rank
        os.makedirs(args.prepare, exist_ok=True)
        print(json.dumps({**prepare(s, args.prepare), **{k: getattr(s, k) for k in (
            "resolution", "num_frames", "batch", "lora_rank")}}))
        return
    results = [run_config(args, c) for c in configs]
    text = table(results, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "flow_step.md").write_text(text)
        (out / "flow_step.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1,
                                                       default=str) + "\n")


if __name__ == "__main__":
    main()
