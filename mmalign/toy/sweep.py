"""`mmalign bench toy-sweep`: the fair method table of the image toy world.

`mmalign bench toy` trains every method with one shared lr and β. Here every method gets the same small budget
of settings, chosen on a validation split and reported on the held-out split:

1. **Data.** The same preference pool as `mmalign bench toy` (`bench.make_pool`: K base images per train prompt,
   every pair labelled and every list ranked by the simulated annotator). SPO learns from the same labels through
   a step-aware preference model (SPM, `model.kind: step_aware`) trained on those pairs, then samples online
   (`task: spo_online`), as SPO does; its training budget includes the SPM's.
2. **Sweep.** Each method trains seed 0 at every (β, lr) of its grid (`BETAS` x `LRS`: 3 x 2; SFT has no β, so
   2), with the quickstart's LoRA recipe otherwise unchanged, and is scored against the base on the validation
   split (`prompt_seed_pairs("val")`: seeds no training image or held-out prompt uses).
3. **Report.** The setting with the highest validation reward gain is re-trained on seeds 1 and 2; the three
   seeds are evaluated on the held-out split: reward and colour gain, win rate with a 95% CI over all seeds'
   comparisons, drift, training wall time and UNet passes.
4. **Compute.** Seeds 1 and 2 of `--curve-methods` (default DPO and SPO) train in stages (`--curve-steps`,
   resumed exactly from each stage's checkpoint) with a held-out evaluation after each, giving gain against
   training compute on one plot (`compute.png`).

UNet passes are counted by a forward hook on every `UNet2DConditionModel` call during training, in samples (a
batch of 16 is 16), split into passes with autograd (policy forwards, each followed by a backward) and without
(reference passes, sampling and scoring). `forward-equivalents = no-grad + 3 x grad` (a backward costs about two
forwards). Generating the shared pool (K x prompts x sample steps) is counted once, apart.

Writes `sweep.json`, `sweep.md` (the tables), `compute.png` and `bench.png` (gain against drift).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

METHODS = ("sft", "dpo", "mapo", "rankdpo", "spo")
LRS = (1e-4, 5e-4)
BETAS: dict[str, tuple[Optional[float], ...]] = {
    "sft": (None,),                     # no β: 2 settings
    "dpo": (500.0, 2000.0, 5000.0),     # Diffusion-DPO's paper: 2500 (SD 1.5), 5000 (SDXL)
    "mapo": (0.03, 0.1, 0.3),           # MaPO's paper: 0.1
    "rankdpo": (500.0, 2000.0, 5000.0),  # the DPO scale (RankDPO's DCG weights multiply it)
    "spo": (3.0, 10.0, 30.0),           # SPO's paper: 10
}

# SPO on the toy: SPO's SD 1.5 sampling settings (20 steps, eta 1, k 4 from step 4, threshold 0.3) at the toy's
# guidance 1; 2 prompts per step. score_scale 10 puts the trained SPM's score differences on the scale the
# threshold expects: at 1 the base's pool kept 0% of the branching steps, at 10 about a third (measured on 8 prompts).
SPO_ONLINE = {"num_inference_steps": 20, "guidance_scale": 1.0, "eta": 1.0, "k": 4, "divert_start": 4,
              "threshold": 0.3, "score_scale": 10.0}
SPO_PROMPTS_PER_STEP = 2
# The SPM: configs/reward/step_aware_toy.yaml trained on the bench's annotator pairs.
SPM_RECIPE = {
    "task": "reward",
    "run": {"seed": 0, "overwrite": True},
    "model": {"kind": "step_aware", "pretrained": "tiny", "name": "toy_bench_spm", "unfreeze_vision_blocks": -1,
              "unfreeze_text_blocks": -1,
              "step_aware": {"t_min": 0.0, "t_max": 1.0, "guidance_scale": 1.0, "time_dim": 64, "hidden_dim": 64}},
    "method": {"loss": "soft_ce", "prompt_weight": "shards"},
    "data": {"resolution": 32, "ties": "keep", "shuffle_buffer": 2000},
    "optim": {"lr": 1e-4, "weight_decay": 0.0},
    "train": {"max_steps": 500, "batch_size": 16, "log_every": 25, "checkpoint_every": 0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmalign.toy.recipe import BASE_MODEL

    parser.add_argument("--out", default="runs/bench-toy-sweep", help="output folder (default: runs/bench-toy-sweep)")
    parser.add_argument("--base", default=str(BASE_MODEL), help="base pipeline folder (default: assets/toy/t2i)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--seeds", type=int, default=3, help="held-out seeds of each chosen setting (default 3)")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--val-prompts", type=int, default=256, help="validation split size (settings are chosen "
                                                                     "on it)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out split size (reported)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--curve-methods", default="dpo,spo", help="methods whose seeds >= 1 train in stages for "
                                                                   "the gain-against-compute plot ('' for none)")
    parser.add_argument("--curve-steps", default="50,100,200", help="stages (optimizer steps) before the last")
    parser.add_argument("--spm-steps", type=int, default=SPM_RECIPE["train"]["max_steps"])
    parser.add_argument("--spo-steps", type=int, default=None, help="SPO's optimizer steps (default: the recipe's "
                                                                    "train.max_steps, as every method)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override the shared training recipe of every method (e.g. train.max_steps=100)")


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"mmalign bench toy-sweep: {message}", file=sys.stderr)
        return 2

    from mmalign.cli import comma_choices

    try:
        methods = comma_choices("--methods", args.methods, METHODS)
        curve = comma_choices("--curve-methods", args.curve_methods, METHODS, allow_empty=True)
    except ValueError as err:
        return fail(str(err))
    try:
        stages = sorted({int(s) for s in args.curve_steps.split(",") if s.strip()})
    except ValueError:
        return fail(f"--curve-steps {args.curve_steps!r}: expected comma-separated step counts like 50,100,200")
    if any(s < 1 for s in stages):
        return fail(f"--curve-steps {args.curve_steps!r}: steps must be positive")
    if args.seeds < 1 or args.val_prompts < 2 or args.eval_prompts < 2:
        return fail("--seeds must be >= 1 and --val-prompts / --eval-prompts >= 2")
    if not (Path(args.base) / "model_index.json").is_file():
        return fail(f"no base model at {args.base} (expected model_index.json)")
    report = sweep(Path(args.out), args.base, methods, args.seeds, args.prompts, args.images_per_prompt,
                   args.val_prompts, args.eval_prompts, args.sample_steps, curve, stages, args.spm_steps,
                   args.spo_steps, args.overrides)
    print("\n" + report["table"])
    print(f"\n{Path(args.out) / 'sweep.md'}, {Path(args.out) / 'compute.png'}")
    return 0


class ModelPasses:
    """Counts the sample-passes of models of the given classes in this process while open: a forward hook on every
    call of such a model adds its batch size to `grad` (autograd on) or `no_grad`."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes
        self.grad = 0
        self.no_grad = 0

    def __enter__(self) -> "ModelPasses":
        import torch

        def hook(module, args, output) -> None:
            if isinstance(module, self.classes):
                n = int((output if isinstance(output, torch.Tensor) else output[0]).shape[0])
                if torch.is_grad_enabled():
                    self.grad += n
                else:
                    self.no_grad += n

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def forward_equivalents(self) -> int:
        return self.no_grad + 3 * self.grad


