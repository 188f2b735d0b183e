#!/usr/bin/env python
"""Pretrain the toy world's base text-to-video model and save it in diffusers format (`assets/toy/video/`).

The model sees fresh toy clips (`mmalign.toy.video`) whose captions name a wrong value of one attribute (colour by
default) with probability `--p-wrong` (0.4), as a model trained on noisy web captions would; the other words are
always right. Training is rectified flow with the velocity target of `ToyVideoPipeline`'s convention:
``x_t = (1 - t) x0 + t noise``, loss ``||transformer(x_t, 1000 t, text) - (noise - x0)||^2``, t logit-normal(0, 1)
(or uniform) with SD3's timestep shift 3 (median t 0.75: colour, shape and motion are decided near pure noise,
where the caption is the only information), AdamW, gradient clipping at 1, linear warm-up then cosine decay to
10 %, an exponential moving average (EMA) of the weights, and the empty caption for `--p-uncond` of the clips (so
classifier-free guidance works). The saved scheduler samples with the same shift (`--shift`).

The text encoder stays frozen at its random initialisation unless `--train-text-encoder` is given (as Wan keeps
its UMT5 frozen). Measured: trained jointly at lr 1e-3, the 1-layer CLIP encoder collapsed to nearly the same
states for every prompt (spread across prompts 0.03 against 0.3 at init) and after 2,500 steps the transformer
ignored the caption (swapping the colour word changed the velocity loss at t = 0.5-0.8 by < 3e-5; guidance 3
changed nothing), while with the encoder frozen the swap cost 5e-4 to 8e-4 after 400 steps, about what knowing
the colour can save near pure noise when the shape's place is still unknown and 40 % of colour words are wrong.

Long runs: `--max-minutes` stops training at that wall time (then evaluates and saves); the cosine decay follows
``progress = max(step / steps, elapsed / max_minutes)``, so a run cut by the clock still ends at the low learning
rate. A checkpoint (weights, EMA, optimiser, data and noise generator states) is written to `--ckpt-dir` every
`--ckpt-every` steps; `--resume` continues from it. The model saved to `--out` is the EMA; its ground-truth rewards
on held-out prompts, the loss curve and the timings go to `MODEL_CARD.md` and `pretrain.json` beside the weights,
with `samples.png` / `samples.gif` of 20 held-out prompts.

    python scripts/pretrain_toy_video.py --max-minutes 50                  # -> assets/toy/video
    python scripts/pretrain_toy_video.py --steps 30 --out /tmp/tv --eval-prompts 60 --eval-steps 4  # smoke run
"""

from __future__ import annotations

import argparse
import copy
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

