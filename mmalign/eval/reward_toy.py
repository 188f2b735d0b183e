"""`mmalign eval reward-toy`: the toy proof that a learned reward model can stand in for the ground truth.

1. Reward-model data: toy scenes paired with the same scene with one attribute changed (colour, shape or
   position, drawn with `--rm-attribute-weights`), in random order, labelled by the simulated annotator
   (Bradley-Terry on the ground-truth total reward, `--rm-temperature`). A held-out set is labelled the same way.
2. A tiny CLIP reward model (`configs/reward/toy_clip.yaml`, randomly initialised) is trained on the first set
   through `mmalign train` (task `reward`) and exported; its pairwise accuracy on the held-out labels is reported
   beside the ground truth's own agreement with those labels (the annotator's agreement with the ground truth).
3. K images per training prompt from the shipped toy base model are ranked twice with `selfgen ranked`'s
   `build_ranked_set`: by the learned reward model (`learned`) and, as the control, by the ground-truth total
   reward (`truth`). Both rankings see the same images (same prompts and seeds).
4. RankDPO with LoRA (the quickstart / `mmalign bench toy` recipe, `rankdpo` method overrides) trains on each
   ranked set, for each seed; every aligned model is compared with the base on held-out prompts at equal seeds:
   ground-truth reward gain, win rate over the base (95% CI) and drift.

Writes `OUT/report.json` and `OUT/report.md`. Finished stages are reused when the command is run again with the
same `OUT` and settings (the reward model, the ranked sets, each training run with its evaluation), so `--seeds 3`
after `--seeds 1` adds two seeds; other settings with the same `OUT` are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RM_RECIPE = REPO / "configs" / "reward" / "toy_clip.yaml"
ATTRIBUTES = ("color", "shape", "position")
CONDITIONS = ("learned", "truth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmalign.toy.recipe import BASE_MODEL

    parser.add_argument("--out", default="runs/reward-toy", help="output folder (default: runs/reward-toy)")
    parser.add_argument("--base", default=str(BASE_MODEL), help="base pipeline folder (default: assets/toy/t2i)")
    parser.add_argument("--seeds", type=int, default=1, help="RankDPO training seeds per condition (default 1)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS),
                        help="rankings to train on: learned (the reward model), truth (the control); default both")
    parser.add_argument("--rm-pairs", type=int, default=8192, help="reward-model training pairs (default 8192)")
    parser.add_argument("--rm-heldout", type=int, default=512, help="held-out labelled pairs (default 512)")
    parser.add_argument("--rm-steps", type=int, default=1500, help="reward-model training steps (default 1500)")
    parser.add_argument("--rm-batch-size", type=int, default=16, help="reward-model pairs per step (default 16)")
    parser.add_argument("--rm-lr", type=float, default=2e-3, help="reward-model learning rate (default 2e-3)")
    parser.add_argument("--rm-temperature", type=float, default=0.1,
                        help="annotator temperature for the reward-model labels (default 0.1)")
    parser.add_argument("--rm-attribute-weights", default="0.5,0.25,0.25",
                        help="probabilities of changing colour, shape, position in a reward-model pair "
                             "(default 0.5,0.25,0.25, the weights of the total reward)")
    parser.add_argument("--prompts", type=int, default=300, help="RankDPO training prompts (default 300)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="K images ranked per prompt (default 4)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out evaluation prompts (default 256)")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps for every generation (default 20)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override the RankDPO training recipe (e.g. train.max_steps=100)")


def run(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError
    from mmalign.train.trainer import TrainingError

    if not (Path(args.base) / "model_index.json").is_file():
        print(f"mmalign eval reward-toy: no base model at {args.base} (expected model_index.json)", file=sys.stderr)
        return 2
    try:
        weights = [float(w) for w in args.rm_attribute_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        print(f"mmalign eval reward-toy: --rm-attribute-weights {args.rm_attribute_weights!r}: give three "
              "non-negative numbers (colour, shape, position), not all 0", file=sys.stderr)
        return 2
    for name in ("seeds", "rm_pairs", "rm_heldout", "rm_steps", "prompts", "eval_prompts", "sample_steps"):
        if getattr(args, name) < (2 if name in ("eval_prompts", "rm_heldout") else 1):
            print(f"mmalign eval reward-toy: --{name.replace('_', '-')} is too small", file=sys.stderr)
            return 2
    from mmalign.cli import comma_choices

    try:
        conditions = comma_choices("--conditions", args.conditions, CONDITIONS)
    except ValueError as err:
        print(f"mmalign eval reward-toy: {err}", file=sys.stderr)
        return 2
    if args.images_per_prompt < 2:
        print("mmalign eval reward-toy: --images-per-prompt must be at least 2", file=sys.stderr)
        return 2
    try:
        report = reward_toy(Path(args.out), args.base, seeds=args.seeds, rm_pairs=args.rm_pairs,
                            rm_heldout=args.rm_heldout, rm_steps=args.rm_steps, rm_batch_size=args.rm_batch_size,
                            rm_lr=args.rm_lr, rm_temperature=args.rm_temperature, rm_attribute_weights=weights,
                            n_prompts=args.prompts, k=args.images_per_prompt, n_eval=args.eval_prompts,
                            sample_steps=args.sample_steps, overrides=list(args.overrides), conditions=conditions,
                            progress=not args.no_progress)
    except (ConfigError, TrainingError) as err:
        print(f"mmalign eval reward-toy: {err}", file=sys.stderr)
        return 2
    print("\n" + report["table"])
    print(f"\n{Path(args.out) / 'report.md'}")
    return 0


# -- 1. reward-model data ----------------------------------------------------------------------------------------
def perturb(scene, attribute: str, rng: np.random.Generator):
    """The same scene with `attribute` (color, shape or position) changed to another value drawn uniformly; a new
    position also draws a centre column inside the new band."""
    from mmalign.toy.scenes import COLORS, POSITIONS, SHAPES, allowed_cx

    choices = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}[attribute]
    others = [v for v in choices if v != getattr(scene, attribute)]
    value = others[rng.integers(len(others))]
    if attribute != "position":
        return dataclasses.replace(scene, **{attribute: value})
    cols = allowed_cx(value, scene.size)
    return dataclasses.replace(scene, position=value, cx=int(cols[rng.integers(len(cols))]))


def write_rm_pairs(out_dir: Path, n: int, seed: int, temperature: float, attribute_weights: Sequence[float]) -> dict:
    """`n` annotator-labelled pairs (a scene vs the same scene with one attribute changed, random order) as
    `pair` shards (ties kept as 0.5); returns counts and the annotator's agreement with the ground truth."""
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy import experiment as ex
    from mmalign.toy.annotator import agreement, label_pairs
    from mmalign.toy.scenes import sample_scenes

    rng = np.random.default_rng(seed)
    p = np.asarray(attribute_weights, np.float64) / float(np.sum(attribute_weights))
    scenes = sample_scenes(n, seed)
    a_img, b_img, captions, changed = [], [], [], []
    for scene in scenes:
        attribute = ATTRIBUTES[rng.choice(3, p=p)]
        images = [scene.render(), perturb(scene, attribute, rng).render()]
        if rng.random() < 0.5:
            images.reverse()
        a_img.append(images[0])
        b_img.append(images[1])
        captions.append(scene.caption)
        changed.append(attribute)
    ra = ex.rewards(np.stack(a_img), captions)["total"]
    rb = ex.rewards(np.stack(b_img), captions)["total"]
    labels = label_pairs(ra, rb, rng, temperature, ex.Annotator().tie_margin)
    with ShardSetWriter(out_dir, "pair", max_count=1000, overwrite=True) as writer:
        for i in range(n):
            writer.write(pair_sample(f"rm-{i:06d}", a_img[i], b_img[i], caption=captions[i],
                                     label_0=float(labels[i]), provenance={"dataset": "mmalign-toy"},
                                     true_rewards=[float(ra[i]), float(rb[i])], changed=changed[i]))
        writer.set_conversion({"from": "toy annotator", "temperature": temperature, "seed": seed,
                               "attribute_weights": list(map(float, p))})
    decided = labels != 0.5
    return {"pairs": n, "ties": int((~decided).sum()),
            "annotator_agreement": agreement(labels[decided], ra[decided], rb[decided]),
            "changed": {a: changed.count(a) for a in ATTRIBUTES}}


