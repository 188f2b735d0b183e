"""`mmalign quickstart`: align the toy world's base model end to end on a CPU, and show that it worked.

1. sample training prompts and generate K images per prompt with the shipped base model (`assets/toy/t2i`);
2. label every pair with the simulated annotator (Bradley-Terry on the ground-truth reward) and write shards;
3. train Diffusion-DPO with LoRA through `mmalign.train` (the trainer and recipe format users run on SDXL);
4. evaluate base and aligned models on held-out prompts at equal seeds: mean ground-truth rewards, win rate with
   a 95% confidence interval (ties within 0.05 worth 1/2) and drift from the base;
5. write `report.md`, `report.json`, `grid.png`, `samples/` next to the training run (`train/`: config, metrics,
   LoRA) in the output folder.

Everything is seeded; `key=value` arguments override the training recipe (`train.max_steps=100`,
`method.beta=5000`, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmalign.toy.recipe import BASE_MODEL, training_config

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--base", default=str(BASE_MODEL), help="base pipeline folder (default: the shipped toy "
                                                                "model in assets/toy/t2i)")
    parser.add_argument("--prompts", type=int, default=300, help="training prompts (default 300)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="K images per prompt; every pair of "
                                                                        "them is labelled (default 4)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts, one image per model each "
                                                                     "(default 256)")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps for every generation (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="annotator and training seed (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override the training recipe")


def run(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError
    from mmalign.train.trainer import TrainingError

    if not (Path(args.base) / "model_index.json").is_file():
        print(f"mmalign quickstart: no base model at {args.base} (expected a diffusers pipeline folder with "
              "model_index.json; the repository ships one in assets/toy/t2i, made by "
              "scripts/pretrain_toy_t2i.py)", file=sys.stderr)
        return 2
    for name in ("prompts", "images_per_prompt", "eval_prompts", "sample_steps"):
        if getattr(args, name) < (2 if name != "sample_steps" else 1):
            print(f"mmalign quickstart: --{name.replace('_', '-')} must be at least 2", file=sys.stderr)
            return 2
    try:
        report = quickstart(Path(args.out), args.base, args.prompts, args.images_per_prompt, args.eval_prompts,
                            args.sample_steps, args.seed, args.overrides)
    except (ConfigError, TrainingError) as err:
        print(f"mmalign quickstart: {err}", file=sys.stderr)
        return 2
    ev = report["eval"]
    wr = ev["win_rate"]
    print(f"\nbase -> aligned on {ev['n']} held-out prompts (same seeds): colour adherence "
          f"{ev['base']['color']:.3f} -> {ev['aligned']['color']:.3f} ({ev['gain']['color']:+.3f}), total reward "
          f"{ev['base']['total']:.3f} -> {ev['aligned']['total']:.3f}; win rate {wr['value']:.3f} "
          f"(95% CI {wr['ci95'][0]:.3f}-{wr['ci95'][1]:.3f}); drift {ev['drift']:.1f} RGB units")
    print(f"report: {Path(args.out) / 'report.md'}   grid: {Path(args.out) / 'grid.png'}")
    return 0


def score_notes(images, prompts) -> list[str]:
    """Each image's ground-truth scores, as the grid's captions show them."""
    from mmalign.toy import experiment as ex

    r = ex.rewards(images, prompts)
    return [f"colour {r['color'][i]:.2f} total {r['total'][i]:.2f}" for i in range(len(prompts))]


def quickstart(out: Path, base: str, n_prompts: int, k: int, n_eval: int, sample_steps: int, seed: int,
               overrides: list[str]) -> dict:
    """Run the five stages; returns the report (also written to `out/report.json`)."""
    from mmalign.toy import experiment as ex
    from mmalign.toy.pipeline import ToyT2IPipeline
    from mmalign.toy.scenes import prompt_seed_pairs
    from mmalign.train.trainer import train

    cfg = training_config(out, base, seed, overrides, out / "data" / "pairs")  # fail on bad overrides first
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"[1/5] generating {n_prompts} prompts x {k} images with the base model ({base})")
    pipe = ToyT2IPipeline.from_pretrained(base)
    train_pairs = prompt_seed_pairs("train", n_prompts)
    prompts = [p for p, s in train_pairs for _ in range(k)]
    seeds = [ex.image_seed(s, j) for _, s in train_pairs for j in range(k)]
    images = ex.generate(pipe, prompts, seeds, sample_steps, desc="generate")
    timings["generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[2/5] labelling every pair with the simulated annotator -> {out / 'data'}")
    data_stats = ex.write_preference_data(images, [p for p, _ in train_pairs], seeds, k, out / "data",
                                          ex.Annotator(seed=seed))
    print(f"      {data_stats['pairs']} pairs, {data_stats['ties']} ties (dropped by the recipe), annotator "
          f"agreement with the ground truth {data_stats['annotator_agreement']:.3f}")
    timings["label_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[3/5] Diffusion-DPO with LoRA, {cfg.train.max_steps} steps -> {cfg.run.output_dir}")
    result = train(cfg)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[4/5] evaluating base and aligned on {n_eval} held-out prompts at equal seeds")
    aligned = ToyT2IPipeline.from_pretrained(base)
    aligned.load_lora_weights(result.outputs["lora"])  # the saved LoRA, loaded the way users load it
    heldout = prompt_seed_pairs("heldout", n_eval)
    eval_prompts, eval_seeds = [p for p, _ in heldout], [s for _, s in heldout]
    base_images = ex.generate(pipe, eval_prompts, eval_seeds, sample_steps, desc="evaluate base")
    aligned_images = ex.generate(aligned, eval_prompts, eval_seeds, sample_steps, desc="evaluate aligned")
    evaluation = ex.compare(base_images, aligned_images, eval_prompts)
    timings["evaluate_s"] = time.perf_counter() - t0

    print(f"[5/5] writing the report -> {out}")
    ex.write_samples(out, base_images, aligned_images, eval_prompts, eval_seeds)
    rows = min(8, n_eval // 4) or 1
    ex.side_by_side_grid(base_images, aligned_images, rows=rows, cols=min(4, n_eval), captions=eval_prompts,
                         base_notes=score_notes(base_images, eval_prompts),
                         aligned_notes=score_notes(aligned_images, eval_prompts)).save(out / "grid.png")
    from mmalign.train.metrics import read_metrics

    metrics = read_metrics(result.run_dir)
    report = {"eval": evaluation, "data": data_stats,
              "train": {"steps": result.global_step, "first": metrics[0] if metrics else {},
                        "last": metrics[-1] if metrics else {}, "run_dir": result.run_dir,
                        "lora": result.outputs["lora"]},
              "settings": {"base": base, "prompts": n_prompts, "images_per_prompt": k, "eval_prompts": n_eval,
                           "sample_steps": sample_steps, "seed": seed, "overrides": list(overrides)},
              "expected": {"win_rate_at_least": 0.65, "color_gain_at_least": 0.10},
              "timings": {k2: round(v, 1) for k2, v in timings.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(r: dict) -> str:
    ev, d, tr, t = r["eval"], r["data"], r["train"], r["timings"]
    wr, cwr = ev["win_rate"], ev["color_win_rate"]
    rows = "\n".join(f"| {name} | {ev['base'][name]:.3f} | {ev['aligned'][name]:.3f} | {ev['gain'][name]:+.3f} |"
                     for name in ("color", "shape", "position", "total"))
    ok_w = wr["value"] >= r["expected"]["win_rate_at_least"]
    ok_c = ev["gain"]["color"] >= r["expected"]["color_gain_at_least"]
    last = tr["last"]
    return f"""# mmalign quickstart report

