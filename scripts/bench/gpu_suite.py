r"""The prepared GPU benchmark suite (`scripts/bench/gpu.sh` runs it): one table, random weights, no downloads.

Rows, each job in its own process under its own time limit (a failing or out-of-memory job prints
`failed: <reason>` in its cells and the others still run), all inside one deadline (`--deadline-min`, default 11.5;
a job that no longer fits is `skipped`, saying so):

- SDXL at 1024 px and SD 1.5 at 512 px, Diffusion-DPO, 1 pair per step, bf16 autocast over float32 weights,
  gradient checkpointing, Adafactor (the SDXL recipes' optimizer), through `scripts/bench/t2i_step.py`:
  (a) the reference scripts' naive step (VAE + text encoders every step, a reference UNet copy, transformers'
  Adafactor), (b) mmalign's cached latents + text embeddings (reference copy, mmalign's Adafactor), (c) LoRA
  (rank 8) from the cache, the reference being the same UNet with its adapters disabled. The pipeline is built
  from the published configs with random weights on the device, saved (to /dev/shm when it has room), cached
  once, and each variant loads it through mmalign's T2I task in a fresh process.
- Wan-2.1-T2V-1.3B, Flow-DPO on 1 pair of 33-frame clips at 480 px (square crops, as the flow task trains), bf16
  autocast over float32 weights, gradient checkpointing, AdamW, through `scripts/bench/flow_step.py`: (a) naive
  (the VAE and UMT5 text encoder every step, a reference transformer copy), (b) mmalign's latent cache (reference
  copy), (c) LoRA rank 32 from the cache (the published recipe's), the reference being the disabled adapters. The
  pipeline is built with the published shapes and random weights on the device (transformer 1536 x 30 layers, the
  Wan 2.1 VAE, UMT5-XXL's 24 layers over a small vocabulary), saved, cached once, and each variant loads it through
  mmalign's flow task in a fresh process. Run last: `--rows wan` runs it alone.
- HPS-sized scoring: the CLIP `mmalign.rewards.hpsv2.hps` builds (open_clip ViT-H-14 as a transformers
  `CLIPModel`: vision 32 layers x 1280 at 224 px, text 24 x 1024, projection 1024; letterbox preprocessing; raw
  cosine) wrapped in mmalign's `CLIPScorer`, random weights, bf16: images/s scoring batches of `--hps-batch`
  (each distinct prompt encoded once) against one image at a time (its prompt re-encoded each time, as the
  reference HPSv2 package scores). The images are PIL images already at 224 px, so the numbers are the scorer's,
  not JPEG decoding or resizing (which a data loader's workers do).
- VLM DPO: a LLaVA-1.5-7B-shaped model (Llama 4096 x 32 layers, 32 heads, MLP 11008, vocabulary 32064; CLIP
  ViT-L/14-336 tower, 576 image tokens) built with random bf16 weights on the device, saved with its processor and
  loaded by mmalign's VLM task (`VLMTask.build`: `load_vlm`, LoRA rank 128 on the language model, the projector a
  trainable copy, reference = the disabled adapters, gradient checkpointing); DPO on `--vlm-batch` pairs of one
  336 px image, a short prompt and `--vlm-response-words`-word answers; mmalign's AdamW.
- Reward guidance (`scripts/bench/guide.py`): SD 1.5 from its published configs at 512 px, random bf16 weights,
  20 DDIM steps, 4 images: s/image of unguided sampling, noisy-latent reward guidance, and pixel-reward guidance
  (VAE decode + a ViT-L/14-sized CLIP scorer's backward) with the prediction held fixed or the exact gradient
  through the UNet; ratio = cost against unguided.

Measures. s/step: wall time of `--steps` steps after `--warmup` (torch.cuda.synchronize around the timed loop).
Peak GB: torch.cuda.max_memory_allocated over the warm-up and timed steps, reset after the models are loaded
(CPU: the peak resident set over the steps minus the process's size after its imports). TFLOP: what
`torch.utils.flop_counter.FlopCounterMode` counts in one step's forward and backward (matmuls, convolutions,
attention, including gradient checkpointing's recomputation; the optimizer is not counted), or in scoring one
image. MFU = counted FLOPs / (seconds x peak): the peak is dense bf16 from `PEAK_BF16_TFLOPS` by device name
(H100 / H200 SXM: 989 TFLOP/s), `--peak-tflops` overrides it, and an unknown device (or the CPU of `--tiny`) uses
the throughput of a large matmul measured at the start, named as such in the table's header.

    bash scripts/bench/gpu.sh --out runs/gpu_bench          # one H100 / H200, under 8 minutes
    bash scripts/bench/gpu.sh --rows vlm,hps                # only some rows
    bash scripts/bench/gpu.sh --tiny                        # the same rows with tiny models on the CPU (the test)

`--out DIR` writes `gpu_bench.md` (the table), `gpu_bench.json` (raw numbers) and `logs/<job>.log` (each job's
output, where a failure's traceback is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # t2i_step, flow_step: the T2I and flow variants, the CPU peak-memory helpers

import flow_step  # noqa: E402
import t2i_step  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4), ("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
    ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
    ("L40", 181.0), ("L4", 121.0),
)
ROWS = ("sdxl", "sd15", "wan", "hps", "vlm", "guide")  # the table's order
# What a tight deadline should keep: the rows no CPU run can stand for; wan, added last, runs after the others so
# they keep the time they had.
RUN_ORDER = ("sdxl", "vlm", "guide", "hps", "sd15", "wan")
T2I_VARIANTS = (("naive", "(a) naive: VAE + text encoders every step, reference copy, transformers' Adafactor"),
                ("cached", "(b) cached latents + text, reference copy, mmalign's Adafactor"),
                ("lora", "(c) LoRA r 8, cached, reference = disabled adapters"))


# -- sizes ---------------------------------------------------------------------------------------------------------
def t2i_settings(row: str, tiny: bool, device: str) -> dict:
    """t2i_step.py's arguments for a T2I row: the published configs on the device, or the tiny pipelines on CPU."""
    common = dict(device=device, optim="adafactor", gradient_checkpointing=True, pairs=None, sd15_full=False,
                  sdxl_full=False, model=None, shards=None)
    if tiny:
        return {**common, "model": str(ROOT / "assets" / "tiny" / row), "dtype": "fp32", "resolution": 32,
                "batch": 2, "warmup": 1, "steps": 1, "pairs": 5}
    return {**common, "sdxl_full": row == "sdxl", "sd15_full": row == "sd15", "dtype": "bf16",
            "resolution": 1024 if row == "sdxl" else 512, "batch": 1, "warmup": 2, "steps": 3}