def train_reward_model(out: Path, shards: Path, steps: int, batch_size: int, lr: float, progress: bool) -> str:
    """The toy_clip recipe on `shards`; returns the exported reward-model folder (reused if already there)."""
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    exported = out / "reward_model"
    if (exported / "mmalign_scorer.json").is_file():
        return str(exported)
    cfg = load_train_config(RM_RECIPE, [f"run.output_dir={out}", f"data.shards={shards}", f"train.max_steps={steps}",
                                        f"train.batch_size={batch_size}", f"optim.lr={lr}", "run.overwrite=true",
                                        "train.checkpoint_every=0", "data.shuffle_buffer=2000",
                                        f"train.progress={str(progress).lower()}"])
    return train(cfg).outputs["reward_model"]


# -- 3. ranked sets ----------------------------------------------------------------------------------------------
class ToyGenerator:
    """The toy base pipeline as a `selfgen ranked` generator; images are kept by (prompt, seed) so that a second
    ranking of the same prompts and seeds reuses them instead of sampling again."""

    name = "toy-base"

    def __init__(self, pipe, sample_steps: int):
        self.pipe, self.sample_steps = pipe, sample_steps
        self.cache: dict[tuple[str, int], Any] = {}

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        from PIL import Image

        from mmalign.toy import experiment as ex

        todo = [(p, int(s)) for p, s in zip(prompts, seeds) if (p, int(s)) not in self.cache]
        if todo:
            images = ex.generate(self.pipe, [p for p, _ in todo], [s for _, s in todo], self.sample_steps,
                                 progress=False)
            self.cache.update({job: Image.fromarray(im) for job, im in zip(todo, images)})
        return [self.cache[(p, int(s))] for p, s in zip(prompts, seeds)]