Diffusion-DPO with LoRA on the toy world's base model, judged by the ground-truth reward on {ev['n']} held-out
prompts (one image per prompt and model, the same seed for both).

| reward | base | aligned | gain |
|---|---|---|---|
{rows}

- **Win rate** of aligned over base on the total reward: **{wr['value']:.3f}** (95% CI {wr['ci95'][0]:.3f}-{wr['ci95'][1]:.3f};
  {wr['wins']} wins, {wr['ties']} ties, {wr['losses']} losses; a difference within {wr['tie_tolerance']} is a tie worth 1/2).
  On colour adherence alone: {cwr['value']:.3f} (95% CI {cwr['ci95'][0]:.3f}-{cwr['ci95'][1]:.3f}).
- **Drift** from the base: {ev['drift']:.1f} (mean RGB distance per pixel at equal seeds, 0-255 units).
- Expected: win rate >= {r['expected']['win_rate_at_least']} ({'met' if ok_w else 'NOT met'}), colour adherence
  up by >= {r['expected']['color_gain_at_least']} ({'met' if ok_c else 'NOT met'}).

![base (left) vs aligned (right), same seeds](grid.png)

`grid.png`: base model on the left, aligned model on the right, same prompts and seeds in the same places; under
each image its prompt and its ground-truth colour and total rewards.
Every evaluated image is in `samples/base/` and `samples/aligned/`; `samples/prompts.jsonl` gives each file's
prompt and seed.

## Data
{d['prompts']} prompts x {d['images'] // max(d['prompts'], 1)} images from the base model; every pair labelled by the simulated
annotator: {d['pairs']} pairs, {d['ties']} ties (dropped), annotator agreement with the ground truth
{d['annotator_agreement']:.3f}. Shards in `data/pairs/`.

## Training
{tr['steps']} steps; last logged step: loss {last.get('loss', float('nan')):.4f}, implicit accuracy
{last.get('rewards/accuracies', float('nan')):.3f}. Run folder `{tr['run_dir']}` (config.yaml, metrics.jsonl,
TensorBoard in tb/, validation grids in samples/); LoRA weights in `{tr['lora']}` (load with
`ToyT2IPipeline.from_pretrained(base).load_lora_weights(folder)`).

## Time
generate {t['generate_s']:.0f} s, label {t['label_s']:.0f} s, train {t['train_s']:.0f} s, evaluate {t['evaluate_s']:.0f} s.
"""
