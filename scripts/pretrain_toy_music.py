#!/usr/bin/env python
"""Pretrain the toy world's base MusicGen and save it with `save_pretrained` (`assets/toy/music/`).

The model is a `MusicgenForConditionalGeneration` (`mmalign.music.tiny.tiny_musicgen`: a T5 text encoder over the
toy music words, a tiny EnCodec that is never used here, and the MusicGen decoder with K = 4 codebook heads of 64
codes) sized to learn the toy: by default a decoder 96 wide with 3 layers and 4 heads, a 1-layer T5 32 wide
(MusicGen's `enc_to_dec_proj` maps its states to the decoder's width). It sees fresh toy phrases
(`mmalign.toy.music`: 8 notes held 4 frames in codebook 0, the instrument's timbre tokens in codebooks 1..3) whose
captions name a wrong pattern with probability `--p-wrong` (0.5; instrument and key always right), as a model
trained on noisy captions would: a model of that data gives the captioned pattern probability 1 - p_wrong, so its
pattern adherence is well above a caption-ignoring model's and clearly below 1, which is what alignment can move.

Training is teacher-forced exactly as the music adapter scores codes (`mmalign.music.adapter`): the delay pattern
of `delayed_sequence` and the code log-probabilities of `code_logps`, summed over codebooks and frames; the loss is
their per-code mean NLL (nats). For `--p-uncond` of the phrases the text is dropped the way MusicGen's `generate`
builds its unconditional branch for classifier-free guidance (zero encoder states, zero attention mask), so
guidance can be measured. The T5 text encoder stays frozen at its random initialisation (as MusicGen's T5 is
frozen; the toy video base found a jointly trained random text encoder collapsing); the decoder and
`enc_to_dec_proj` train. AdamW, gradient clipping at 1, linear warm-up then cosine decay to 10 %, an exponential
moving average (EMA) of the trained weights.

Long runs: `--max-minutes` stops training at that wall time (then evaluates and saves); the cosine decay follows
``progress = max(step / steps, elapsed / max_minutes)``, so a run cut by the clock still ends at the low learning
rate. A checkpoint (weights, EMA, optimiser, data generator state) is written to `--ckpt-dir` every `--ckpt-every`
steps; `--resume` continues from it exactly. The model saved to `--out` is the EMA, with a generation config that
samples from π itself (top_k 0, no guidance); its ground-truth rewards on held-out prompts (codes sampled by the
adapter's `generate` at equal seeds, `mmalign.music.proof.generate_codes`), without and with guidance, the loss
curve and the timings go to `MODEL_CARD.md` and `pretrain.json` beside the weights, with `samples.npy` (the codes of
the first 20 held-out prompts).

    python scripts/pretrain_toy_music.py --max-minutes 40                   # -> assets/toy/music
    python scripts/pretrain_toy_music.py --steps 20 --out /tmp/tm           # smoke run
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmalign.music.adapter import MusicAdapter, code_logps  # noqa: E402
from mmalign.music.proof import generate_codes, ground_truth, pattern_chance  # noqa: E402
from mmalign.music.tiny import tiny_musicgen  # noqa: E402
from mmalign.toy.music import (  # noqa: E402
    NUM_CODEBOOKS,
    PATTERNS,
    SILENCE,
    music_prompt_seed_pairs,
    noisy_music_caption,
    parse_music_caption,
    render_phrases,
    sample_phrase,
)
from mmalign.toy.music_rewards import note_sequence, pattern_adherence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 3_000_000
# Arguments that define what a checkpoint is (model, data, optimiser); --resume refuses a checkpoint made with others.
RUN_KEYS = ("batch_size", "lr", "warmup", "weight_decay", "ema", "p_wrong", "p_uncond", "width", "layers", "heads",
            "ffn", "text_width", "text_layers", "seed")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phrase_batch(rng: np.random.Generator, n: int, p_wrong: float,
                 p_uncond: float) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(n, 4, 32) codes of fresh phrases, their noisy captions, and (n,) bool: keep the text (False for a
    `p_uncond` share)."""
    phrases = [sample_phrase(rng) for _ in range(n)]
    captions = [noisy_music_caption(p, rng, p_wrong) for p in phrases]
    keep = rng.random(n) >= p_uncond
    return torch.from_numpy(render_phrases(phrases)), captions, torch.from_numpy(keep)


