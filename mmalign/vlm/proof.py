"""`mmalign eval vlm-toy`: the toy proof of VLM preference training with self-generated data (issue 8).

Per seed: the shipped toy VLM (`assets/toy/vlm`, or `--model`) makes STIC pairs from unlabeled toy scenes (chosen:
the step-by-step prompt on the clean image; rejected: the plain prompt on a hue-shifted image) and BDHS pairs from
toy scenes with noisy captions as chosen answers (rejected: 99% of image tokens hidden). On each pair set it trains
DPO with an SFT term (`configs/vlm/toy_*_dpo.yaml` settings) and the SFT-only control on the same chosen answers
(`toy_sft.yaml`), through the one training loop. Every model, and the base, is evaluated on the same held-out
scenes (`mmalign.vlm.toy.evaluate_toy`: greedy and sampling-based colour hallucination, shape and position
accuracy, well-formed captions). Writes `report.json` and `report.md` (mean and standard deviation over seeds).

    mmalign eval vlm-toy --out runs/toy_vlm/proof --seeds 0 1 2 --eval-scenes 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "toy" / "vlm"
METRICS = ("hallucination_greedy", "hallucination_sampled", "shape_accuracy", "position_accuracy",
           "format_validity")
# The toy recipes' settings (configs/vlm/toy_stic_dpo.yaml, toy_bdhs_dpo.yaml, toy_sft.yaml).
TOY_TRAIN = {"optim": {"lr": 1e-4, "lr_scheduler": "constant", "weight_decay": 0.0},
             "train": {"max_steps": 300, "batch_size": 16, "log_every": 10, "progress": False}}
TOY_METHODS = {"dpo_sft": {"name": "dpo", "beta": 0.5, "sft_weight": 1.0, "sft_reduction": "mean"},
               "sft_only": {"name": "sft", "sft_reduction": "mean"}}


def make_pairs(model: str, out: Path, kind: str, n: int, seed: int, batch_size: int = 64) -> dict:
    """STIC or BDHS pairs of the toy VLM into `out` (vlm_pair shards; the counts go to its manifest)."""
    from mmalign.adapters.vlm import load_vlm
    from mmalign.selfgen.corrupt import Corruption
    from mmalign.selfgen.stic import STICConfig, stic_pairs, toy_image_items, write_pairs
    from mmalign.vlm.toy import TOY_PLAIN_PROMPT, TOY_STEP_PROMPT

    adapter = load_vlm(model)
    if kind == "stic":
        cfg = STICConfig(describe_prompts=(TOY_STEP_PROMPT,), corrupted_prompts=(TOY_PLAIN_PROMPT,),
                         pair_prompts=(TOY_PLAIN_PROMPT,), hallucination_prob=0.0,
                         corruptions=(Corruption.parse("jitter:brightness=0,hue=0.5,hue_min=0.15"),),
                         max_new_tokens=10, batch_size=batch_size, seed=seed)
        samples = stic_pairs(adapter, toy_image_items(n, seed=1000 + seed), cfg)
    else:
        from mmalign.selfgen.bdhs import BDHSConfig, bdhs_pairs, toy_rows
        from mmalign.selfgen.embed import load_embedder

        cfg = BDHSConfig(rho=0.99, max_new_tokens=10, batch_size=batch_size, seed=seed)
        samples = bdhs_pairs(adapter, toy_rows(n, seed=2000 + seed, p_true=0.6), cfg, load_embedder("vlm", adapter))
    write_pairs(str(out), samples, {"from": f"selfgen {kind} (toy proof)", "seed": seed, "counts": cfg.counts},
                overwrite=True)
    return dict(cfg.counts)


def train_one(model: str, shards: Path, run_dir: Path, method: dict, seed: int, max_steps: int) -> str:
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    data = {"task": "vlm", "run": {"output_dir": str(run_dir), "seed": seed, "overwrite": True},
            "model": {"pretrained": model, "reference": "copy"}, "method": method,
            "data": {"shards": str(shards), "shuffle_buffer": 1000},
            "optim": TOY_TRAIN["optim"], "train": {**TOY_TRAIN["train"], "max_steps": max_steps}}
    return train(load_train_config(None, defaults=data)).outputs["model"]


def evaluate(model: str, scenes, cache: Path) -> dict[str, float]:
    """Metrics of `model` on `scenes`, kept in `cache` (JSON) so an interrupted proof resumes where it stopped."""
    from mmalign.adapters.vlm import load_vlm
    from mmalign.config import atomic_write_text
    from mmalign.vlm.toy import evaluate_toy

    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("n") == len(scenes):
            return saved
    metrics = evaluate_toy(load_vlm(model), scenes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(metrics, indent=1) + "\n")
    return metrics


def summarise(results: dict[str, list[dict]], base: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"base": {k: base[k] for k in METRICS}}
    for name, runs in results.items():
        row = {}
        for k in METRICS:
            values = [r[k] for r in runs]
            row[k] = {"mean": statistics.fmean(values),
                      "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        h0 = base["hallucination_greedy"]
        row["hallucination_greedy_relative_change"] = (row["hallucination_greedy"]["mean"] - h0) / h0 if h0 else None
        out[name] = row
    return out


def markdown(summary: dict[str, Any], n_scenes: int, seeds: list[int]) -> str:
    lines = [f"Toy VLM proof: {n_scenes} held-out scenes, seeds {seeds} (mean ± sd over seeds)", "",
             "| model | halluc. greedy | halluc. sampled | shape | position | well-formed |", "|---|---|---|---|---|---|"]
    base = summary["base"]
    lines.append("| base | " + " | ".join(f"{100 * base[k]:.1f}" for k in METRICS) + " |")
    for name, row in summary.items():
        if name == "base":
            continue
        cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['sd']:.1f}" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="toy VLM folder (default: the shipped one)")
    parser.add_argument("--out", default="runs/toy_vlm/proof")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=1024, help="pairs generated per seed and method")
    parser.add_argument("--eval-scenes", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=TOY_TRAIN["train"]["max_steps"])
    parser.add_argument("--methods", nargs="+", default=["stic", "bdhs"], choices=["stic", "bdhs"])


def run(args: argparse.Namespace) -> int:
    from mmalign.config import atomic_write_text
    from mmalign.vlm.toy import heldout_scenes

    if args.eval_scenes < 1:
        print("mmalign eval vlm-toy: --eval-scenes must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = heldout_scenes(args.eval_scenes)
    t0 = time.perf_counter()
    base = evaluate(args.model, scenes, out / "base_eval.json")
    print(f"base: {json.dumps({k: round(base[k], 4) for k in METRICS})}", flush=True)
    results: dict[str, list[dict]] = {}
    counts: dict[str, Any] = {}
    for seed in args.seeds:
        for kind in args.methods:
            shards = out / f"seed{seed}" / f"{kind}_pairs"
            if not (shards / "manifest.json").is_file():
                make_pairs(args.model, shards, kind, args.pairs, seed)
            counts[f"{kind}/seed{seed}"] = json.loads((shards / "manifest.json").read_text())["num_samples"]
            for variant, method in TOY_METHODS.items():
                run_dir = out / f"seed{seed}" / f"{kind}_{variant}"
                eval_cache = run_dir / f"eval-{args.eval_scenes}-steps{args.max_steps}.json"
                model = str(run_dir / "model")
                if not eval_cache.is_file():
                    model = train_one(args.model, shards, run_dir, method, seed, args.max_steps)
                metrics = evaluate(model, scenes, eval_cache)
                results.setdefault(f"{kind}_{variant}", []).append(metrics)
                print(f"seed {seed} {kind} {variant}: {json.dumps({k: round(metrics[k], 4) for k in METRICS})}",
                      flush=True)
    summary = summarise(results, base)
    report = {"summary": summary, "eval_scenes": args.eval_scenes, "seeds": args.seeds, "pairs": args.pairs,
              "max_steps": args.max_steps, "pairs_written": counts, "seconds": time.perf_counter() - t0,
              "model": args.model}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", markdown(summary, args.eval_scenes, args.seeds))
    print(markdown(summary, args.eval_scenes, args.seeds))
    return 0