class UNetPasses(ModelPasses):
    """`ModelPasses` of every `UNet2DConditionModel`."""

    def __init__(self) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__(UNet2DConditionModel)


def grid(method: str) -> list[dict]:
    """The (β, lr) settings of a method's sweep, β None for SFT."""
    return [{"beta": b, "lr": lr} for b in BETAS[method] for lr in LRS]


KNOB_SYMBOLS = {"beta": "β", "temperature": "τ"}


def setting_name(setting: dict) -> str:
    """'β 2000, lr 0.0005': a setting's knobs (`KNOB_SYMBOLS`; None ones left out), then its lr."""
    knobs = [f"{KNOB_SYMBOLS[k]} {v:g}, " for k, v in setting.items() if k in KNOB_SYMBOLS and v is not None]
    return f"{''.join(knobs)}lr {setting['lr']:g}"


def choose_and_report(methods: list[str], grids: dict[str, list[dict]], n_seeds: int,
                      train_run: Callable[[str, dict, int, str], dict],
                      evaluate: Callable[[str, str, str], dict]) -> tuple[list[dict], dict[str, dict]]:
    """The sweep's protocol, for any world. Per method: `train_run(method, setting, 0, "val")` at every setting of
    its grid; the one with the highest validation `reward_gain` is chosen; that run's LoRA (seed 0) is evaluated on
    "heldout" (`evaluate(lora, split, description)`), and seeds 1 .. n_seeds-1 train at the chosen setting and are
    evaluated there. Returns every row (`split` "val" or "heldout") and the chosen setting per method."""
    runs: list[dict] = []
    chosen: dict[str, dict] = {}
    for method in methods:
        val_rows = [train_run(method, s, 0, "val") for s in grids[method]]
        runs.extend(val_rows)
        best = max(val_rows, key=lambda r: r["reward_gain"])
        setting = {k: best[k] for k in grids[method][0]}
        chosen[method] = setting
        held = evaluate(best["lora"], "heldout", f"{method} seed 0 held-out")
        runs.append({**{k: v for k, v in best.items() if k not in ("split", "curve")}, **held, "split": "heldout"})
        for seed in range(1, n_seeds):
            runs.append(train_run(method, setting, seed, "heldout"))
    return runs, chosen