def flow_settings(tiny: bool, device: str) -> dict:
    """flow_step.py's arguments for the wan row: Wan-2.1-1.3B's shapes (random weights) at 33 frames x 480 px on the
    device, or the tiny Wan recipe's pipeline and toy video pairs on the CPU."""
    common = dict(device=device, gradient_checkpointing=True, model=None, shards=None)
    if tiny:
        return {**common, "config": "tiny", "dtype": "fp32", "layers": 2, "text_layers": 1, "num_frames": 9,
                "resolution": 32, "batch": 2, "warmup": 1, "steps": 1}
    return {**common, "config": "wan-shaped", "dtype": "bf16", "layers": 30, "text_layers": 24, "num_frames": 33,
            "resolution": 480, "batch": 1, "warmup": 2, "steps": 3}


def hps_sizes(tiny: bool) -> dict:
    """The open_clip model config of the HPS scorer (ViT-H-14) or a tiny one of the same layout."""
    from mmalign.rewards.hpsv2 import VIT_H_14

    if not tiny:
        return VIT_H_14
    return {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                            "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


LLAVA_15_7B = dict(image_size=336, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                   text_width=4096, text_layers=32, text_heads=32, text_mlp=11008, vocab_size=32064)
LLAVA_TINY = dict(image_size=32, patch_size=4, vision_width=64, vision_layers=2, vision_heads=4, text_width=128,
                  text_layers=2, text_heads=4, text_mlp=256, vocab_size=512)


# -- device helpers ------------------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory from `start()` on, in GB: CUDA's max allocated bytes, or on CPU the peak resident set minus the
    process's size at construction (after its imports), as t2i_step.py measures it."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.base_kib = 0 if self.cuda else t2i_step._status_kib("VmRSS")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            t2i_step.reset_peak_rss()

    def gb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return (t2i_step._status_kib("VmHWM") - self.base_kib) / 2**20


def count_flops(fn) -> int:
    """FLOPs `fn()` runs, as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device: str, override: float | None) -> tuple[float, str]:
    """(peak FLOP/s in TFLOP/s, where it comes from): the override, the data-sheet table, or a measured matmul."""
    import torch

    if override:
        return override, "--peak-tflops"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"{name}: dense bf16 data-sheet peak"
        n, dtype, what = 8192, torch.bfloat16, f"{name}: not in the table, measured bf16 matmul"
    else:
        n, dtype, what = 1024, torch.float32, "CPU: measured float32 matmul"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    del a, b
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the jobs, not this process, should hold the device's memory
    return 2 * n**3 / best / 1e12, what


# -- the HPS row (child process) -----------------------------------------------------------------------------------
def run_hps(args) -> dict:
    """Images/s of the HPS-sized CLIPScorer: batches of `--hps-batch` against one image at a time."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPModel

    from mmalign.rewards.clip import CLIPScorer
    from mmalign.rewards.hpsv2 import open_clip_config_to_hf
    from mmalign.rewards.preprocess import ImagePreprocess
    from mmalign.rewards.tiny import tiny_clip_tokenizer
    from mmalign.toy import all_prompts

    memory = PeakMemory(args.device)
    cfg = hps_sizes(args.tiny)
    size = cfg["vision_cfg"]["image_size"]
    tok = tiny_clip_tokenizer(model_max_length=cfg["text_cfg"]["context_length"])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CLIPModel(open_clip_config_to_hf(cfg, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                                 pad_token_id=tok.pad_token_id))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    scorer = CLIPScorer(model.to(dtype), tok, ImagePreprocess(mode="letterbox", size=size), "cosine", name="hps",
                        max_length=cfg["text_cfg"]["context_length"])
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    n, batch, k = args.hps_images, args.hps_batch, 4
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = [all_prompts()[i // k % len(all_prompts())] for i in range(n)]
    n_single = min(n, args.hps_single_images)

    def batched() -> torch.Tensor:
        return torch.cat([scorer.score(images[i:i + batch], prompts[i:i + batch]) for i in range(0, n, batch)])

    def one_at_a_time() -> torch.Tensor:
        return torch.cat([scorer.score([im], [p]) for im, p in zip(images[:n_single], prompts[:n_single])])

    results = {}
    with torch.inference_mode():
        single = one_at_a_time()  # warm-up, and both ways must score alike
        diff = (batched()[:n_single] - single).abs().max().item()
        if dtype == torch.float32 and diff > 1e-4:
            raise SystemExit(f"batched and one-at-a-time scores differ by {diff:.2e}: they are not the same work")
        flops = {"batched": count_flops(lambda: scorer.score(images[:batch], prompts[:batch])) / batch,
                 "one": count_flops(lambda: scorer.score(images[:1], prompts[:1]))}
        for name, fn, count in (("one", one_at_a_time, n_single), ("batched", batched, n)):
            memory.start()
            best = float("inf")
            for _ in range(args.hps_repeats):
                sync(args.device)
                start = time.perf_counter()
                fn()
                sync(args.device)
                best = min(best, time.perf_counter() - start)
            results[name] = {"images_per_s": count / best, "images": count, "peak_gb": memory.gb(),
                             "flops_per_image": flops[name]}
    return {"build_s": build_s, "max_abs_diff": diff, "batch": batch, "images_per_prompt": k, **results,
            "parameters": sum(p.numel() for p in model.parameters())}


# -- the VLM row (child process) -----------------------------------------------------------------------------------
def build_llava(out_dir: str, sizes: dict, device: str, dtype) -> str:
    """A LLaVA-1.5-style model of `sizes` (random weights drawn on `device` in `dtype`) and its processor, saved
    with `save_pretrained` for `load_vlm`. The tokenizer is mmalign's in-code byte-level BPE: token ids only index
    the embedding table, so its small vocabulary does not change the cost."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from mmalign.vlm.tiny import LLAVA_CHAT_TEMPLATE, LLAVA_SPECIAL, bpe_tokenizer

    s = sizes
    tok = bpe_tokenizer(LLAVA_SPECIAL, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.padding_side = "left"
    vision = CLIPVisionConfig(hidden_size=s["vision_width"], intermediate_size=4 * s["vision_width"],
                              num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                              image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=768)
    text = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["text_width"], intermediate_size=s["text_mlp"],
                       num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                       num_key_value_heads=s["text_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=(s["image_size"] // s["patch_size"]) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # draw the weights in the training dtype: half the memory and time of float32
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": s["image_size"]}, crop_size={"height": s["image_size"], "width": s["image_size"]}),
        tokenizer=tok, patch_size=s["patch_size"], vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def vlm_batches(n: int, pairs: int, image_size: int, words: int, seed: int = 0) -> list[dict]:
    """`n` batches in `collate_vlm_pairs`' layout: `pairs` samples of one random image, a one-line prompt and
    chosen / rejected answers of `words` toy words (one token each)."""
    import numpy as np
    from PIL import Image

    from mmalign.vlm.tiny import TOY_CORPUS

    vocab = sorted({w for line in TOY_CORPUS for w in line.split()})
    rng = np.random.default_rng(seed)

    def answer() -> str:
        return " ".join(rng.choice(vocab, words))

    out = []
    for b in range(n):
        keys = [f"b{b}s{i}" for i in range(pairs)]
        out.append({"keys": keys, "prompts": ["describe the image in detail"] * pairs,
                    "images": [[Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))]
                               for _ in keys],
                    "rejected_images": [[] for _ in keys], "chosen": [answer() for _ in keys],
                    "rejected": [answer() for _ in keys], "provenance": [""] * pairs, "shards": [""] * pairs})
    return out


def run_vlm(args) -> dict:
    """s/step and peak memory of a DPO + LoRA step of the LLaVA-1.5-7B-shaped model through mmalign's VLM task."""
    import torch

    from mmalign.config import validate_config
    from mmalign.train.trainer import build_optimizer
    from mmalign.vlm.task import VLMTask, VLMTrainConfig

    memory = PeakMemory(args.device)
    sizes = LLAVA_TINY if args.tiny else LLAVA_15_7B
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    t0 = time.perf_counter()
    build_llava(os.path.join(args.workdir, "llava"), sizes, args.device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cfg = validate_config(VLMTrainConfig, {
        "model": {"pretrained": os.path.join(args.workdir, "llava"),
                  "dtype": {"bf16": "bfloat16", "fp32": "float32"}[args.dtype], "lora": {},
                  "gradient_checkpointing": True},
        "method": {"name": "dpo", "beta": 0.1},
        "data": {"shards": "(none: the benchmark builds its batches in memory)"},
        "train": {"max_steps": 1, "batch_size": args.vlm_batch, "progress": False},
        "optim": {"name": "adamw", "lr": 1e-6},
    }, "<benchmark>")
    task = VLMTask(cfg)
    built = task.build(device)
    opt, _, _ = build_optimizer(cfg, built.params, 1)
    load_s = time.perf_counter() - t0
    batches = vlm_batches(args.warmup + args.steps, args.vlm_batch, sizes["image_size"], args.vlm_response_words)

    def forward_backward(i):
        loss, _ = VLMTask.compute_loss(cfg, built.model, built.module, built.module, batches[i],
                                       torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    memory.start()
    flops = count_flops(lambda: forward_backward(0))
    with_grad = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in built.params)
    if with_grad == 0:
        raise SystemExit("no trainable parameter got a gradient: the step does not train")
    opt.step()
    for i in range(1, args.warmup):
        forward_backward(i)
        opt.step()
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = forward_backward(i)
        opt.step()
    sync(device)
    sec = (time.perf_counter() - t0) / args.steps
    inputs = built.model.encode(batches[0]["prompts"], batches[0]["images"], batches[0]["chosen"])
    return {"s_per_step": sec, "peak_gb": memory.gb(), "flops_per_step": flops, "build_s": build_s,
            "load_s": load_s, "loss": float(loss), "pairs": args.vlm_batch,
            "tokens_per_sequence": int(inputs.model_inputs["input_ids"].shape[1]),
            "trainable": sum(p.numel() for p in built.params),
            "parameters": sum(p.numel() for p in built.module.parameters()),
            "params_with_grad": with_grad}


# -- the driver ----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    row: str
    variant: str
    label: str
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    unit: str = "s/step"
    value: float | None = None
    ratio: float | None = None  # against the row's baseline: time for steps, throughput for scoring
    peak_gb: float | None = None
    flops: float | None = None  # per step (training) or per image (scoring)
    mfu: float | None = None
    extra: dict = field(default_factory=dict)


class Suite:
    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.deadline_s = args.deadline_min * 60
        self.logs = Path(args.out) / "logs" if args.out else None
        if self.logs:
            self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {msg}", file=sys.stderr, flush=True)

    def job(self, name: str, cmd: list[str], cap_s: float, min_s: float) -> tuple[dict | None, str]:
        """Run `cmd` (it prints one JSON line last) with a time limit of min(cap, time left before the deadline).
        Returns (its JSON, "") or (None, why it has none)."""
        left = self.deadline_s - self.elapsed()
        if left < min_s:
            return None, f"skipped: {max(left, 0):.0f} s left before the deadline, the job needs >= {min_s:.0f} s"
        limit = min(cap_s, left)
        self.log(f"{name}: started (limit {limit:.0f} s)")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                                cwd=ROOT, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=limit)
            why = ""
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and anything it started
            out, err = proc.communicate()
            why = f"failed: timed out after {limit:.0f} s"
        wall = time.perf_counter() - t0
        if self.logs:
            (self.logs / f"{name.replace('/', '_')}.log").write_text(
                f"$ {' '.join(cmd)}\n# exit {proc.returncode}, {wall:.1f} s\n--- stdout\n{out}\n--- stderr\n{err}")
        if not why and proc.returncode:
            why = f"failed: {last_error(err) or f'exit code {proc.returncode}'}"
        if not why:
            try:
                result = json.loads(out.strip().splitlines()[-1])
                self.log(f"{name}: done in {wall:.0f} s")
                return result, ""
            except (IndexError, json.JSONDecodeError):
                why = "failed: no JSON result on stdout"
        self.log(f"{name}: {why} ({wall:.0f} s)")
        return None, why

    def workdir(self, need_gb: float) -> str:
        """A fresh folder, in /dev/shm when it has room (writing and reading back the random weights from memory
        instead of the disk)."""
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need_gb * 1.25 * 2**30:
            return tempfile.mkdtemp(prefix="mmalign-bench-", dir=shm)
        return tempfile.mkdtemp(prefix="mmalign-bench-")

    # -- rows ------------------------------------------------------------------------------------------------------
    def t2i_row(self, row: str) -> list[Result]:
        a = self.args
        s = argparse.Namespace(**t2i_settings(row, a.tiny, a.device))
        label = {"sdxl": "SDXL", "sd15": "SD 1.5"}[row] + f" {s.resolution} px"
        results = [Result(row, v, f"{label}: {text}") for v, text in T2I_VARIANTS]
        tiny = a.tiny
        caps = (600, 600) if tiny else ((240, 150) if row == "sdxl" else (120, 90))  # prepare, each variant
        mins = (1, 1) if tiny else ((90, 45) if row == "sdxl" else (45, 30))
        work = self.workdir(14 if row == "sdxl" and not tiny else 4)
        try:
            prep_cmd = [sys.executable, str(HERE / "t2i_step.py"), "--prepare", work, "--device", s.device, "--dtype",
                        s.dtype, "--resolution", str(s.resolution), "--batch", str(s.batch), "--warmup",
                        str(s.warmup), "--steps", str(s.steps), "--optim", s.optim, "--gradient-checkpointing"]
            prep_cmd += ["--model", s.model] if s.model else ["--sdxl-full" if s.sdxl_full else "--sd15-full"]
            prep_cmd += ["--pairs", str(s.pairs)] if s.pairs else []
            prepared, why = self.job(f"{row}/prepare", prep_cmd, caps[0], mins[0])
            if prepared is None:
                for r in results:
                    fail(r, why if why.startswith("skipped") else why.replace("failed: ", "failed: prepare: ", 1))
                return results
            s.model, s.shards = prepared["model"], prepared["shards"]
            for r in results:
                out, why = self.job(f"{row}/{r.variant}", t2i_step.variant_command(s, r.variant), caps[1], mins[1])
                if out is None:
                    fail(r, why)
                    continue
                r.value, r.peak_gb, r.flops = out["s_per_step"], out["peak_mb"] / 1024, out["flops_per_step"]
                r.extra = {**out, "prepare": prepared}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        base = results[0].value
        for r in results:
            if r.value is not None and base:
                r.ratio = r.value / base
        return results

    def flow_row(self) -> list[Result]:
        """Flow-DPO steps of Wan-2.1-1.3B (`scripts/bench/flow_step.py`), three ways, as `t2i_row`."""
        a = self.args
        s = argparse.Namespace(**flow_settings(a.tiny, a.device))
        label = ("Wan-2.1-1.3B-shaped" if not a.tiny else "tiny Wan") + f" {s.resolution} px, {s.num_frames} frames"
        results = [Result("wan", v, f"{label}: {text}") for v, text in flow_step.VARIANTS]
        caps, mins = ((600, 600), (1, 1)) if a.tiny else ((300, 180), (90, 60))  # prepare, each variant
        work = self.workdir(1 if a.tiny else 20)
        try:
            prep_cmd = [sys.executable, str(HERE / "flow_step.py"), "--prepare", work, "--configs", s.config,
                        "--device", s.device, "--dtype", s.dtype, "--layers", str(s.layers), "--text-layers",
                        str(s.text_layers), "--num-frames", str(s.num_frames), "--resolution", str(s.resolution),
                        "--batch", str(s.batch), "--warmup", str(s.warmup), "--steps", str(s.steps)]
            prepared, why = self.job("wan/prepare", prep_cmd, caps[0], mins[0])
            if prepared is None:
                for r in results:
                    fail(r, why if why.startswith("skipped") else why.replace("failed: ", "failed: prepare: ", 1))
                return results
            s.model, s.shards, s.lora_rank = prepared["model"], prepared["shards"], prepared["lora_rank"]
            for r in results:
                out, why = self.job(f"wan/{r.variant}", flow_step.variant_command(s, r.variant), caps[1], mins[1])
                if out is None:
                    fail(r, why)
                    continue
                r.value, r.peak_gb, r.flops = out["s_per_step"], out["peak_mb"] / 1024, out["flops_per_step"]
                r.extra = {**out, "prepare": prepared}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        base = results[0].value
        for r in results:
            if r.value is not None and base:
                r.ratio = r.value / base
        return results

    def child_row(self, row: str, need_gb: float, cap_s: float, min_s: float) -> dict | str:
        a = self.args
        work = self.workdir(need_gb)
        try:
            cmd = [sys.executable, str(HERE / "gpu_suite.py"), "--child", row, "--workdir", work, "--device",
                   a.device, "--dtype", a.dtype] + (["--tiny"] if a.tiny else [])
            for k in ("warmup", "steps", "hps_batch", "hps_images", "hps_single_images", "hps_repeats", "vlm_batch",
                      "vlm_response_words"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
            out, why = self.job(row, cmd, 600 if a.tiny else cap_s, 1 if a.tiny else min_s)
            return out if out is not None else why
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def hps_row(self) -> list[Result]:
        label = "HPS ViT-H-14 scoring" if not self.args.tiny else "HPS-layout tiny CLIP scoring"
        one = Result("hps", "one", f"{label}: one image at a time, prompt re-encoded", unit="img/s")
        batched = Result("hps", "batched", f"{label}: batches of {self.args.hps_batch}, each prompt encoded once",
                         unit="img/s")
        out = self.child_row("hps", 1, 120, 30)
        if isinstance(out, str):
            return [fail(one, out), fail(batched, out)]
        for r in (one, batched):
            m = out[r.variant]
            r.value, r.peak_gb, r.flops = m["images_per_s"], m["peak_gb"], m["flops_per_image"]
            r.extra = out
        one.ratio, batched.ratio = 1.0, batched.value / one.value
        return [one, batched]

    def vlm_row(self) -> list[Result]:
        a = self.args
        name = "LLaVA-1.5-7B-shaped" if not a.tiny else "tiny LLaVA-1.5-layout"
        r = Result("vlm", "lora", f"{name} VLM DPO, {a.vlm_batch} pairs: LoRA r 128, reference = disabled adapters")
        out = self.child_row("vlm", 16 if not a.tiny else 1, 240, 60)
        if isinstance(out, str):
            return [fail(r, out)]
        r.value, r.peak_gb, r.flops, r.extra = out["s_per_step"], out["peak_gb"], out["flops_per_step"], out
        return [r]

    def guide_row(self) -> list[Result]:
        """Reward-guided sampling cost per image against unguided (`scripts/bench/guide.py`): SD 1.5 from its
        published configs at 512 px, 20 steps, bf16 (tiny: the toy and tiny SD 1.5 pipelines on the CPU)."""
        a = self.args
        cmd = [sys.executable, str(HERE / "guide.py"), "--device", a.device, "--json-stdout",
               "--dtype", "bfloat16" if a.dtype == "bf16" else "float32"]
        cmd += ["--n", "2", "--steps", "3", "--repeats", "1"] if a.tiny else ["--sd15-full", "--n", "4", "--repeats", "4"]
        out, why = self.job("guide", cmd, 600 if a.tiny else 240, 1 if a.tiny else 60)
        if out is None:
            return [fail(Result("guide", "all", "reward guidance"), why)]
        results = []
        for row in out["rows"]:
            r = Result("guide", row["variant"], f"guidance {row['pipeline']}: {row['variant']}", unit="s/img")
            r.value, r.ratio, r.peak_gb, r.extra = row["ms_per_image"] / 1000, row["ratio"], row["peak_gb"] or 0.0, row
            results.append(r)
        return results

    def run(self) -> tuple[list[Result], dict]:
        a = self.args
        import torch

        peak, peak_source = peak_tflops(a.device, a.peak_tflops)
        self.log(f"peak {peak:.4g} TFLOP/s ({peak_source})")
        by_row: dict[str, list[Result]] = {}
        for row in sorted(a.rows, key=RUN_ORDER.index):
            if row in ("sdxl", "sd15"):
                by_row[row] = self.t2i_row(row)
            elif row == "wan":
                by_row[row] = self.flow_row()
            elif row == "hps":
                by_row[row] = self.hps_row()
            elif row == "guide":
                by_row[row] = self.guide_row()
            else:
                by_row[row] = self.vlm_row()
        results = [r for row in ROWS if row in by_row for r in by_row[row]]
        for r in results:
            if r.status == "ok" and r.flops:
                per_s = r.value if r.unit == "img/s" else 1 / r.value
                r.mfu = r.flops * per_s / (peak * 1e12)
        device = torch.cuda.get_device_name(a.device) if torch.device(a.device).type == "cuda" else "CPU"
        meta = {"device": device, "peak_tflops": peak, "peak_source": peak_source, "torch": torch.__version__,
                "tiny": a.tiny, "dtype": a.dtype, "wall_s": self.elapsed(), "deadline_s": self.deadline_s}
        return results, meta


def last_error(stderr: str) -> str:
    """The most telling line of a failed job's stderr: the exception line (or SystemExit message), shortened."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:160]
    return lines[-1][:160] if lines else ""


def fail(r: Result, why: str) -> Result:
    r.status, r.reason = ("skipped" if why.startswith("skipped") else "failed"), why
    return r


def table(results: list[Result], meta: dict, args) -> str:
    """The markdown table (and its header lines)."""
    setting = ("tiny models, CPU, float32" if args.tiny else
               "random weights, bf16 autocast (T2I and Wan, float32 weights) / bf16 weights (scorer, VLM)")
    lines = [f"mmalign GPU benchmark: {meta['device']}, torch {meta['torch']}, {setting}; {meta['wall_s']:.0f} s "
             f"of a {meta['deadline_s']:.0f} s deadline",
             f"MFU against {meta['peak_tflops']:.4g} TFLOP/s ({meta['peak_source']}); T2I: 1 pair/step "
             f"(tiny: 2), gradient checkpointing, Adafactor; Wan: 1 pair/step (tiny: 2), gradient checkpointing, "
             "AdamW; ratio: s/step against (a), images/s against one at a time, guidance s/img against unguided "
             "sampling", "",
             "| row | speed | ratio | peak GB | TFLOP per step or image | MFU % |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.label} | {r.reason} | | | | |")
            continue
        speed = f"{r.value:,.1f} img/s" if r.unit == "img/s" else f"{r.value:.3f} {r.unit}"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "n/a"
        mfu = f"{100 * r.mfu:.3g}" if r.mfu is not None else "n/a"
        tflop = f"{r.flops / 1e12:.4g}" if r.flops else "n/a"
        lines.append(f"| {r.label} | {speed} | {ratio} | {r.peak_gb:.2f} | {tflop} | {mfu} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU in float32, one thread per job "
                                                        "(OMP_NUM_THREADS=1 unless set): the CI dry run")
    ap.add_argument("--out", help="write gpu_bench.md, gpu_bench.json and logs/ here")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="skip jobs that no longer fit (default 11.5; --tiny: 30)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device for MFU (TFLOP/s)")
    ap.add_argument("--device", default=None, help="default cuda (--tiny: cpu)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 (--tiny: fp32)")
    ap.add_argument("--warmup", type=int, default=None, help="VLM warm-up steps, the first one counted (default "
                                                             "2; --tiny: 1)")
    ap.add_argument("--steps", type=int, default=None, help="VLM timed steps (default 3; --tiny: 1)")
    ap.add_argument("--hps-batch", type=int, default=None, help="images per scoring call (default 64; --tiny: 8)")
    ap.add_argument("--hps-images", type=int, default=None, help="images scored batched (default 512; --tiny: 16)")
    ap.add_argument("--hps-single-images", type=int, default=None,
                    help="images scored one at a time (default 64; --tiny: 4)")
    ap.add_argument("--hps-repeats", type=int, default=2, help="timed passes per way; the best counts (2)")
    ap.add_argument("--vlm-batch", type=int, default=None, help="VLM pairs per step (default 4; --tiny: 2)")
    ap.add_argument("--vlm-response-words", type=int, default=None,
                    help="words (tokens) per VLM answer (default 128; --tiny: 8)")
    ap.add_argument("--child", choices=["hps", "vlm"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = dict(deadline_min=(30, 11.5), device=("cpu", "cuda"), dtype=("fp32", "bf16"), warmup=(1, 2),
                    steps=(1, 3), hps_batch=(8, 64), hps_images=(16, 512), hps_single_images=(4, 64),
                    vlm_batch=(2, 4), vlm_response_words=(8, 128))
    for k, (tiny, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    if args.child:
        print(json.dumps(run_hps(args) if args.child == "hps" else run_vlm(args)))
        return
    if args.tiny:
        # One thread per job: on a shared CPU, two OpenMP threads that other jobs preempt ran the tiny models up to
        # 50x slower (each barrier waits for the descheduled thread).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; valid rows are {', '.join(ROWS)}")
    results, meta = Suite(args).run()
    text = table(results, meta, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_bench.md").write_text(text)
        (out / "gpu_bench.json").write_text(json.dumps(
            {"meta": meta, "results": [r.__dict__ for r in results]}, indent=1, default=str) + "\n")
    if any(r.status != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
