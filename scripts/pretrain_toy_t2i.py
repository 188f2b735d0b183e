#!/usr/bin/env python
"""Pretrain the toy world's base text-to-image model and save it in diffusers format (`assets/toy/t2i/`).

The model sees fresh toy scenes whose captions name the true colour with probability `--p-true` (0.6) and another
colour otherwise, as a model trained on noisy web captions would; shape and position words are always right. It
learns shapes, positions and clean rendering, but its colour adherence stays imperfect: that is what preference
alignment must fix in `mmalign quickstart`.

Deterministic for a seed on a given machine (scenes, captions, timesteps and noise come from seeded generators).
Runtime on 2 CPU cores: about 0.3-0.5 s per step at batch 64, so the default 2,400 steps take 12-20 minutes; the
measured time, the loss curve and the base model's ground-truth rewards are written to `MODEL_CARD.md` and
`pretrain.json` next to the weights.

    python scripts/pretrain_toy_t2i.py                      # -> assets/toy/t2i
    python scripts/pretrain_toy_t2i.py --steps 50 --out /tmp/toy  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmalign.toy.pipeline import build_toy_t2i, toy_scheduler_config  # noqa: E402
from mmalign.toy.rewards import reward_components  # noqa: E402
from mmalign.toy.scenes import noisy_caption, prompt_seed_pairs, sample_scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def scene_batch(rng: np.random.Generator, n: int, p_true: float) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        images.append(scene.render())
        captions.append(noisy_caption(scene, rng, p_true))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions


@torch.no_grad()
def evaluate(pipe, n: int, steps: int, batch: int = 128) -> dict[str, float]:
    """Mean ground-truth rewards of `n` held-out prompts, one fixed seed each (the quickstart's evaluation set)."""
    pairs = prompt_seed_pairs("heldout", n)
    comps: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch):
        chunk = pairs[i:i + batch]
        gens = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        images = pipe([p for p, _ in chunk], num_inference_steps=steps, generator=gens, output_type="np").images
        uint8 = np.round(images * 255).astype(np.uint8)
        parts = reward_components(uint8, [p for p, _ in chunk])
        parts["total"] = 0.5 * parts["color"] + 0.25 * parts["shape"] + 0.25 * parts["position"]
        for k, v in parts.items():
            comps.setdefault(k, []).append(np.asarray(v))
    out = {f"mean_{k}": float(np.concatenate(v).mean()) for k, v in comps.items()}
    color = np.concatenate(comps["color"])
    out["color_all_right"] = float((color >= 0.95).mean())
    out["color_all_wrong"] = float((color <= 0.05).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "assets" / "toy" / "t2i"))
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--p-true", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    pipe = build_toy_t2i(seed=args.seed)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    noise_sched = DDPMScheduler(**{k: v for k, v in toy_scheduler_config().items()
                                   if k not in ("set_alpha_to_one",)})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tok = pipe.tokenizer
    unet.train()
    text_encoder.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="pretrain toy t2i")
    for step in bar:
        x0, captions = scene_batch(rng, args.batch_size, args.p_true)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    train_s = time.perf_counter() - start

    unet.eval()
    text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    metrics = evaluate(pipe, args.eval_prompts, args.eval_steps)
    eval_s = time.perf_counter() - t0

    out = Path(args.out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shown = vars(args) | {"out": str(out.resolve().relative_to(REPO)) if out.resolve().is_relative_to(REPO)
                                 else str(out)}
    report = {"args": shown, "parameters": n_params, "train_seconds": round(train_s, 1),
              "seconds_per_step": round(train_s / args.steps, 3), "eval_seconds": round(eval_s, 1),
              "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
              "loss_curve_every_50": [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)],
              "heldout": metrics, "torch": torch.__version__}
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(model_card(report))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve_every_50"}, indent=2))
    return 0


def model_card(r: dict) -> str:
    a, h = r["args"], r["heldout"]
    return f"""# Toy text-to-image base model (mmalign)

Pixel-space `ToyT2IPipeline` (diffusers format): UNet2DConditionModel (16, 32, 64), cross-attention at 8x8 and in
the mid block, a 1-layer CLIP text encoder, DDIM scheduler with `prediction_type="sample"`; {r['parameters']:,}
parameters, float32 safetensors.

Made by `python scripts/pretrain_toy_t2i.py --steps {a['steps']} --batch-size {a['batch_size']} --lr {a['lr']}
--p-true {a['p_true']} --seed {a['seed']}`: fresh toy scenes every step, captions naming the true colour with
probability {a['p_true']}. {a['steps']} steps took {r['train_seconds']:.0f} s ({r['seconds_per_step']} s/step, torch
{r['torch']}, {a['threads']} threads). Loss {r['loss_first_50']:.4f} (first 50 steps) -> {r['loss_last_50']:.4f}
(last 50).

Ground truth on {a['eval_prompts']} held-out prompts (`prompt_seed_pairs("heldout", n)`, one seed each,
{a['eval_steps']} DDIM steps): colour adherence {h['mean_color']:.3f} ({h['color_all_right']:.1%} of images fully
the captioned colour, {h['color_all_wrong']:.1%} fully another), shape {h['mean_shape']:.3f}, position
{h['mean_position']:.3f}, total {h['mean_total']:.3f}.

Load it with `from mmalign.toy.pipeline import ToyT2IPipeline; ToyT2IPipeline.from_pretrained(folder)`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
