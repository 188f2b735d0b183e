"""`mmalign eval vlm-toy`: the toy proof of VLM preference training with self-generated data (issue 8).

Per seed: the shipped toy VLM (`assets/toy/vlm`, or `--model`) makes STIC pairs from unlabeled toy scenes (chosen:
the step-by-step prompt on the clean image; rejected: the plain prompt on a hue-shifted image) and BDHS pairs from
toy scenes with noisy captions as chosen answers (rejected: 99% of image tokens hidden). On each pair set it trains
DPO with an SFT term (`configs/vlm/toy_*_dpo.yaml` settings) and the SFT-only control on the same chosen answers
(`toy_sft.yaml`), through the one training loop. The DPO runs read reference log-probs precomputed once per pair
set (`--reference precomputed`, the default: the same numbers as a frozen copy without its forward each step; the
prototype in TOY-NOTES trained this way) or run a frozen copy (`--reference copy`, the toy recipes' setting).
Every model, and the base, is evaluated on the same held-out scenes (`mmalign.vlm.toy.evaluate_toy`: greedy and
sampling-based colour hallucination, per true colour too, shape and position accuracy, well-formed captions).
Writes `report.json` and `report.md` (mean and standard deviation over seeds, what each pair set's rejected
captions change, and seconds per training step).

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


def make_pairs(model: str, out: Path, kind: str, n: int, seed: int, batch_size: int = 64,
               bdhs_threshold: float = 0.97) -> dict:
    """STIC or BDHS pairs of the toy VLM into `out` (vlm_pair shards; the counts go to its manifest)."""
    from mmalign.vlm.adapter import load_vlm
    from mmalign.selfgen.corrupt import Corruption
    from mmalign.vlm.stic import STICConfig, stic_pairs, toy_image_items, write_pairs
    from mmalign.vlm.toy import TOY_PLAIN_PROMPT, TOY_STEP_PROMPT

    adapter = load_vlm(model)
    if kind == "stic":
        cfg = STICConfig(describe_prompts=(TOY_STEP_PROMPT,), corrupted_prompts=(TOY_PLAIN_PROMPT,),
                         pair_prompts=(TOY_PLAIN_PROMPT,), hallucination_prob=0.0,
                         corruptions=(Corruption.parse("jitter:brightness=0,hue=0.5,hue_min=0.15"),),
                         max_new_tokens=10, batch_size=batch_size, seed=seed)
        samples = stic_pairs(adapter, toy_image_items(n, seed=1000 + seed), cfg)
    else:
        from mmalign.vlm.bdhs import BDHSConfig, bdhs_pairs, toy_rows
        from mmalign.selfgen.embed import load_embedder

        cfg = BDHSConfig(rho=0.99, similarity_threshold=bdhs_threshold, max_new_tokens=10, batch_size=batch_size,
                         seed=seed)
        samples = bdhs_pairs(adapter, toy_rows(n, seed=2000 + seed, p_true=0.6), cfg, load_embedder("vlm", adapter))
    write_pairs(str(out), samples, {"from": f"selfgen {kind} (toy proof)", "seed": seed, "counts": cfg.counts},
                overwrite=True)
    return dict(cfg.counts)


def train_one(model: str, shards: Path, run_dir: Path, method: dict, seed: int, max_steps: int,
              reference: str = "precomputed") -> str:
    """Train one toy run; its wall time and steady seconds per step go to `run_dir/timing.json`."""
    from mmalign.config import atomic_write_text
    from mmalign.train.metrics import read_metrics
    from mmalign.train.tasks import load_train_config, task_for
    from mmalign.train.trainer import train

    data = {"task": "vlm", "run": {"output_dir": str(run_dir), "seed": seed, "overwrite": True},
            "model": {"pretrained": model, "reference": reference}, "method": method,
            "data": {"shards": str(shards), "shuffle_buffer": 1000},
            "optim": TOY_TRAIN["optim"], "train": {**TOY_TRAIN["train"], "max_steps": max_steps}}
    cfg = load_train_config(None, defaults=data)
    t0 = time.perf_counter()
    if method["name"] == "dpo" and reference == "precomputed":
        try:
            task_for(cfg).build_cache()
        except FileExistsError:  # built by the other run on these pairs; keyed by model and processor
            pass
    t1 = time.perf_counter()
    result = train(cfg)
    t2 = time.perf_counter()
    rows = read_metrics(result.run_dir)[1:]  # the first window holds start-up
    batch = TOY_TRAIN["train"]["batch_size"]
    steady = statistics.fmean(batch / r["samples_per_s"] for r in rows) if rows else None
    timing = {"steps": result.global_step, "reference": reference if method["name"] == "dpo" else "none",
              "cache_seconds": t1 - t0, "train_seconds": t2 - t1, "s_per_step_steady": steady}
    atomic_write_text(run_dir / "timing.json", json.dumps(timing, indent=1) + "\n")
    return result.outputs["model"]


def pair_differences(shards: Path) -> dict[str, Any]:
    from mmalign.data.dataset import VLMPairDataset
    from mmalign.vlm.toy import pair_differences as differences

    samples = list(VLMPairDataset(str(shards), decode_images=False, strict=True))
    return differences([s["chosen"] for s in samples], [s["rejected"] for s in samples])


def evaluate(model: str, scenes, cache: Path) -> dict[str, float]:
    """Metrics of `model` on `scenes`, kept in `cache` (JSON) so an interrupted proof resumes where it stopped."""
    from mmalign.vlm.adapter import load_vlm
    from mmalign.config import atomic_write_text
    from mmalign.vlm.toy import evaluate_toy

    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("n") == len(scenes):
            return saved
    t0 = time.perf_counter()
    metrics = evaluate_toy(load_vlm(model), scenes)
    metrics["seconds"] = time.perf_counter() - t0
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
        if all("hallucination_greedy_by_colour" in r for r in runs):
            row["hallucination_greedy_by_colour"] = {
                c: statistics.fmean(r["hallucination_greedy_by_colour"][c] for r in runs)
                for c in runs[0]["hallucination_greedy_by_colour"]}
        out[name] = row
    if "hallucination_greedy_by_colour" in base:
        out["base"]["hallucination_greedy_by_colour"] = base["hallucination_greedy_by_colour"]
    return out


def markdown(summary: dict[str, Any], n_scenes: int, seeds: list[int], differences: dict | None = None,
             timings: dict | None = None) -> str:
    lines = [f"Toy VLM proof: {n_scenes} held-out scenes, seeds {seeds} (mean ± sd over seeds)", "",
             "| model | halluc. greedy | halluc. sampled | shape | position | well-formed |",
             "|---|---|---|---|---|---|"]
    base = summary["base"]
    lines.append("| base | " + " | ".join(f"{100 * base[k]:.1f}" for k in METRICS) + " |")
    for name, row in summary.items():
        if name == "base":
            continue
        cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['sd']:.1f}" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, greedy hallucination (%): " + "; ".join(
        f"{name} " + " / ".join(f"{100 * v:.1f}" for v in row["hallucination_greedy"]["values"])
        for name, row in summary.items() if name != "base")]
    colours = base.get("hallucination_greedy_by_colour")
    if colours:
        lines += ["", "Greedy hallucination by true colour (%, mean over seeds):", "",
                  "| model | " + " | ".join(colours) + " |", "|---" * (len(colours) + 1) + "|",
                  "| base | " + " | ".join(f"{100 * v:.1f}" for v in colours.values()) + " |"]
        for name, row in summary.items():
            if name != "base" and "hallucination_greedy_by_colour" in row:
                by = row["hallucination_greedy_by_colour"]
                lines.append(f"| {name} | " + " | ".join(f"{100 * by[c]:.1f}" for c in colours) + " |")
    if differences:
        lines += ["", "What the rejected captions change (% of pairs; rejected colours: among colour changes):", ""]
        for name, d in differences.items():
            top = ", ".join(f"{c} {100 * v:.0f}" for c, v in d["rejected_colours"].items())
            lines.append(f"- {name}: colour {100 * d['colour']:.0f}, shape {100 * d['shape']:.0f}, position "
                         f"{100 * d['position']:.0f}, colour only {100 * d['colour_only']:.0f}; rejected colours "
                         f"{top} ({d['n_parsed']} of {d['n']} pairs parse)")
    if timings:
        per_run: dict[str, list[float]] = {}
        for key, t in timings.items():
            if t.get("s_per_step_steady") is not None:
                per_run.setdefault(key.split("/")[0], []).append(t["s_per_step_steady"])
        lines += ["", "Seconds per training step (steady, after start-up; mean over seeds): " + "; ".join(
            f"{name} {statistics.fmean(v):.3f}" for name, v in sorted(per_run.items()))]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="toy VLM folder (default: the shipped one)")
    parser.add_argument("--out", default="runs/toy_vlm/proof")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=1024, help="pairs generated per seed and method")
    parser.add_argument("--eval-scenes", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=TOY_TRAIN["train"]["max_steps"])
    parser.add_argument("--methods", nargs="+", default=["stic", "bdhs"], choices=["stic", "bdhs"])
    parser.add_argument("--reference", default="precomputed", choices=["precomputed", "copy"],
                        help="DPO reference: log-probs precomputed once per pair set (default) or a frozen copy")
    # The toy model is too small for intra-op threads to pay off; on a shared CPU two threads ran 2-3x slower in
    # wall time than one (a thread that loses its core stalls the other at every op).
    parser.add_argument("--bdhs-threshold", type=float, default=0.97,
                        help="BDHS semantic filter: resample a rejected answer whose cosine to the chosen is >= this "
                             "(0.97, the issue's setting; a diagnostic knob, not a tuned one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's choice)")


def run(args: argparse.Namespace) -> int:
    from mmalign.config import atomic_write_text
    from mmalign.vlm.toy import heldout_scenes

    if args.eval_scenes < 1:
        print("mmalign eval vlm-toy: --eval-scenes must be >= 1", file=sys.stderr)
        return 2
    if args.threads < 0:
        print("mmalign eval vlm-toy: --threads must be >= 0 (0 = torch's default)", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = heldout_scenes(args.eval_scenes)
    t0 = time.perf_counter()
    base = evaluate(args.model, scenes, out / "base_eval.json")
    print(f"base: {json.dumps({k: round(base[k], 4) for k in METRICS})}", flush=True)
    results: dict[str, list[dict]] = {}
    counts: dict[str, Any] = {}
    differences: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for seed in args.seeds:
        for kind in args.methods:
            shards = out / f"seed{seed}" / f"{kind}_pairs"
            if not (shards / "manifest.json").is_file():
                make_pairs(args.model, shards, kind, args.pairs, seed, bdhs_threshold=args.bdhs_threshold)
            counts[f"{kind}/seed{seed}"] = json.loads((shards / "manifest.json").read_text())["num_samples"]
            differences[f"{kind}/seed{seed}"] = pair_differences(shards)
            for variant, method in TOY_METHODS.items():
                run_dir = out / f"seed{seed}" / f"{kind}_{variant}"
                eval_cache = run_dir / f"eval-{args.eval_scenes}-steps{args.max_steps}.json"
                model = str(run_dir / "model")
                if not eval_cache.is_file():
                    model = train_one(args.model, shards, run_dir, method, seed, args.max_steps, args.reference)
                metrics = evaluate(model, scenes, eval_cache)
                if (run_dir / "timing.json").is_file():
                    timings[f"{kind}_{variant}/seed{seed}"] = json.loads((run_dir / "timing.json").read_text())
                results.setdefault(f"{kind}_{variant}", []).append(metrics)
                print(f"seed {seed} {kind} {variant}: {json.dumps({k: round(metrics[k], 4) for k in METRICS})}",
                      flush=True)
    summary = summarise(results, base)
    report = {"summary": summary, "eval_scenes": args.eval_scenes, "seeds": args.seeds, "pairs": args.pairs,
              "max_steps": args.max_steps, "reference": args.reference, "threads": args.threads,
              "bdhs_threshold": args.bdhs_threshold,
              "pairs_written": counts,
              "pair_differences": differences, "timings": timings, "seconds": time.perf_counter() - t0,
              "model": args.model}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    text = markdown(summary, args.eval_scenes, args.seeds, differences, timings)
    atomic_write_text(out / "report.md", text)
    print(text)
    return 0