def code_nll(adapter: MusicAdapter, captions: list[str], codes: torch.Tensor,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the per-code NLL (nats) of `codes` (N, K, T) given `captions`, teacher-forced with
    the adapter's delay pattern and code log-probs. Rows with `keep` False see no text: zero encoder states and a
    zero attention mask, the unconditional branch of MusicGen's classifier-free guidance. With every row kept this
    is ``-(adapter.logps(model, inputs).mean).mean()``."""
    model = adapter.model
    inputs = adapter.encode(captions, codes)
    text = inputs.text
    with torch.no_grad():
        states = model.text_encoder(**text).last_hidden_state
    if keep is not None:
        states = states * keep.to(states.dtype)[:, None, None]
        text = {**text, "attention_mask": text["attention_mask"] * keep.long()[:, None]}
    logits = model(encoder_outputs=(states,), attention_mask=text["attention_mask"],
                   decoder_input_ids=inputs.seq[:, :-1], use_cache=False).logits
    return -code_logps(logits, inputs.seq, inputs.scored, adapter.num_codebooks).mean.mean()


def reference_levels(p_wrong: float, n: int = 4000, seed: int = 12345) -> dict[str, float]:
    """Pattern adherence of two reference models, measured on `n` rendered phrases: `data` = a perfect model of the
    training data (a phrase scored against its own noisy caption: the captioned pattern with probability
    1 - p_wrong), `chance` = a model that ignores the pattern word (the phrase scored against a uniformly drawn
    pattern)."""
    rng = np.random.default_rng(seed)
    phrases = [sample_phrase(rng) for _ in range(n)]
    codes = render_phrases(phrases)
    noisy = [noisy_music_caption(p, rng, p_wrong) for p in phrases]
    return {"data": float(np.mean(pattern_adherence(codes, noisy))),
            "chance": pattern_chance(codes, [p.caption for p in phrases])}


@torch.no_grad()
def evaluate(adapter: MusicAdapter, n: int, batch: int, guidance_scale: float = 1.0,
             keep: int = 0) -> tuple[dict, np.ndarray, list[str]]:
    """Mean ground-truth rewards of codes sampled for `n` held-out prompts (`music_prompt_seed_pairs("heldout",
    n)`, equal seeds), the share of samples fully on the captioned pattern, the caption-ignoring level of the same
    codes and the adherence per captioned pattern; plus the first `keep` samples' codes and prompts."""
    pairs = music_prompt_seed_pairs("heldout", n)
    prompts = [p for p, _ in pairs]
    codes = generate_codes(adapter, prompts, [s for _, s in pairs], batch=batch, guidance_scale=guidance_scale,
                           progress=False)
    r = ground_truth(codes, prompts)
    out = {k: float(v.mean()) for k, v in r.items()}
    out["pattern_all_right"] = float((r["pattern"] >= 1.0 - 1e-9).mean())
    out["pattern_chance"] = pattern_chance(codes, prompts)
    captioned = np.array([parse_music_caption(p)[0] for p in prompts])
    out["pattern_by_caption"] = {p: float(r["pattern"][captioned == p].mean()) for p in PATTERNS
                                 if (captioned == p).any()}
    return out, codes[:keep], prompts[:keep]


def fmt(m: dict) -> str:
    return " ".join(f"{k}={m[k]:.3f}" for k in ("pattern", "pattern_chance", "quality", "in_key", "sounding",
                                                 "timbre"))


def note_names(codes: np.ndarray) -> str:
    """Codebook 0's 8 notes of one phrase (K, T) as note names (octave 0 = codes 1..12), "-" for silence."""
    return " ".join("-" if c == SILENCE else f"{NOTE_NAMES[(c - 1) % 12]}{(c - 1) // 12}"
                    for c in note_sequence(codes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "assets" / "toy" / "music"))
    ap.add_argument("--ckpt-dir", default=str(REPO / "runs" / "pretrain_toy_music"),
                    help="where the resumable checkpoint goes (default: the git-ignored runs/ folder)")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/state.pt if it exists")
    ap.add_argument("--steps", type=int, default=40000, help="planned steps (the horizon of the cosine decay)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: no EMA)")
    ap.add_argument("--p-wrong", type=float, default=0.5, help="share of captions naming a wrong pattern")
    ap.add_argument("--p-uncond", type=float, default=0.1, help="share of phrases trained without text (for CFG)")
    ap.add_argument("--width", type=int, default=96, help="decoder width")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=192, help="decoder feed-forward width")
    ap.add_argument("--text-width", type=int, default=32)
    ap.add_argument("--text-layers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is steadier than 2 on a 2-core machine shared with other jobs")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=2000, help="quick EMA evaluation (80 held-out prompts)")
    ap.add_argument("--eval-prompts", type=int, default=480)
    ap.add_argument("--eval-batch", type=int, default=80, help="sequences per generate call (part of the seeds)")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale of the CFG "
                                                                 "evaluation (MusicGen's default 3)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.width % args.heads or args.text_width % args.heads:
        ap.error(f"--width {args.width} and --text-width {args.text_width} must be multiples of --heads {args.heads}")

    model, tokenizer = tiny_musicgen(width=args.width, layers=args.layers, heads=args.heads, ffn_dim=args.ffn,
                                     text_width=args.text_width, text_layers=args.text_layers, seed=args.seed)
    gen = model.generation_config
    gen.top_k, gen.guidance_scale = 0, None  # `generate` samples from π itself, the model log π scores
    adapter = MusicAdapter(model, tokenizer, "musicgen", pretrained="(pretraining)")
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    if hasattr(model, "enc_to_dec_proj"):
        model.enc_to_dec_proj.requires_grad_(True)
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    ema = {k: p.detach().clone() for k, p in trained.items()}
    n_params = {"decoder": sum(p.numel() for p in model.decoder.parameters()),
                "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
                "audio_encoder": sum(p.numel() for p in model.audio_encoder.parameters()),
                "trained": sum(p.numel() for p in trained.values())}
    opt = torch.optim.AdamW(list(trained.values()), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    step, elapsed, losses, evals = 0, 0.0, [], []

    ckpt_dir = Path(args.ckpt_dir)
    ckpt = ckpt_dir / "state.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        changed = [k for k in RUN_KEYS if state["args"].get(k) != getattr(args, k)]
        if changed:
            ap.error(f"--resume: {ckpt} was trained with other " + ", ".join(
                f"--{k.replace('_', '-')} ({state['args'].get(k)} there, {getattr(args, k)} here)" for k in changed)
                + "; pass the same values or another --ckpt-dir")
        model.load_state_dict(state["model"])
        for k, v in state["ema"].items():
            ema[k].copy_(v)
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        step, elapsed, losses, evals = state["step"], state["elapsed"], state["losses"], state["evals"]
        log(f"resumed from {ckpt} at step {step} ({elapsed / 60:.1f} min trained)")

    def save_ckpt() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / "state.pt.tmp"
        torch.save({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                    "step": step, "elapsed": elapsed, "losses": losses, "evals": evals, "args": vars(args)}, tmp)
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
        saved = {k: p.detach().clone() for k, p in trained.items()}
        with torch.no_grad():
            for k, p in trained.items():
                p.copy_(ema[k])

        def restore() -> None:
            with torch.no_grad():
                for k, p in trained.items():
                    p.copy_(saved[k])
        return restore

    log(f"toy music pretraining: {n_params} parameters, batch {args.batch_size}, up to {args.steps} steps"
        + (f" or {args.max_minutes} min" if max_s else ""))
    model.train()
    t_last = time.perf_counter()
    while step < args.steps and (max_s is None or elapsed < max_s):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor()
        codes, captions, keep = phrase_batch(rng, args.batch_size, args.p_wrong, args.p_uncond)
        loss = code_nll(adapter, captions, codes, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))  # short warm-up of the average
            for k, p in trained.items():
                ema[k].lerp_(p, 1 - decay)
        losses.append(loss.item())
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % args.log_every == 0:
            log(f"step {step} loss {np.mean(losses[-args.log_every:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed / step:.3f} s/step {elapsed / 60:.1f} min")
        if args.eval_every and step % args.eval_every == 0:
            restore = swap_in_ema()
            metrics, _, _ = evaluate(adapter, 80, args.eval_batch)
            restore()
            model.train()
            evals.append({"step": step, "minutes": round(elapsed / 60, 1),
                          **{k: v for k, v in metrics.items() if k != "pattern_by_caption"}})
            log(f"eval (EMA, 80 held-out prompts) step {step}: {fmt(metrics)}")
            t_last = time.perf_counter()  # evaluation time is not training time
        if step % args.ckpt_every == 0:
            save_ckpt()
            t_last = time.perf_counter()
    save_ckpt()
    log(f"training stopped at step {step} after {elapsed / 60:.1f} min; evaluating the EMA weights")

    swap_in_ema()  # the saved model is the EMA
    model.eval()
    t0 = time.perf_counter()
    metrics, samples, sample_prompts = evaluate(adapter, args.eval_prompts, args.eval_batch, keep=20)
    eval_s = time.perf_counter() - t0
    log(f"held-out ({args.eval_prompts} prompts): {fmt(metrics)} pattern_all_right={metrics['pattern_all_right']:.3f}")
    cfg_metrics, _, _ = evaluate(adapter, args.eval_prompts, args.eval_batch, guidance_scale=args.guidance)
    log(f"held-out with guidance {args.guidance}: {fmt(cfg_metrics)}")
    levels = reference_levels(args.p_wrong)
    log(f"reference pattern adherence: a perfect model of the data {levels['data']:.3f}, caption-ignoring "
        f"{levels['chance']:.3f}")

    out = Path(args.out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    saved_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    np.save(tmp / "samples.npy", samples)
    shown = vars(args) | {k: (str(Path(v).resolve().relative_to(REPO)) if Path(v).resolve().is_relative_to(REPO)
                              else v) for k, v in (("out", args.out), ("ckpt_dir", args.ckpt_dir))}
    report = {"args": shown, "parameters": n_params, "saved_bytes": saved_bytes, "steps_done": step,
              "train_seconds": round(elapsed, 1), "seconds_per_step": round(elapsed / max(step, 1), 4),
              "eval_seconds": round(eval_s, 1), "loss_first_50": float(np.mean(losses[:50])),
              "loss_last_200": float(np.mean(losses[-200:])),
              "loss_curve_every_100": [round(float(np.mean(losses[i:i + 100])), 5)
                                       for i in range(0, len(losses), 100)],
              "heldout": metrics, f"heldout_guidance_{args.guidance:g}": cfg_metrics, "reference_pattern": levels,
              "evals_during_training": evals,
              "samples": [{"prompt": p, "notes": note_names(c), "pattern": float(pattern_adherence(c, p))}
                          for p, c in zip(sample_prompts, samples)],
              "torch": torch.__version__}
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(model_card(report))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"saved to {out} ({saved_bytes / 1e6:.2f} MB of weights, tokenizer and configs)")
    if saved_bytes >= MAX_BYTES:
        log(f"WARNING: the saved model is {saved_bytes / 1e6:.2f} MB, over the {MAX_BYTES / 1e6:.0f} MB the toy base "
            "may ship; use a smaller --width / --layers / --ffn")
    print(json.dumps({k: v for k, v in report.items() if k not in ("loss_curve_every_100", "samples")}, indent=2))
    return 0