def ranking_agreement(ranked_dir: Path) -> dict:
    """How the stored ranking orders pairs of images against their ground-truth total reward: pairwise accuracy
    over pairs with distinct true rewards (equal stored scores count 1/2) and the mean inversion score."""
    from mmalign.data.dataset import RankedDataset
    from mmalign.rewards.metrics import inversion_score
    from mmalign.toy import experiment as ex

    correct, pairs, inversions = 0.0, 0, []
    for sample in RankedDataset(str(ranked_dir), rank=0, world_size=1):
        images = np.stack([np.asarray(im) for im in sample["images"]])
        truth = ex.rewards(images, [sample["caption"]] * len(images))["total"]
        scores = sample["scores"].numpy()
        for i in range(len(truth)):
            for j in range(i + 1, len(truth)):
                if truth[i] == truth[j]:
                    continue
                pairs += 1
                d = (scores[i] - scores[j]) * np.sign(truth[i] - truth[j])
                correct += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        inversions.append(inversion_score(scores, truth))
    return {"pairwise_accuracy": correct / pairs if pairs else float("nan"), "pairs": pairs,
            "inversion_score": float(np.nanmean(inversions)) if inversions else float("nan")}


# -- the experiment ----------------------------------------------------------------------------------------------
def reward_toy(out: Path, base: str, *, seeds: int = 1, rm_pairs: int = 8192, rm_heldout: int = 512,
               rm_steps: int = 1500, rm_batch_size: int = 16, rm_lr: float = 2e-3, rm_temperature: float = 0.1,
               rm_attribute_weights: Sequence[float] = (0.5, 0.25, 0.25), n_prompts: int = 300, k: int = 4,
               n_eval: int = 256, sample_steps: int = 20, overrides: Sequence[str] = (),
               conditions: Sequence[str] = CONDITIONS, progress: bool = True) -> dict:
    """Run the stages of the module docstring; returns the report (also in `out/report.json`)."""
    from mmalign.config import ConfigError
    from mmalign.toy.recipe import training_config
    from mmalign.rewards.evaluate import evaluate_reward
    from mmalign.rewards.registry import load_scorer
    from mmalign.selfgen.ranked import build_ranked_set
    from mmalign.toy import experiment as ex
    from mmalign.toy.bench import method_overrides, summarize
    from mmalign.toy.pipeline import ToyT2IPipeline
    from mmalign.toy.scenes import prompt_seed_pairs
    from mmalign.train.trainer import train

    shared = training_config(out, base, 0, list(overrides), out / "learned" / "data" / "ranked")  # fail early
    settings = {"base": str(base), "rm_pairs": rm_pairs, "rm_heldout": rm_heldout, "rm_steps": rm_steps,
                "rm_batch_size": rm_batch_size, "rm_lr": rm_lr, "rm_temperature": rm_temperature,
                "rm_attribute_weights": [float(w) for w in rm_attribute_weights], "prompts": n_prompts,
                "images_per_prompt": k, "eval_prompts": n_eval, "sample_steps": sample_steps,
                "overrides": list(overrides)}
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise ConfigError(f"{out} holds a run with other settings ({settings_path}); reuse needs the same settings "
                          "(only --seeds may grow): use another --out")
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    print(f"[1/4] reward-model data: {rm_pairs} training and {rm_heldout} held-out annotator-labelled pairs")
    rm_data = {"train": write_rm_pairs(out / "rm_data" / "train", rm_pairs, 0, rm_temperature, rm_attribute_weights),
               "heldout": write_rm_pairs(out / "rm_data" / "heldout", rm_heldout, 1, rm_temperature,
                                         rm_attribute_weights)}
    print(f"[2/4] training the tiny CLIP reward model ({rm_steps} steps x {rm_batch_size} pairs)")
    rm_folder = train_reward_model(out / "rm", out / "rm_data" / "train", rm_steps, rm_batch_size, rm_lr, progress)
    heldout = evaluate_reward(out / "rm_data" / "heldout", [rm_folder, "toy_total"], progress=False)
    rm_name = load_scorer(rm_folder).name
    rm_report = {"data": rm_data, "folder": rm_folder, "steps": rm_steps, "batch_size": rm_batch_size, "lr": rm_lr,
                 "heldout_accuracy": heldout["scorers"][rm_name]["metrics"]["score"]["accuracy"],
                 "truth_agreement_with_labels": heldout["scorers"]["toy_total"]["metrics"]["score"]["accuracy"]}
    timings["reward_model_s"] = time.perf_counter() - t0
    print(f"    held-out pairwise accuracy {rm_report['heldout_accuracy']:.3f}; ground truth vs the same labels "
          f"{rm_report['truth_agreement_with_labels']:.3f}")

    t0 = time.perf_counter()
    print(f"[3/4] ranking {n_prompts} prompts x {k} base-model images by: {', '.join(conditions)}")
    pipe = ToyT2IPipeline.from_pretrained(base)
    generator = ToyGenerator(pipe, sample_steps)
    prompts = [p for p, _ in prompt_seed_pairs("train", n_prompts)]
    ranking = {}
    for condition, scorer in (("learned", rm_folder), ("truth", "toy_total")):
        if condition not in conditions:
            continue
        ranked_dir = out / condition / "data" / "ranked"
        if not (ranked_dir / "manifest.json").is_file():
            build_ranked_set(prompts, [generator], [scorer], ranked_dir, k=k, seed=0, batch_size=16 * k,
                             overwrite=True, progress=progress)
        ranking[condition] = ranking_agreement(ranked_dir)
    timings["ranked_sets_s"] = time.perf_counter() - t0

    print(f"[4/4] RankDPO on each ranked set, {seeds} seed(s), evaluated on {n_eval} held-out prompts")
    heldout_pairs = prompt_seed_pairs("heldout", n_eval)
    eval_prompts, eval_seeds = [p for p, _ in heldout_pairs], [s for _, s in heldout_pairs]
    base_images = ex.generate(pipe, eval_prompts, eval_seeds, sample_steps, desc="evaluate base", progress=progress)
    runs = []
    for condition in conditions:
        for seed in range(seeds):
            run_dir = out / condition / "runs" / f"seed{seed}"
            result_path = run_dir / "result.json"
            if result_path.is_file():
                runs.append(json.loads(result_path.read_text()))
                continue
            t0 = time.perf_counter()
            extra = method_overrides("rankdpo", out / condition, shared.train.batch_size, k)
            cfg = training_config(run_dir, base, seed, [*overrides, *extra, f"train.progress={str(progress).lower()}"],
                                  out / condition / "data" / "ranked")
            result = train(cfg)
            aligned = ToyT2IPipeline.from_pretrained(base)
            aligned.load_lora_weights(result.outputs["lora"])
            aligned_images = ex.generate(aligned, eval_prompts, eval_seeds, sample_steps, progress=progress,
                                         desc=f"evaluate {condition} seed {seed}")
            ev = ex.compare(base_images, aligned_images, eval_prompts)
            row = {"condition": condition, "seed": seed, "reward_gain": ev["gain"]["total"],
                   "color_gain": ev["gain"]["color"], "win_rate": ev["win_rate"]["value"],
                   "win_rate_ci95": ev["win_rate"]["ci95"], "drift": ev["drift"], "aligned": ev["aligned"],
                   "seconds": round(time.perf_counter() - t0, 1)}
            from mmalign.config import atomic_write_text

            atomic_write_text(result_path, json.dumps(row, indent=1) + "\n")
            runs.append(row)
            print(f"{condition} seed {seed}: reward gain {row['reward_gain']:+.3f}, win rate {row['win_rate']:.3f}, "
                  f"drift {row['drift']:.1f}")
    summary = summarize(runs, by="condition")
    table = markdown_table(summary, ranking)
    report = {"reward_model": rm_report, "ranking_vs_truth": ranking, "runs": runs, "summary": summary,
              "base": {k_: float(v.mean()) for k_, v in ex.rewards(base_images, eval_prompts).items()},
              "timings": {k_: round(v, 1) for k_, v in timings.items()},
              "settings": {**settings, "seeds": seeds}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(
        f"# mmalign eval reward-toy\n\nReward model: held-out pairwise accuracy {rm_report['heldout_accuracy']:.3f} "
        f"(ground truth vs the same annotator labels: {rm_report['truth_agreement_with_labels']:.3f}).\n\n{table}\n\n"
        f"Base model total reward {report['base']['total']:.3f} on {n_eval} held-out prompts; mean ± standard "
        f"deviation over {seeds} seed(s).\n")
    report["table"] = table
    return report


def markdown_table(summary: dict, ranking: dict) -> str:
    names = {"learned": "learned reward model", "truth": "ground truth (control)"}
    lines = ["| RankDPO data ranked by | ranking accuracy vs truth | reward gain | colour gain | win rate vs base "
             "| drift (RGB units) |", "|---|---|---|---|---|---|"]
    for condition, s in summary.items():
        cells = [f"{ranking[condition]['pairwise_accuracy']:.3f}"]
        cells += [f"{s[k][0]:+.3f} ± {s[k][1]:.3f}" for k in ("reward_gain", "color_gain")]
        cells += [f"{s['win_rate'][0]:.3f} ± {s['win_rate'][1]:.3f}", f"{s['drift'][0]:.1f} ± {s['drift'][1]:.1f}"]
        lines.append(f"| {names.get(condition, condition)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