from mmalign.toy.video import (  # noqa: E402
    noisy_video_caption,
    sample_clip,
    save_clip_gif,
    save_clip_strip,
    video_prompt_seed_pairs,
)
from mmalign.toy.video_pipeline import TIMESTEP_SCALE, build_toy_video  # noqa: E402
from mmalign.toy.video_rewards import to_uint8_clips, video_reward_components  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def clip_batch(rng: np.random.Generator, n: int, p_wrong: float, attribute: str,
               p_uncond: float) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 9, 32, 32) clips in [-1, 1] and their noisy captions ("" for a `p_uncond` share)."""
    frames, captions = [], []
    for _ in range(n):
        clip = sample_clip(rng)
        frames.append(clip.render())
        caption = noisy_video_caption(clip, rng, p_wrong, attribute)
        captions.append("" if rng.random() < p_uncond else caption)
    x = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return x, captions


def sample_t(gen: torch.Generator, n: int, kind: str, shift: float = 1.0) -> torch.Tensor:
    """(n,) training times: uniform or logit-normal(0, 1) u, then shifted ``t = s u / (1 + (s - 1) u)`` (SD3's
    timestep shift; s > 1 moves mass towards pure noise, where the caption decides the clip)."""
    u = torch.rand(n, generator=gen) if kind == "uniform" else torch.sigmoid(torch.randn(n, generator=gen))
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def evaluate(pipe, n: int, steps: int, batch: int = 60, guidance_scale: float = 1.0,
             keep: int = 0) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Mean ground-truth rewards of `n` held-out prompts (`video_prompt_seed_pairs("heldout", n)`, one seed each),
    plus the first `keep` clips (uint8) and their prompts."""
    pairs = video_prompt_seed_pairs("heldout", n)
    parts: dict[str, list[np.ndarray]] = {}
    kept: list[np.ndarray] = []
    for i in range(0, n, batch):
        chunk = pairs[i:i + batch]
        gens = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        frames = pipe([p for p, _ in chunk], num_inference_steps=steps, generator=gens,
                      guidance_scale=guidance_scale, output_type="np").frames
        clips = to_uint8_clips(frames)
        if len(kept) * batch < keep:
            kept.append(clips)
        for k, v in video_reward_components(clips, [p for p, _ in chunk]).items():
            parts.setdefault(k, []).append(np.asarray(v))
    out = {k: float(np.concatenate(v).mean()) for k, v in parts.items()}
    color = np.concatenate(parts["color"])
    out["color_all_right"] = float((color >= 0.95).mean())
    out["color_all_wrong"] = float((color <= 0.05).mean())
    kept_clips = np.concatenate(kept)[:keep] if kept else np.zeros((0,), np.uint8)
    return out, kept_clips, [p for p, _ in pairs[:keep]]


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in ("VQ", "MQ", "TA", "color", "shape", "direction"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "assets" / "toy" / "video"))
    ap.add_argument("--ckpt-dir", default=str(REPO / "runs" / "pretrain_toy_video"),
                    help="where the resumable checkpoint goes (default: the git-ignored runs/ folder)")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/state.pt if it exists")
    ap.add_argument("--steps", type=int, default=8000, help="planned steps (the horizon of the cosine decay)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: no EMA)")
    ap.add_argument("--t-sampling", choices=("logit_normal", "uniform"), default="logit_normal")
    ap.add_argument("--t-shift", type=float, default=3.0, help="timestep shift of the training times")
    ap.add_argument("--p-wrong", type=float, default=0.4)
    ap.add_argument("--noisy-attribute", choices=("color", "shape", "direction"), default="color")
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--train-text-encoder", action="store_true",
                    help="train the text encoder too (default: frozen at its random init; see the module docstring)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--text-width", type=int, default=32)
    ap.add_argument("--shift", type=float, default=3.0, help="sampling shift of the saved scheduler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is steadier than 2 on a 2-core machine shared with other jobs")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=1000, help="quick EMA evaluation (60 prompts, 10 steps)")
    ap.add_argument("--eval-prompts", type=int, default=240)
    ap.add_argument("--eval-steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = build_toy_video(seed=args.seed, num_heads=args.heads, head_dim=args.head_dim, num_layers=args.layers,
                           ffn_dim=args.ffn, text_width=args.text_width, shift=args.shift)
    pipe.set_progress_bar_config(disable=True)
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
    ema = copy.deepcopy(modules).requires_grad_(False)
    pipe.text_encoder.requires_grad_(args.train_text_encoder)
    params = [p for p in modules.parameters() if p.requires_grad]
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, losses, evals = 0, 0.0, [], []

    ckpt_dir = Path(args.ckpt_dir)
    ckpt = ckpt_dir / "state.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        modules.load_state_dict(state["modules"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        step, elapsed, losses, evals = state["step"], state["elapsed"], state["losses"], state["evals"]
        log(f"resumed from {ckpt} at step {step} ({elapsed / 60:.1f} min trained)")

    def save_ckpt() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / "state.pt.tmp"
        torch.save({"modules": modules.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "gen": gen.get_state(), "step": step, "elapsed": elapsed,
                    "losses": losses, "evals": evals, "args": vars(args)}, tmp)
        tmp.replace(ckpt)

    max_s = None if args.max_minutes is None else 60.0 * args.max_minutes

    def lr_factor() -> float:  # linear warm-up, cosine decay to 10 % over the step or time budget
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        if max_s is not None:
            progress = max(progress, elapsed / max_s)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def swap_in_ema():  # evaluate the EMA weights; returns a function that restores the trained ones
        saved = copy.deepcopy(modules.state_dict())
        modules.load_state_dict(ema.state_dict())
        return lambda: modules.load_state_dict(saved)

    tok = pipe.tokenizer
    log(f"toy video pretraining: {n_params} parameters, batch {args.batch_size}, up to {args.steps} steps"
        + (f" or {args.max_minutes} min" if max_s else ""))
    modules.train()
    t_last = time.perf_counter()
    while step < args.steps and (max_s is None or elapsed < max_s):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor()
        x0, captions = clip_batch(rng, args.batch_size, args.p_wrong, args.noisy_attribute, args.p_uncond)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_t(gen, x0.shape[0], args.t_sampling, args.t_shift)
        tt = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        with torch.set_grad_enabled(args.train_text_encoder):
            text = pipe.text_encoder(ids).last_hidden_state
        v = pipe.transformer(x_t, timestep=t * TIMESTEP_SCALE, encoder_hidden_states=text).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))  # short warm-up of the average
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % args.log_every == 0:
            log(f"step {step} loss {np.mean(losses[-args.log_every:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed / step:.2f} s/step {elapsed / 60:.1f} min")
        if args.eval_every and step % args.eval_every == 0:
            modules.eval()
            restore = swap_in_ema()
            metrics, _, _ = evaluate(pipe, 60, 10)
            restore()
            modules.train()
            evals.append({"step": step, "minutes": round(elapsed / 60, 1), **metrics})
            log(f"eval (EMA, 60 prompts, 10 steps) step {step}: {fmt(metrics)}")
            t_last = time.perf_counter()  # evaluation time is not training time
        if step % args.ckpt_every == 0:
            save_ckpt()
            t_last = time.perf_counter()
    save_ckpt()
    log(f"training stopped at step {step} after {elapsed / 60:.1f} min; evaluating the EMA weights")

    modules.eval()
    swap_in_ema()  # the saved model is the EMA
    t0 = time.perf_counter()
    metrics, clips, prompts = evaluate(pipe, args.eval_prompts, args.eval_steps, keep=20)
    eval_s = time.perf_counter() - t0
    log(f"held-out ({args.eval_prompts} prompts, {args.eval_steps} steps): {fmt(metrics)} "
        f"color_all_right={metrics['color_all_right']:.3f}")
    cfg_metrics, _, _ = evaluate(pipe, min(120, args.eval_prompts), args.eval_steps, guidance_scale=3.0)
    log(f"held-out with guidance 3 ({min(120, args.eval_prompts)} prompts): {fmt(cfg_metrics)}")

    out = Path(args.out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_clip_strip(clips, str(tmp / "samples.png"), captions=prompts, scale=3)
    save_clip_gif(clips, str(tmp / "samples.gif"), ncol=5, scale=3)
    shown = vars(args) | {k: (str(Path(v).resolve().relative_to(REPO)) if Path(v).resolve().is_relative_to(REPO)
                              else v) for k, v in (("out", args.out), ("ckpt_dir", args.ckpt_dir))}
    report = {"args": shown, "parameters": n_params, "steps_done": step, "train_seconds": round(elapsed, 1),
              "seconds_per_step": round(elapsed / max(step, 1), 3), "eval_seconds": round(eval_s, 1),
              "loss_first_50": float(np.mean(losses[:50])), "loss_last_200": float(np.mean(losses[-200:])),
              "loss_curve_every_100": [round(float(np.mean(losses[i:i + 100])), 5)
                                       for i in range(0, len(losses), 100)],
              "heldout": metrics, "heldout_guidance_3": cfg_metrics, "evals_during_training": evals,
              "torch": torch.__version__}
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(model_card(report))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"saved to {out}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("loss_curve_every_100",)}, indent=2))
    return 0


def model_card(r: dict) -> str:
    a, h, g = r["args"], r["heldout"], r["heldout_guidance_3"]
    curve = "\n".join(f"| {e['step']} | {e['minutes']} | {e['VQ']:.3f} | {e['MQ']:.3f} | {e['TA']:.3f} | "
                      f"{e['color']:.3f} | {e['shape']:.3f} | {e['direction']:.3f} |"
                      for e in r["evals_during_training"]) or "| - | - | - | - | - | - | - | - |"
    width = a["heads"] * a["head_dim"]
    encoder = "trained jointly" if a.get("train_text_encoder") else "frozen at its random initialisation"
    budget = f"{a['steps']} steps" + (f" or {a['max_minutes']} minutes, whichever ends first" if a["max_minutes"]
                                      else "")
    return f"""# Toy text-to-video base model (mmalign)

Pixel-space `ToyVideoPipeline` (diffusers format): `WanTransformer3DModel` on RGB clips (in/out channels 3, patch
(1, 4, 4), {a['heads']} heads x {a['head_dim']} = {width} wide, ffn {a['ffn']}, {a['layers']} layers, freq_dim 64,
rope_max_seq_len 32; {r['parameters']['transformer']:,} parameters), a 1-layer CLIP text encoder {a['text_width']} wide
({r['parameters']['text_encoder']:,} parameters, {encoder}), `FlowMatchEulerDiscreteScheduler` (shift {a['shift']}). The
transformer predicts the velocity `noise - x0` at `timestep = 1000 t` for `x_t = (1 - t) x0 + t noise`, clips in
[-1, 1] laid out (B, 3, 9, 32, 32). The weights are the EMA (decay {a['ema']}) of the trained ones; float32.

## Data and training

Fresh clips of `mmalign.toy.video` every step (9 frames, 32x32, one shape of 4 colours x 3 shapes, size 8-12,
moving left / right / up / down at 1.5-2.5 px/frame or still); captions name a wrong {a['noisy_attribute']} with
probability {a['p_wrong']} (the other words always right), the empty caption for {a['p_uncond']:.0%} of clips.
Rectified flow, velocity MSE, t {a['t_sampling'].replace('_', '-')} shifted by {a['t_shift']}, AdamW lr {a['lr']}
(weight decay {a['weight_decay']}, {a['warmup']} warm-up steps, cosine to 10 % over {budget}), gradient clipping 1,
batch {a['batch_size']}, seed {a['seed']}.

{r['steps_done']} steps took {r['train_seconds'] / 60:.1f} min ({r['seconds_per_step']} s/step on {a['threads']} CPU
threads of a shared 2-core machine, torch {r['torch']}). Loss {r['loss_first_50']:.4f} (first 50 steps) ->
{r['loss_last_200']:.4f} (last 200).

## Ground truth on held-out prompts

`video_prompt_seed_pairs("heldout", {a['eval_prompts']})` (each of the 60 prompts {a['eval_prompts'] // 60} times, one
seed each), {a['eval_steps']} Euler steps, no guidance, rewards of `mmalign.toy.video_rewards`:

| VQ | MQ | TA | colour | shape | direction | colour fully right | colour fully wrong |
|---|---|---|---|---|---|---|---|
| {h['VQ']:.3f} | {h['MQ']:.3f} | {h['TA']:.3f} | {h['color']:.3f} | {h['shape']:.3f} | {h['direction']:.3f} \
| {h['color_all_right']:.1%} | {h['color_all_wrong']:.1%} |

With classifier-free guidance 3 (first {min(120, a['eval_prompts'])} prompts): VQ {g['VQ']:.3f}, MQ {g['MQ']:.3f},
TA {g['TA']:.3f} (colour {g['color']:.3f}, shape {g['shape']:.3f}, direction {g['direction']:.3f}).

During training (EMA weights, 60 held-out prompts, 10 Euler steps):

| step | minutes | VQ | MQ | TA | colour | shape | direction |
|---|---|---|---|---|---|---|---|
{curve}

`samples.png` / `samples.gif`: the first 20 held-out prompts of the evaluation above.

Made by `python scripts/pretrain_toy_video.py` with the arguments in `pretrain.json`. Load it with
`from mmalign.toy.video_pipeline import ToyVideoPipeline; ToyVideoPipeline.from_pretrained(folder)`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
