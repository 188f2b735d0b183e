"""`mmalign bench toy-video`: Flow-DPO, Flow-RWR and SFT (offline and online) on the video toy world, over seeds.

1. Data: two clips per training prompt from the shipped toy video base (`assets/toy/video`), scored by the
   ground truth (VQ, MQ, TA) and labelled per dimension by the simulated annotator (VideoAlign's A / B / same),
   written as `video_pair` shards with the ground-truth rewards beside the labels (what Flow-RWR reads).
2. A learned video reward model (`mmalign.rewards.video`, the tiny CLIP backbone, randomly initialised) is trained
   on the same annotator pairs with the reward task and exported; its pairwise accuracy on held-out labels of the
   same kind is reported.
3. Each condition trains a LoRA on the base with `task: flow`, changing only what the condition names:
   `flow_dpo` (constant β), `flow_dpo_t2` (β·(1-t)², the paper's Table 4 variant), `flow_rwr`, `sft` on the pairs
   with VQ:MQ:TA = 1:1:1; `online_truth` and `online_learned`: online Flow-DPO (best vs worst of N own samples per
   prompt, reference refreshed every K steps) rewarded by the ground truth or by the learned reward model.
4. Every aligned model is compared with the base on held-out prompts at equal seeds: the gain of each dimension,
   the win rate over the base on the 1:1:1 total (95% CI), per-dimension win rates, and the drift (mean RGB
   distance between the two models' clips).

Writes `OUT/bench.json`, `OUT/bench.md` (the table, mean ± sd over seeds), `OUT/bench.png` (TA gain against drift)
and `OUT/samples.gif` / `OUT/samples.png` (base against the best condition's seed-0 model, same prompts and seeds).
Finished stages (data, reward model, each run with its evaluation) are reused when the command is run again with
the same `OUT` and settings; other settings over the same `OUT` are refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BASE_MODEL = REPO / "assets" / "toy" / "video"
DIMS = ("VQ", "MQ", "TA")
CONDITIONS = ("flow_dpo", "flow_dpo_t2", "flow_rwr", "sft", "online_truth", "online_learned")

# The shared recipe: LoRA on the toy base's attention and feed-forward projections, one setting for every condition
# (the method table's fair sweep is issue 18's). β: the toy's velocity errors are ~0.04 (means over C, F, H, W), so
# β·Δerr of order 1 needs β in the thousands, as Diffusion-DPO's 5000 on SD's ~0.1 errors. lr 2e-4: measured on one
# seed, online Flow-DPO at lr 1e-3 (β 5000) diverged (loss 0.69 -> 18 by step 45) and offline Flow-DPO at 5e-4 never
# fitted its pairs (accuracy ~0.57 over 150 steps, TA -0.007, drift 11.8); online at 2e-4 gained TA +0.040.
RECIPE = {
    "task": "flow",
    "run": {"seed": 0, "overwrite": True},
    "model": {"pretrained": str(BASE_MODEL),
              "lora": {"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj",
                                                                 "ffn.net.2"]}},
    "method": {"name": "flow_dpo", "beta": 2000.0},
    "noise": {"timestep_sampling": "logit_normal"},
    "data": {"resolution": 32, "num_frames": 9, "dims": {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}, "shuffle_buffer": 1000},
    "optim": {"lr": 2e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10, "weight_decay": 0.0},
    "train": {"max_steps": 300, "batch_size": 8, "checkpoint_every": 0, "log_every": 5},
}
ONLINE = {"num_samples": 4, "steps": 10, "ref_update_every": 25, "guidance_scale": 1.0}
RM_RECIPE = {
    "task": "reward",
    "run": {"seed": 0, "overwrite": True},
    "model": {"kind": "video", "pretrained": "tiny", "name": "toy_video_rm",
              "video": {"temporal": "transformer", "temporal_layers": 1, "temporal_heads": 2, "fps": None,
                        "max_frames": 9}},
    "method": {"loss": "btt", "btt_k": 5.0},
    "data": {"frames": {"max_frames": 9}, "shuffle_buffer": 1000},
    "optim": {"lr": 5e-4, "weight_decay": 0.0},
    "train": {"max_steps": 400, "batch_size": 16, "checkpoint_every": 0, "log_every": 10},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bench-toy-video", help="output folder")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated subset of {CONDITIONS}")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per condition (default 3)")
    parser.add_argument("--eval-prompts", type=int, default=240)
    add_world_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override the shared offline recipe (e.g. train.max_steps=100 method.beta=1000)")


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the video toy world's data, reward model and online runs, shared with `toy-video-sweep`."""
    parser.add_argument("--base", default=str(BASE_MODEL), help="base pipeline folder (default: assets/toy/video)")
    parser.add_argument("--pairs", type=int, default=480, help="annotator-labelled pairs of base clips")
    parser.add_argument("--sample-steps", type=int, default=20, help="Euler steps of every generated clip")
    parser.add_argument("--rm-steps", type=int, default=RM_RECIPE["train"]["max_steps"],
                        help="the learned video reward model's training steps (default %(default)s)")
    parser.add_argument("--online-steps", type=int, default=60, help="optimizer steps of online Flow-DPO")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def run(args: argparse.Namespace) -> int:
    from mmalign.cli import comma_choices

    try:
        conditions = comma_choices("--conditions", args.conditions, CONDITIONS)
    except ValueError as err:
        print(f"mmalign bench toy-video: {err}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.pairs < 8 or args.eval_prompts < 2:
        print("mmalign bench toy-video: need --seeds >= 1, --pairs >= 8, --eval-prompts >= 2", file=sys.stderr)
        return 2
    if not (Path(args.base) / "model_index.json").is_file():
        print(f"mmalign bench toy-video: no base model at {args.base} (expected model_index.json; make it with "
              "scripts/pretrain_toy_video.py)", file=sys.stderr)
        return 2
    report = bench(Path(args.out), args.base, conditions, args.seeds, args.pairs, args.eval_prompts,
                   args.sample_steps, args.rm_steps, args.online_steps, list(args.overrides), args.progress)
    print("\n" + report["table"])
    print(f"\n{Path(args.out) / 'bench.md'}, {Path(args.out) / 'samples.gif'}")
    return 0


# -- generation and evaluation -------------------------------------------------------------------------------------
def clip_seed(seed: int, index: int) -> int:
    """The noise seed of the `index`-th clip of a (prompt, seed) pair."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, batch: int = 60, desc: str = "generate",
             progress: bool = True) -> np.ndarray:
    """uint8 clips (N, F, H, W, 3), one generator per clip (a clip depends only on its prompt and seed)."""
    import torch
    from tqdm.auto import tqdm

    from mmalign.toy.video_rewards import to_uint8_clips

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        frames = pipe(prompts[i:i + batch], num_inference_steps=steps, generator=gens, output_type="np").frames
        out.append(to_uint8_clips(frames))
    return np.concatenate(out)


def ground_truth(clips: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """VQ, MQ, TA, TA's parts (color, shape, direction) and `total` = (VQ + MQ + TA) / 3, each (N,)."""
    from mmalign.toy.video_rewards import video_reward_components

    parts = {k: np.asarray(v, dtype=np.float64) for k, v in video_reward_components(clips, prompts).items()}
    parts["total"] = (parts["VQ"] + parts["MQ"] + parts["TA"]) / 3.0
    return parts


def compare(base: np.ndarray, aligned: np.ndarray, prompts: list[str]) -> dict:
    """Gains of every reward, win rates (the 1:1:1 total and each dimension, ties within 0.05 worth 1/2, 95%
    CIs) and the drift between the clips at equal seeds (mean RGB distance, 0-255 units)."""
    from mmalign.toy.experiment import pixel_drift, win_rate

    rb, ra = ground_truth(base, prompts), ground_truth(aligned, prompts)
    return {"base": {k: float(v.mean()) for k, v in rb.items()},
            "aligned": {k: float(v.mean()) for k, v in ra.items()},
            "gain": {k: float(ra[k].mean() - rb[k].mean()) for k in rb},
            "win_rate": {k: win_rate(ra[k], rb[k]) for k in ("total", *DIMS, "color")},
            "drift": pixel_drift(base, aligned)}


# -- stages ----------------------------------------------------------------------------------------------------------
def write_pairs(out: Path, pipe, n: int, steps: int, split: str, seed: int, progress: bool) -> dict:
    """`n` base clip pairs of `split` prompts, labelled by the annotator, as video_pair shards in `out`."""
    from mmalign.toy.video import video_prompt_seed_pairs
    from mmalign.toy.video_annotator import label_video_pairs, write_video_pair_shards

    pairs = video_prompt_seed_pairs(split, n)
    prompts = [p for p, _ in pairs]
    clips = generate(pipe, [p for p in prompts for _ in range(2)],
                     [clip_seed(s, j) for _, s in pairs for j in range(2)], steps, desc=f"{split} pairs",
                     progress=progress)
    a, b = clips[0::2], clips[1::2]
    ra, rb = ground_truth(a, prompts), ground_truth(b, prompts)
    labels = label_video_pairs({d: ra[d] for d in DIMS}, {d: rb[d] for d in DIMS}, rng=seed)
    write_video_pair_shards(out, a, b, prompts, labels, rewards_a={d: ra[d] for d in DIMS},
                            rewards_b={d: rb[d] for d in DIMS}, key_prefix=f"toyvideo-{split}", overwrite=True)
    vote = np.array([sum({"A": 1, "B": -1, "same": 0}[lab[d]] for d in DIMS) for lab in labels])
    return {"pairs": n, "ties_1_1_1": int((vote == 0).sum()),
            "same_per_dim": {d: int(sum(lab[d] == "same" for lab in labels)) for d in DIMS},
            "mean_reward": {d: float((ra[d].mean() + rb[d].mean()) / 2) for d in DIMS}}


def train_reward_model(out: Path, shards: Path, steps: int, pairs: int, progress: bool) -> str:
    """The toy video reward model on `shards`; returns its exported folder (reused if already there)."""
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    exported = out / "reward_model"
    if (exported / "mmalign_scorer.json").is_file():
        return str(exported)
    recipe = copy.deepcopy(RM_RECIPE)
    recipe["run"]["output_dir"] = str(out)
    recipe["data"]["shards"] = str(shards)
    recipe["train"].update(max_steps=steps, progress=progress,
                           batch_size=min(recipe["train"]["batch_size"], max(1, pairs // 2)))
    return train(load_train_config(None, [], defaults=recipe, source="<toy video reward recipe>")).outputs[
        "reward_model"]


def reward_model_accuracy(folder: str, shards: Path) -> dict:
    """Pairwise accuracy per dimension of the learned model on decided held-out labels (ties excluded)."""
    import torch

    from mmalign.data.collate import collate_video_pairs
    from mmalign.data.dataset import VideoPairDataset
    from mmalign.data.video import FrameSampling
    from mmalign.rewards.video import VideoScorer

    scorer = VideoScorer.from_pretrained(folder)
    data = VideoPairDataset(str(shards), frames=FrameSampling(max_frames=None), shuffle=False, rank=0, world_size=1)
    right = {d: 0 for d in DIMS}
    total = {d: 0 for d in DIMS}
    loader = torch.utils.data.DataLoader(data, batch_size=32, collate_fn=collate_video_pairs)
    with torch.inference_mode():
        for batch in loader:
            sa = scorer.score([torch.as_tensor(f) for f in batch["frames_a"]], batch["prompts"])
            sb = scorer.score([torch.as_tensor(f) for f in batch["frames_b"]], batch["prompts"])
            for j, d in enumerate(DIMS):
                label = torch.as_tensor(batch["labels"][d], dtype=torch.float32)
                decided = label != 0.5
                right[d] += int(((sa[:, j] > sb[:, j]) == (label > 0.5))[decided].sum())
                total[d] += int(decided.sum())
    return {d: right[d] / max(total[d], 1) for d in DIMS} | {"decided": total}


def prepare_data(out: Path, pipe, n_pairs: int, steps: int, rm_steps: int, with_reward_model: bool,
                 progress: bool) -> tuple[dict, str | None]:
    """The world's data under `out`, each stage reused when its record is in OUT/data/data.json: the labelled
    training pairs (`data/pairs`), the online runs' prompts (`data/prompts.txt`) and, `with_reward_model`, held-out
    pairs (`data/rm_heldout`) and the learned reward model trained on the training pairs with its held-out accuracy.
    Returns the record and the reward model's folder (None without it)."""
    from mmalign.toy.video import video_prompt_seed_pairs

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    info_path = data / "data.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "train" not in info:
        t0 = time.perf_counter()
        info["train"] = write_pairs(data / "pairs", pipe, n_pairs, steps, "train", 0, progress)
        info["train"]["seconds"] = round(time.perf_counter() - t0, 1)
    (data / "prompts.txt").write_text("\n".join(p for p, _ in video_prompt_seed_pairs("train", 60)) + "\n")
    rm = None
    if with_reward_model:
        if "heldout_rm" not in info:
            info["heldout_rm"] = write_pairs(data / "rm_heldout", pipe, max(60, n_pairs // 4), steps, "heldout", 1,
                                             progress)
        if "reward_model" not in info:
            t0 = time.perf_counter()
            folder = train_reward_model(out / "reward_model_run", data / "pairs", rm_steps, n_pairs, progress)
            info["reward_model"] = {"folder": folder, "seconds": round(time.perf_counter() - t0, 1),
                                    "heldout_accuracy": reward_model_accuracy(folder, data / "rm_heldout")}
        print(f"learned video reward model: held-out accuracy {info['reward_model']['heldout_accuracy']}")
        rm = info["reward_model"]["folder"]
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info, rm


def condition_config(condition: str, out: Path, base: str, seed: int, shards: Path, prompts: Path,
                     rm: str | None, online_steps: int, overrides: list[str]):
    """The recipe with this condition's changes and this run's paths, validated (overrides last)."""
    from mmalign.train.tasks import load_train_config

    recipe = copy.deepcopy(RECIPE)
    recipe["run"].update(output_dir=str(out), seed=seed)
    recipe["model"]["pretrained"] = base
    recipe["data"]["shards"] = str(shards)
    method = recipe["method"]
    if condition == "flow_dpo_t2":
        method["beta_schedule"] = "(1-t)^2"
    elif condition == "flow_rwr":
        recipe["method"] = {"name": "flow_rwr", "temperature": 0.1}
    elif condition == "sft":
        recipe["method"] = {"name": "sft"}
    elif condition.startswith("online"):
        reward = {"scorer": "toy_video", "dims": {d: 1.0 for d in DIMS}} if condition == "online_truth" else \
            {"scorer": f"video={rm}", "dims": {d: 1.0 for d in DIMS}}
        recipe["data"]["shards"] = None
        recipe["online"] = {**ONLINE, "prompts": str(prompts), "rewards": [reward]}
        recipe["train"].update(max_steps=online_steps, batch_size=4)
    return load_train_config(None, overrides if not condition.startswith("online") else
                             [o for o in overrides if not o.startswith(("train.batch_size", "train.max_steps",
                                                                        "data."))],
                             defaults=recipe, source=f"<toy video {condition} recipe>")


def bench(out: Path, base: str, conditions: list[str], n_seeds: int, n_pairs: int, n_eval: int, steps: int,
          rm_steps: int, online_steps: int, overrides: list[str], progress: bool = True) -> dict:
    from mmalign.toy.video import video_prompt_seed_pairs
    from mmalign.toy.video_pipeline import ToyVideoPipeline
    from mmalign.train.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    settings = {"base": str(base), "pairs": n_pairs, "eval_prompts": n_eval, "sample_steps": steps,
                "rm_steps": rm_steps, "online_steps": online_steps, "overrides": overrides}
    stamp = out / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{out} holds a bench with other settings ({stamp}); use another --out")
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    pipe = ToyVideoPipeline.from_pretrained(base)
    info, rm = prepare_data(out, pipe, n_pairs, steps, rm_steps, "online_learned" in conditions, progress)
    data, prompts_file = out / "data", out / "data" / "prompts.txt"

    heldout = video_prompt_seed_pairs("heldout", n_eval)
    eval_prompts, eval_seeds = [p for p, _ in heldout], [s for _, s in heldout]
    base_clips = generate(pipe, eval_prompts, eval_seeds, steps, desc="evaluate base", progress=progress)
    runs = []
    for condition in conditions:
        for seed in range(n_seeds):
            run_dir = out / "runs" / f"{condition}-seed{seed}"
            done = run_dir / "eval.json"
            if done.is_file():
                runs.append(json.loads(done.read_text()))
                continue
            t0 = time.perf_counter()
            cfg = condition_config(condition, run_dir / "train", base, seed, data / "pairs", prompts_file, rm,
                                   online_steps, overrides)
            cfg.train.progress = progress
            result = train(cfg)
            train_s = time.perf_counter() - t0
            aligned = ToyVideoPipeline.from_pretrained(base)
            aligned.load_lora_weights(result.outputs["lora"])
            clips = generate(aligned, eval_prompts, eval_seeds, steps, desc=f"evaluate {condition} {seed}",
                             progress=progress)
            np.save(run_dir / "eval_clips.npy", clips[:20])
            ev = compare(base_clips, clips, eval_prompts)
            row = {"condition": condition, "seed": seed, "gain": ev["gain"], "aligned": ev["aligned"],
                   "win_rate": {k: {"value": v["value"], "ci95": v["ci95"]} for k, v in ev["win_rate"].items()},
                   "drift": ev["drift"], "train_seconds": round(train_s, 1), "steps": cfg.train.max_steps}
            done.write_text(json.dumps(row, indent=2) + "\n")
            runs.append(row)
            print(f"{condition} seed {seed}: TA {ev['gain']['TA']:+.3f} VQ {ev['gain']['VQ']:+.3f} "
                  f"MQ {ev['gain']['MQ']:+.3f} colour {ev['gain']['color']:+.3f}, win rate "
                  f"{ev['win_rate']['total']['value']:.3f}, drift {ev['drift']:.1f}, {train_s:.0f} s")
    base_rewards = {k: float(v.mean()) for k, v in ground_truth(base_clips, eval_prompts).items()}
    summary = summarize(runs)
    table = markdown_table(summary, base_rewards, n_seeds)
    report = {"base": base_rewards, "data": info, "runs": runs, "summary": summary, "settings": settings}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(f"# mmalign bench toy-video\n\n{table}\n")
    plot(runs, out / "bench.png")
    best = max(summary, key=lambda c: summary[c]["TA"][0])
    save_samples(out, base_clips, np.load(out / "runs" / f"{best}-seed0" / "eval_clips.npy"), eval_prompts, best,
                 strip=16)
    report["table"] = table
    return report


def save_samples(out: Path, base_clips: np.ndarray, clips: np.ndarray, prompts: list[str], label: str,
                 strip: int) -> None:
    """OUT/samples.gif (every clip of `clips` beside the base's at the same prompt and seed) and OUT/samples.png
    (the first `strip` clips of those pairs, captioned)."""
    from mmalign.toy.video import save_clip_gif, save_clip_strip

    k = len(clips)
    both = np.stack([base_clips[:k], clips], 1).reshape(2 * k, *clips.shape[1:])
    save_clip_gif(both, str(out / "samples.gif"), ncol=8, scale=3)
    shown = min(strip, len(both))
    save_clip_strip(both[:shown], str(out / "samples.png"), scale=3,
                    captions=[f"{'base' if j % 2 == 0 else label}: {prompts[j // 2]}" for j in range(shown)])


def summarize(runs: list[dict]) -> dict:
    """Per condition: [mean, sd over seeds] of each gain, the total and TA win rates, and the drift."""
    out = {}
    for cond in dict.fromkeys(r["condition"] for r in runs):
        rows = [r for r in runs if r["condition"] == cond]

        def ms(values):
            return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]

        out[cond] = {**{k: ms([r["gain"][k] for r in rows]) for k in (*DIMS, "color", "total")},
                     "win_total": ms([r["win_rate"]["total"]["value"] for r in rows]),
                     "win_total_ci95_seed0": rows[0]["win_rate"]["total"]["ci95"],
                     "win_TA": ms([r["win_rate"]["TA"]["value"] for r in rows]),
                     "drift": ms([r["drift"] for r in rows]),
                     "train_seconds": ms([r["train_seconds"] for r in rows]), "seeds": len(rows)}
    return out


def markdown_table(summary: dict, base: dict, n_seeds: int) -> str:
    head = ("| condition | VQ gain | MQ gain | TA gain | colour gain | win rate (1:1:1) | TA win rate | drift | "
            "train s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for cond, s in summary.items():
        cells = [f"{s[k][0]:+.3f} ± {s[k][1]:.3f}" for k in (*DIMS, "color")]
        cells += [f"{s['win_total'][0]:.3f} ± {s['win_total'][1]:.3f}", f"{s['win_TA'][0]:.3f} ± {s['win_TA'][1]:.3f}",
                  f"{s['drift'][0]:.1f} ± {s['drift'][1]:.1f}", f"{s['train_seconds'][0]:.0f}"]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Base on the held-out prompts: VQ {base['VQ']:.3f}, MQ {base['MQ']:.3f}, TA {base['TA']:.3f} "
                 f"(colour {base['color']:.3f}); mean ± sd over {n_seeds} seeds; win rates: ties within 0.05 count "
                 "1/2 (the seed-0 95% CIs are in bench.json).")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """TA gain (y) against drift from the base (x), one marker per run, one colour per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for cond in dict.fromkeys(r["condition"] for r in runs):
        rows = [r for r in runs if r["condition"] == cond]
        ax.scatter([r["drift"] for r in rows], [r["gain"]["TA"] for r in rows], label=cond, s=30)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("drift from base (mean RGB distance at equal seeds)")
    ax.set_ylabel("TA gain (ground truth)")
    ax.set_title("video toy world: text alignment vs drift")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