def sweep(out: Path, base: str, methods: list[str], n_seeds: int, n_prompts: int, k: int, n_val: int, n_eval: int,
          sample_steps: int, curve_methods: list[str], stages: list[int], spm_steps: int,
          spo_steps: Optional[int], overrides: list[str]) -> dict:
    from mmalign.toy import experiment as ex
    from mmalign.toy.bench import make_pool, method_overrides
    from mmalign.toy.pipeline import ToyT2IPipeline
    from mmalign.toy.recipe import training_config
    from mmalign.toy.scenes import all_prompts, prompt_seed_pairs

    out.mkdir(parents=True, exist_ok=True)
    shared = training_config(out, base, 0, list(overrides), out / "data" / "pairs")  # validate overrides early
    max_steps = shared.train.max_steps
    pipe = ToyT2IPipeline.from_pretrained(base)
    pool_passes = n_prompts * k * sample_steps
    t0 = time.perf_counter()
    data_stats = make_pool(pipe, out / "data", n_prompts, k, sample_steps)
    data_stats["seconds"] = round(time.perf_counter() - t0, 1)
    prompt_file = out / "data" / "prompts.txt"
    prompt_file.write_text("\n".join(all_prompts()) + "\n")

    splits = {}
    for split, n in (("val", n_val), ("heldout", n_eval)):
        pairs = prompt_seed_pairs(split, n)
        prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
        splits[split] = (prompts, seeds, ex.generate(pipe, prompts, seeds, sample_steps, desc=f"evaluate base "
                                                                                            f"({split})"))

    def evaluate(lora: str, split: str, desc: str) -> dict:
        prompts, seeds, base_images = splits[split]
        aligned = ToyT2IPipeline.from_pretrained(base)
        aligned.load_lora_weights(lora)
        images = ex.generate(aligned, prompts, seeds, sample_steps, desc=desc, progress=False)
        ev = ex.compare(base_images, images, prompts)
        return {"reward_gain": ev["gain"]["total"], "color_gain": ev["gain"]["color"],
                "win_rate": ev["win_rate"]["value"], "win_rate_ci95": ev["win_rate"]["ci95"], "drift": ev["drift"],
                "aligned_total": ex.rewards(images, prompts)["total"].tolist()}

    spm = None
    if "spo" in methods:
        spm = train_spm(out / "spm", base, out / "data" / "pairs", spm_steps)

    def config(method: str, setting: dict, seed: int, steps: int, resume: bool):
        beta = "" if setting["beta"] is None else f"-beta{setting['beta']:g}"
        run_dir = out / "runs" / f"{method}{beta}-lr{setting['lr']:g}-seed{seed}"
        extra = [f"optim.lr={setting['lr']}", f"train.max_steps={steps}", "validation.prompts=[]"]
        if setting["beta"] is not None:
            extra.append(f"method.beta={setting['beta']}")
        if resume:
            extra.append("run.resume=latest")
        if method == "spo":
            return spo_config(run_dir, base, seed, str(prompt_file), spm["folder"], [*overrides, *extra])
        extra = [*method_overrides(method, out, shared.train.batch_size, k), *extra]
        return training_config(run_dir, base, seed, [*overrides, *extra], out / "data" / "pairs")

    def train_run(method: str, setting: dict, seed: int, split: str, at: list[int]) -> dict:
        """Train (in stages `at`, the last being the full run) and evaluate after each stage on `split`."""
        from mmalign.train.trainer import train

        steps_total = (spo_steps or max_steps) if method == "spo" else max_steps
        points, seconds, passes = [], 0.0, UNetPasses()
        for i, steps in enumerate([s for s in at if s < steps_total] + [steps_total]):
            cfg = config(method, setting, seed, steps, resume=i > 0)
            t = time.perf_counter()
            with passes:
                result = train(cfg)
            seconds += time.perf_counter() - t
            ev = evaluate(result.outputs["lora"], split, f"{method} {setting_name(setting)} seed {seed}")
            points.append({"step": steps, "seconds": round(seconds, 1), "unet_grad": passes.grad,
                           "unet_no_grad": passes.no_grad, "forward_equivalents": passes.forward_equivalents,
                           **ev})
        final = points[-1]
        row = {"method": method, **setting, "seed": seed, "split": split, "lora": result.outputs["lora"],
               **{k_: v for k_, v in final.items() if k_ != "step"}, "steps": final["step"],
               "pairs_per_step": mean_logged(Path(result.run_dir) / "metrics.jsonl", "spo/pairs")}
        if len(points) > 1:
            row["curve"] = [{k_: v for k_, v in p.items() if k_ != "aligned_total"} for p in points]
        print(f"{method} {setting_name(setting)} seed {seed} ({split}): reward gain {final['reward_gain']:+.3f}, "
              f"win rate {final['win_rate']:.3f}, drift {final['drift']:.1f}, {final['seconds']:.0f} s")
        return row

    def run_one(method: str, setting: dict, seed: int, split: str) -> dict:
        return train_run(method, setting, seed, split, stages if split == "heldout" and method in curve_methods
                         else [])

    runs, chosen = choose_and_report(methods, {m: grid(m) for m in methods}, n_seeds, run_one, evaluate)

    _, _, base_heldout = splits["heldout"]
    base_total = ex.rewards(base_heldout, splits["heldout"][0])["total"]
    summary = summarize(runs, chosen, base_total)
    table = markdown_tables(summary, runs, chosen, n_seeds)
    report = {"base_heldout": float(base_total.mean()), "data": data_stats, "pool_unet_passes": pool_passes,
              "spm": spm, "chosen": chosen, "summary": summary,
              "runs": [{k_: v for k_, v in r.items() if k_ != "aligned_total"} for r in runs],
              "settings": {"prompts": n_prompts, "images_per_prompt": k, "val_prompts": n_val,
                           "eval_prompts": n_eval, "sample_steps": sample_steps, "max_steps": max_steps,
                           "spo_steps": spo_steps or max_steps, "overrides": list(overrides), "seeds": n_seeds,
                           "lrs": list(LRS), "betas": {m: list(BETAS[m]) for m in methods},
                           "spo_online": SPO_ONLINE, "spo_prompts_per_step": SPO_PROMPTS_PER_STEP}}
    (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sweep.md").write_text(f"# mmalign bench toy-sweep\n\n{table}\n")
    heldout = [r for r in runs if r["split"] == "heldout"]
    from mmalign.toy.bench import plot

    plot(heldout, out / "bench.png")
    plot_compute(heldout, pool_passes, out / "compute.png")
    report["table"] = table
    return report


def mean_logged(metrics: Path, key: str) -> Optional[float]:
    """The mean of `key` over a run's logged rows (None if never logged)."""
    values = [row[key] for row in map(json.loads, metrics.read_text().splitlines()) if key in row]
    return float(np.mean(values)) if values else None


def train_spm(out: Path, base: str, shards: Path, steps: int) -> dict:
    """The step-aware preference model SPO samples with, trained on the bench's annotator pairs."""
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    recipe = copy.deepcopy(SPM_RECIPE)
    recipe["run"]["output_dir"] = str(out)
    recipe["model"]["step_aware"]["generator"] = base
    recipe["data"]["shards"] = str(shards)
    recipe["train"]["max_steps"] = steps
    cfg = load_train_config(None, [], defaults=recipe, source="<bench toy-sweep SPM recipe>")
    t = time.perf_counter()
    with UNetPasses() as passes:
        result = train(cfg)
    return {"folder": str(out / "reward_model"), "seconds": round(time.perf_counter() - t, 1), "steps": steps,
            "unet_no_grad": passes.no_grad, "unet_grad": passes.grad,
            "final_metrics": {k: v for k, v in result.metrics.items() if k.startswith(("loss", "accuracy"))}}


def spo_config(run_dir: Path, base: str, seed: int, prompts: str, spm: str, overrides: list[str]):
    """Online SPO with the toy recipe's LoRA and optimiser, sampling with the bench's SPM."""
    from mmalign.toy.recipe import RECIPE
    from mmalign.train.tasks import load_train_config

    recipe = {"task": "spo_online", "run": {"seed": seed, "overwrite": True, "output_dir": str(run_dir / "train")},
              "model": copy.deepcopy(RECIPE["model"]) | {"pretrained": base},
              "method": {"name": "spo", "beta": 10.0, "clip_eps": 0.1},
              "data": {"shards": None, "schema": "step_pair", "resolution": 32},
              "online": {"prompts": prompts, "scorer": spm, **SPO_ONLINE},
              "optim": copy.deepcopy(RECIPE["optim"]),
              "train": {**copy.deepcopy(RECIPE["train"]), "batch_size": SPO_PROMPTS_PER_STEP},
              "validation": {"prompts": []}}
    # the shared recipe's overrides apply too, except its batch size (pairs per step) and data keys
    keep = [o for o in overrides if not o.startswith(("train.batch_size=", "data."))]
    return load_train_config(None, keep, defaults=recipe, source="<bench toy-sweep SPO recipe>")


GAINS = (("reward_gain", "reward gain"), ("color_gain", "colour gain"))  # the image world's reported gains


def summarize(runs: list[dict], chosen: dict, base_total: np.ndarray, gains=GAINS) -> dict:
    """Per method, over its held-out seeds: [mean, sd] of the `gains` keys, win rate, drift, seconds and
    forward-equivalents, and the win rate of all seeds' comparisons pooled (with its 95% CI)."""
    from mmalign.toy import experiment as ex

    out = {}
    for method in chosen:
        rows = [r for r in runs if r["method"] == method and r["split"] == "heldout"]
        s = {key: [float(np.mean([r[key] for r in rows])),
                   float(np.std([r[key] for r in rows], ddof=1)) if len(rows) > 1 else 0.0]
             for key in (*(k for k, _ in gains), "win_rate", "drift", "seconds", "forward_equivalents")}
        pooled = ex.win_rate(np.concatenate([r["aligned_total"] for r in rows]),
                             np.tile(base_total, len(rows)))
        s["win_rate_pooled"] = {"value": pooled["value"], "ci95": pooled["ci95"], "n": pooled["n"]}
        s["setting"] = chosen[method]
        out[method] = s
    return out


def markdown_tables(summary: dict, runs: list[dict], chosen: dict, n_seeds: int, gains=GAINS,
                    model: str = "UNet") -> str:
    """The held-out table (one row per method: chosen setting, `gains`, pooled win rate, drift, training seconds
    and `model` forward-equivalents) and the validation table (every run of the sweep)."""
    heads = " | ".join(h for _, h in gains)
    lines = [f"Held-out split, chosen setting, mean ± sd over {n_seeds} seeds (win rate: all seeds' comparisons "
             "pooled, 95% CI):", "",
             f"| method | chosen on validation | {heads} | win rate vs base | drift (RGB) | train s | "
             f"{model} fwd-equiv. |", "|---|---|" + "---|" * len(gains) + "---|---|---|---|"]
    for method, s in summary.items():
        w = s["win_rate_pooled"]
        cells = " | ".join(f"{s[k][0]:+.3f} ± {s[k][1]:.3f}" for k, _ in gains)
        lines.append(f"| {method} | {setting_name(s['setting'])} | {cells} | "
                     f"{w['value']:.3f} ({w['ci95'][0]:.3f}–{w['ci95'][1]:.3f}) | {s['drift'][0]:.1f} ± "
                     f"{s['drift'][1]:.1f} | {s['seconds'][0]:.0f} | {s['forward_equivalents'][0] / 1e3:.0f}k |")
    lines += ["", "Validation split, seed 0, every setting (reward gain / win rate / drift; * chosen):", "",
              "| method | setting | reward gain | win rate | drift |", "|---|---|---|---|---|"]
    for r in runs:
        if r["split"] == "val":
            mark = " *" if all(r[k] == v for k, v in chosen[r["method"]].items()) else ""
            lines.append(f"| {r['method']} | {setting_name(r)}{mark} | {r['reward_gain']:+.3f} | "
                         f"{r['win_rate']:.3f} | {r['drift']:.1f} |")
    return "\n".join(lines)


def compute_to_reach(curve: list[dict], target: float, key: str = "forward_equivalents") -> Optional[float]:
    """The compute at which a gain curve first reaches `target`, linearly interpolated between stages (from
    (0, 0)); None if it never does."""
    prev_x, prev_y = 0.0, 0.0
    for p in curve:
        x, y = float(p[key]), float(p["reward_gain"])
        if y >= target:
            return prev_x + (x - prev_x) * (target - prev_y) / (y - prev_y) if y > prev_y else x
        prev_x, prev_y = x, y
    return None


def plot_compute(heldout: list[dict], pool_passes: int, path: Path, model: str = "UNet",
                 world: str = "toy world") -> None:
    """Held-out reward gain against training compute (`model` forward-equivalents), one line per staged run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours: dict[str, str] = {}
    for r in heldout:
        pts = r.get("curve") or [r]
        c = colours.setdefault(r["method"], f"C{len(colours)}")
        xs = [0] + [p["forward_equivalents"] / 1e3 for p in pts]
        ys = [0.0] + [p["reward_gain"] for p in pts]
        ax.plot(xs, ys, "-o" if "curve" in r else "o", color=c, ms=3, lw=1,
                label=r["method"] if r["method"] not in ax.get_legend_handles_labels()[1] else None)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"training compute (thousand {model} forward-equivalents, samples)")
    ax.set_ylabel("held-out ground-truth reward gain")
    ax.set_title(f"{world}: gain vs compute (shared pool: {pool_passes / 1e3:.0f}k passes)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