def model_card(r: dict) -> str:
    a, h, lv = r["args"], r["heldout"], r["reference_pattern"]
    g = r[f"heldout_guidance_{a['guidance']:g}"]
    curve = "\n".join(f"| {e['step']} | {e['minutes']} | {e['pattern']:.3f} | {e['pattern_chance']:.3f} | "
                      f"{e['quality']:.3f} | {e['in_key']:.3f} | {e['sounding']:.3f} | {e['timbre']:.3f} |"
                      for e in r["evals_during_training"]) or "| - | - | - | - | - | - | - | - |"
    budget = f"{a['steps']} steps" + (f" or {a['max_minutes']} minutes, whichever ends first" if a["max_minutes"]
                                      else "")
    by = ", ".join(f"{p} {v:.3f}" for p, v in h["pattern_by_caption"].items())
    samples = "\n".join(f"| {s['prompt']} | {s['notes']} | {s['pattern']:.3f} |" for s in r["samples"])
    p = r["parameters"]
    return f"""# Toy token-music base model (mmalign)

`MusicgenForConditionalGeneration` (transformers; `save_pretrained` format, {r['saved_bytes'] / 1e6:.2f} MB): the
MusicGen decoder with K = {NUM_CODEBOOKS} codebooks of 64 codes (code 64 is pad / BOS / decoder start),
{a['layers']} layers {a['width']} wide, {a['heads']} heads, feed-forward {a['ffn']} ({p['decoder']:,} parameters); a
{a['text_layers']}-layer T5 text encoder {a['text_width']} wide over the toy music words
({p['text_encoder']:,} parameters, frozen at its random initialisation, its states mapped to the decoder's width by
MusicGen's `enc_to_dec_proj`); a tiny EnCodec ({p['audio_encoder']:,} parameters, random, never trained: the toy
world is codes, not audio). The weights are the EMA (decay {a['ema']}) of the trained ones; float32. The generation
config samples from π itself (top_k 0, no guidance).

## Data and training

Fresh phrases of `mmalign.toy.music` every step (8 notes held 4 frames each in codebook 0, following a pattern
ascending / descending / repeating / alternating in a key c..g major / minor; timbre tokens of the instrument's band
in codebooks 1..3): captions name a wrong pattern with probability {a['p_wrong']} (instrument and key always right),
no text for {a['p_uncond']:.0%} of phrases (zero encoder states and attention mask, the unconditional branch of
MusicGen's classifier-free guidance). Teacher-forced with the delay pattern exactly as `mmalign.music.adapter`
scores codes, loss the per-code NLL (nats; the timbre tokens alone put its floor near 0.75 ln 8 = 1.56), AdamW lr
{a['lr']} (weight decay {a['weight_decay']}, {a['warmup']} warm-up steps, cosine to 10 % over {budget}), gradient
clipping 1, batch {a['batch_size']}, seed {a['seed']}.

{r['steps_done']} steps took {r['train_seconds'] / 60:.1f} min ({r['seconds_per_step']} s/step on {a['threads']} CPU
thread(s) of a shared 2-core machine, torch {r['torch']}). Loss {r['loss_first_50']:.4f} (first 50 steps) ->
{r['loss_last_200']:.4f} (last 200).

## Ground truth on held-out prompts

`music_prompt_seed_pairs("heldout", {a['eval_prompts']})`, codes sampled by `MusicAdapter.generate` (temperature 1,
no top-k) in batches of {a['eval_batch']} seeded from the pairs' seeds (`mmalign.music.proof.generate_codes`),
rewards of `mmalign.toy.music_rewards`:

| | pattern | caption-ignoring level | pattern fully right | quality | in key | sounding | timbre |
|---|---|---|---|---|---|---|---|
| no guidance | {h['pattern']:.3f} | {h['pattern_chance']:.3f} | {h['pattern_all_right']:.1%} | {h['quality']:.3f} \
| {h['in_key']:.3f} | {h['sounding']:.3f} | {h['timbre']:.3f} |
| guidance {a['guidance']:g} | {g['pattern']:.3f} | {g['pattern_chance']:.3f} | {g['pattern_all_right']:.1%} \
| {g['quality']:.3f} | {g['in_key']:.3f} | {g['sounding']:.3f} | {g['timbre']:.3f} |

Pattern adherence by captioned pattern (no guidance): {by}. For reference, on rendered phrases: a perfect model of
the noisy training data reaches {lv['data']:.3f} (it follows the caption's pattern with probability
1 - {a['p_wrong']}), a model that ignores the pattern word {lv['chance']:.3f}.

During training (EMA weights, 80 held-out prompts, no guidance):

| step | minutes | pattern | caption-ignoring | quality | in key | sounding | timbre |
|---|---|---|---|---|---|---|---|
{curve}

## Samples

The first 20 held-out prompts (codes in `samples.npy`), codebook 0's notes (octave 0 = codes 1..12):

| prompt | notes | pattern |
|---|---|---|
{samples}

Made by `python scripts/pretrain_toy_music.py` with the arguments in `pretrain.json`. Load it with
`mmalign.music.adapter.load_music(folder)` or `MusicgenForConditionalGeneration.from_pretrained(folder)`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
