"""`mmalign bench toy`: every text-to-image method on the same toy data, over several seeds.

One set of generated images (K per prompt, from the shipped base model) is labelled once: every pair by the
simulated annotator (`pair` shards, for sft / dpo / mapo) and every list ranked by it (`ranked` shards, for
rankdpo). Each method then trains with the quickstart's LoRA recipe, changing only `method.name` (rankdpo uses
half the lists per batch so every method sees the same number of images per step), and is evaluated against the
base on the same held-out prompts and seeds. The table shows reward gain, win rate and drift side by side: the
reward-vs-drift trade-off is the point, and SFT on winners is a strong baseline on this nearly binary reward.

Writes `bench.json`, `bench.md` (the table) and `bench.png` (reward gain against drift, one point per run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("sft", "dpo", "mapo", "rankdpo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmalign.toy.recipe import BASE_MODEL

    parser.add_argument("--out", default="runs/bench-toy", help="output folder (default: runs/bench-toy)")
    parser.add_argument("--base", default=str(BASE_MODEL), help="base pipeline folder (default: assets/toy/t2i)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method (default 3)")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override the shared training recipe (e.g. train.max_steps=100)")


def run(args: argparse.Namespace) -> int:
    from mmalign.cli import comma_choices

    try:
        methods = comma_choices("--methods", args.methods, METHODS)
    except ValueError as err:
        print(f"mmalign bench toy: {err}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("mmalign bench toy: --seeds must be at least 1", file=sys.stderr)
        return 2
    if not (Path(args.base) / "model_index.json").is_file():
        print(f"mmalign bench toy: no base model at {args.base} (expected model_index.json)", file=sys.stderr)
        return 2
    result = bench(Path(args.out), args.base, methods, args.seeds, args.prompts, args.images_per_prompt,
                   args.eval_prompts, args.sample_steps, args.overrides)
    print("\n" + result["table"])
    print(f"\n{Path(args.out) / 'bench.md'}, {Path(args.out) / 'bench.png'}")
    return 0


def method_overrides(method: str, out: Path, batch_size: int, images_per_prompt: int) -> list[str]:
    """The recipe changes for one method: its name, and for rankdpo the ranked shards with the same images/step."""
    if method == "rankdpo":
        lists = max(1, batch_size * 2 // images_per_prompt)
        return ["method.name=rankdpo", "data.schema=ranked", f"data.shards={out / 'data' / 'ranked'}",
                f"train.batch_size={lists}"]
    return [f"method.name={method}"]


def make_pool(pipe, out: Path, n_prompts: int, k: int, sample_steps: int) -> dict:
    """The shared preference data: `k` base images for each of `n_prompts` train-split prompts, every pair labelled
    (`out/pairs`) and every list ranked (`out/ranked`) by the simulated annotator (seed 0). Returns its counts."""
    from mmalign.toy import experiment as ex
    from mmalign.toy.scenes import prompt_seed_pairs

    train_pairs = prompt_seed_pairs("train", n_prompts)
    seeds = [ex.image_seed(s, j) for _, s in train_pairs for j in range(k)]
    images = ex.generate(pipe, [p for p, _ in train_pairs for _ in range(k)], seeds, sample_steps,
                         desc="generate data")
    return ex.write_preference_data(images, [p for p, _ in train_pairs], seeds, k, out, ex.Annotator(seed=0),
                                    ranked=True)


def bench(out: Path, base: str, methods: list[str], n_seeds: int, n_prompts: int, k: int, n_eval: int,
          sample_steps: int, overrides: list[str]) -> dict:
    from mmalign.toy.recipe import training_config
    from mmalign.toy import experiment as ex
    from mmalign.toy.pipeline import ToyT2IPipeline
    from mmalign.toy.scenes import prompt_seed_pairs
    from mmalign.train.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    shared = training_config(out, base, 0, list(overrides), out / "data" / "pairs")  # validate overrides early
    pipe = ToyT2IPipeline.from_pretrained(base)
    data_stats = make_pool(pipe, out / "data", n_prompts, k, sample_steps)
    heldout = prompt_seed_pairs("heldout", n_eval)
    eval_prompts, eval_seeds = [p for p, _ in heldout], [s for _, s in heldout]
    base_images = ex.generate(pipe, eval_prompts, eval_seeds, sample_steps, desc="evaluate base")

    runs = []
    for method in methods:
        for seed in range(n_seeds):
            t0 = time.perf_counter()
            extra = method_overrides(method, out, shared.train.batch_size, k)
            cfg = training_config(out / "runs" / f"{method}-seed{seed}", base, seed, [*overrides, *extra],
                                  out / "data" / "pairs")
            result = train(cfg)
            aligned = ToyT2IPipeline.from_pretrained(base)
            aligned.load_lora_weights(result.outputs["lora"])
            aligned_images = ex.generate(aligned, eval_prompts, eval_seeds, sample_steps,
                                         desc=f"evaluate {method} seed {seed}")
            ev = ex.compare(base_images, aligned_images, eval_prompts)
            runs.append({"method": method, "seed": seed, "reward_gain": ev["gain"]["total"],
                         "color_gain": ev["gain"]["color"], "win_rate": ev["win_rate"]["value"],
                         "win_rate_ci95": ev["win_rate"]["ci95"], "drift": ev["drift"],
                         "aligned": ev["aligned"], "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{method} seed {seed}: reward gain {ev['gain']['total']:+.3f}, win rate "
                  f"{ev['win_rate']['value']:.3f}, drift {ev['drift']:.1f}")
    summary = summarize(runs)
    table = markdown_table(summary, n_seeds)
    report = {"base": ex.rewards(base_images, eval_prompts)["total"].mean(), "data": data_stats, "runs": runs,
              "summary": summary, "settings": {"prompts": n_prompts, "images_per_prompt": k, "eval_prompts": n_eval,
                                               "sample_steps": sample_steps, "overrides": list(overrides),
                                               "seeds": n_seeds}}
    report["base"] = float(report["base"])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(f"# mmalign bench toy\n\n{table}\n\nBase model total reward {report['base']:.3f} on "
                                  f"{n_eval} held-out prompts; mean ± standard deviation over {n_seeds} seeds.\n")
    plot(runs, out / "bench.png")
    report["table"] = table
    return report


def summarize(runs: list[dict], by: str = "method") -> dict[str, dict[str, list[float]]]:
    """Per value of `by` (the method; a condition elsewhere): [mean, standard deviation] over seeds of reward
    gain, colour gain, win rate and drift."""
    out: dict[str, dict[str, list[float]]] = {}
    for group in dict.fromkeys(r[by] for r in runs):
        rows = [r for r in runs if r[by] == group]
        out[group] = {key: [float(np.mean([r[key] for r in rows])),
                            float(np.std([r[key] for r in rows], ddof=1)) if len(rows) > 1 else 0.0]
                      for key in ("reward_gain", "color_gain", "win_rate", "drift")}
    return out


def markdown_table(summary: dict, n_seeds: int) -> str:
    lines = ["| method | reward gain | colour gain | win rate vs base | drift (RGB units) |", "|---|---|---|---|---|"]
    for method, s in summary.items():
        cells = [f"{s[k][0]:+.3f} ± {s[k][1]:.3f}" if k.endswith("gain") else f"{s[k][0]:.3f} ± {s[k][1]:.3f}"
                 for k in ("reward_gain", "color_gain", "win_rate")]
        cells.append(f"{s['drift'][0]:.1f} ± {s['drift'][1]:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Reward gain (y) against drift from the base (x), one marker per run, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        ax.scatter([r["drift"] for r in rows], [r["reward_gain"] for r in rows], label=method, s=30)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("drift from base (mean RGB distance at equal seeds)")
    ax.set_ylabel("ground-truth reward gain")
    ax.set_title("toy world: reward vs drift")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
