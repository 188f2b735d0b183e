"""`mmalign bench toy-music`: DPO and SFT (the control) on the token-music toy world, over seeds.

1. Data: `--samples-per-prompt` S code sequences per training prompt (`music_prompt_seed_pairs("train", P)`)
   sampled from the toy MusicGen base (`assets/toy/music`, made by `scripts/pretrain_toy_music.py`) with
   `MusicAdapter.generate` at temperature 1, no top-k and no guidance (samples of π itself, whose log-probability
   the task scores). The simulated annotator (`mmalign.toy.music_annotator.label_music_pairs`, on the ground-truth
   rewards) labels every one of the S (S - 1) / 2 pairs of a prompt; the best and the worst sample by their
   annotator wins on the pattern dimension (ties worth 1/2, first index on equal wins) form the prompt's pair,
   oriented by the annotator's own label of those two. A "same" there (all samples tied on the pattern, or the two
   within the annotator's tie margin) drops the prompt's pair and is counted. Written as `music_pair` shards with
   the ground-truth scores beside the labels.
2. A learned reward model on the same annotator's labels: the reward task (`task: reward`, `model.kind: music`,
   `REWARD_RECIPE`, through the task registry) trains a Bradley-Terry music reward model on every pair of the
   round robin the annotator decided on the pattern (`data/rm_pairs`, the labels the pairs above were picked
   with), reading codebook 0 (the melody), and its pairwise
   accuracy is measured on a held-out labelled set: the annotator's best vs worst of S base samples for each of the
   `--eval-prompts` held-out (prompt, seed) pairs, written like the training pairs (`data/heldout_pairs`). Reported
   as `data.reward_model` (`heldout_accuracy`, the fraction of held-out pairs whose annotator-chosen side gets the
   higher reward; chance is 0.5). A reward task without the music kind skips the stage (`reward_model.skipped`).
3. Each condition trains a LoRA on the base's decoder blocks with `task: music`, changing only what the condition
   names: `dpo` (sigmoid, β below), `sft` (the chosen codes' per-code NLL, no reference: the control that
   imitates the annotator's winners without their losers) or `rankdpo` (every prompt's S samples as a
   `music_ranked` list scored by their round-robin wins on the pattern, `data/ranked`; LambdaRank-weighted DPO over
   the list's pairs, same β; 2B/S lists per step, the same number of sequences as B pairs).
4. Every aligned model is compared with the base on held-out prompts (`music_prompt_seed_pairs("heldout", E)`) at
   equal seeds: the gain of pattern adherence and quality (and quality's parts), the win rate over the base on each
   (ties within 0.05 worth 1/2, 95% CI), and the drift: the fraction of codes (K x T per sample) that changed, and
   of codebook-0 notes.

Equal seeds: `MusicAdapter.generate` seeds torch's global generator once per call, so a sample depends on its
prompt, its seed and the batch it is generated in. Generation here always runs the same rows in the same batches
(`--gen-batch`) with a batch seed derived from the rows' seeds, so base and aligned models draw the same random
numbers at every step and an unchanged model reproduces the base's codes exactly (tests/test_music_proof.py).

Writes `OUT/bench.json` and `OUT/bench.md` (the table, mean ± sd over seeds). Finished stages (data, the base's
held-out codes, each run with its evaluation) are reused when the command runs again with the same `OUT` and
settings (conditions and seeds may be added); other settings over the same `OUT` are refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BASE_MODEL = REPO / "assets" / "toy" / "music"
DIMS = ("pattern", "quality")
PARTS = ("pattern", "quality", "in_key", "sounding", "timbre")
CONDITIONS = ("dpo", "sft", "rankdpo")

# The shared recipe: LoRA on the decoder blocks, one setting for both conditions.
# β on the summed-log-prob scale: a sample is K x T = 4 x 32 = 128 codes, 96 of them timbre tokens drawn uniformly
# from an 8-code band (ln 8 nats each, nothing to learn) and 32 melody codes whose choice is made at the 8 note
# onsets. What alignment has to move is the pattern: a base trained on captions wrong half of the time gives the
# captioned pattern probability ~0.5 (the posterior of the noisy captions); raising it to 0.9 moves a right-pattern
# sample's log π by ln(0.9 / 0.5) = +0.6 nats and a wrong-pattern one's by ln(0.1 / 0.5) = -1.6 nats, a log-ratio
# margin of ~2.2 nats. β = 1 makes that margin worth σ(2.2) = 0.9 on the sigmoid loss, so the loss has done its work
# once the pattern has moved; TRL's 0.1 (made for LLM answers of hundreds of tokens) would need a ~22-nat margin,
# which the policy can only reach by also reshaping the 120 other codes of each sample (drift, lost quality).
RECIPE = {
    "task": "music",
    "run": {"seed": 0, "overwrite": True},
    "model": {"pretrained": str(BASE_MODEL), "reference": "auto", "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0}},
    "method": {"name": "dpo", "loss_type": "sigmoid", "beta": 1.0},
    "data": {"shuffle_buffer": 1000},
    "optim": {"lr": 5e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10, "weight_decay": 0.0},
    "train": {"max_steps": 200, "batch_size": 16, "checkpoint_every": 0, "log_every": 5},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bench-toy-music", help="output folder")
    parser.add_argument("--base", default=str(BASE_MODEL), help="base MusicGen folder (default: assets/toy/music)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated subset of {CONDITIONS}")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per condition (default 3)")
    parser.add_argument("--prompts", type=int, default=640,
                        help="training (prompt, seed) pairs, cycling through the 160 captions (default 640)")
    parser.add_argument("--samples-per-prompt", type=int, default=4,
                        help="base samples per training prompt, best vs worst by the annotator (default 4)")
    parser.add_argument("--eval-prompts", type=int, default=480, help="held-out (prompt, seed) pairs")
    parser.add_argument("--gen-batch", type=int, default=64, help="sequences per generate call (part of the seeds)")
    parser.add_argument("--rm-steps", type=int, default=REWARD_RECIPE["train"]["max_steps"],
                        help="the learned reward model's training steps (default %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override the shared recipe (e.g. train.max_steps=100 method.beta=0.5)")


def run(args: argparse.Namespace) -> int:
    from mmalign.cli import comma_choices

    try:
        conditions = comma_choices("--conditions", args.conditions, CONDITIONS)
    except ValueError as err:
        print(f"mmalign bench toy-music: {err}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.prompts < 2 or args.samples_per_prompt < 2 or args.eval_prompts < 2 \
            or args.gen_batch < 1 or args.rm_steps < 1:
        print("mmalign bench toy-music: need --seeds >= 1, --prompts >= 2, --samples-per-prompt >= 2, "
              "--eval-prompts >= 2, --gen-batch >= 1 and --rm-steps >= 1", file=sys.stderr)
        return 2
    config = Path(args.base) / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "musicgen":
        print(f"mmalign bench toy-music: no base model at {args.base} (expected a MusicGen folder whose config.json "
              "has model_type 'musicgen'; make it with scripts/pretrain_toy_music.py)", file=sys.stderr)
        return 2
    report = bench(Path(args.out), args.base, conditions, args.seeds, args.prompts, args.samples_per_prompt,
                   args.eval_prompts, args.gen_batch, list(args.overrides), args.progress, args.rm_steps)
    print("\n" + report["table"])
    print(f"\n{Path(args.out) / 'bench.md'}")
    return 0


# The learned reward model's recipe (`task: reward`, kind music): the codebook size and K come from the base. It
# reads codebook 0 only (the melody: the annotator decides pairs on the pattern) and trains on every pair the
# annotator decided (`data/rm_pairs`), not only each prompt's best and worst. Measured on 442 held-out pairs
# (docs/music.md): all 4 codebooks, best vs worst, 300 steps: 0.47 (the timbre tokens, random per frame, let it
# memorise its 587 pairs); codebook 0, best vs worst, 1500 steps: 0.80; codebook 0, all 2,249 pairs, 1500 steps:
# 0.87 (shuffle buffer 1000) and 0.89 (this recipe's 4000).
REWARD_RECIPE = {
    "task": "reward",
    "run": {"seed": 0, "overwrite": True},
    "model": {"kind": "music", "name": "toy_music_reward",
              "music": {"width": 64, "layers": 2, "heads": 4, "max_frames": 64, "codebooks": [0]}},
    "method": {"loss": "bt"},
    "data": {"shuffle_buffer": 4000},
    "optim": {"lr": 1e-3, "weight_decay": 0.0, "lr_warmup_steps": 0},
    "train": {"max_steps": 1500, "batch_size": 16, "checkpoint_every": 0, "log_every": 10},
}


# -- generation and evaluation -------------------------------------------------------------------------------------
def sample_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th sample generated for a (prompt, seed) pair."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def batch_seed(seeds: Sequence[int]) -> int:
    """The seed of one generate call from its rows' seeds (same rows -> same random numbers)."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, dtype=np.uint32)[0])


def generate_codes(adapter, prompts: Sequence[str], seeds: Sequence[int], *, batch: int = 64,
                   guidance_scale: float = 1.0, desc: str = "generate", progress: bool = True) -> np.ndarray:
    """Codes (N, K, 32) int64 of the toy phrase length sampled from `adapter`'s model at temperature 1, no top-k:
    rows are cut into consecutive batches of `batch`, each one `generate` call seeded by `batch_seed` of its rows'
    seeds (the module docstring's equal seeds)."""
    from tqdm.auto import tqdm

    from mmalign.toy.music import NUM_FRAMES

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress):
        rows = slice(i, i + batch)
        codes = adapter.generate(list(prompts[rows]), frames=NUM_FRAMES, top_k=0, guidance_scale=guidance_scale,
                                 seed=batch_seed(seeds[rows]))
        out.append(codes.cpu().numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros((0, adapter.num_codebooks, NUM_FRAMES), np.int64)


def ground_truth(codes: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Pattern adherence, quality and quality's parts (in_key, sounding, timbre), each (N,) float64."""
    from mmalign.toy.music_rewards import music_reward_components

    return {k: np.asarray(v, dtype=np.float64) for k, v in music_reward_components(codes, list(prompts)).items()}


def pattern_chance(codes: np.ndarray, prompts: Sequence[str]) -> float:
    """The pattern adherence a model that ignores the caption's pattern word would get with these codes: the mean,
    over samples and the 4 patterns, of the adherence to the caption with that pattern word (captions name each
    pattern equally often)."""
    from mmalign.toy.music import MUSIC_CAPTION_TEMPLATE, PATTERNS, parse_music_caption
    from mmalign.toy.music_rewards import pattern_adherence

    parsed = [parse_music_caption(p) for p in prompts]
    scores = [pattern_adherence(codes, [MUSIC_CAPTION_TEMPLATE.format(pattern=pattern, instrument=i, key=k, mode=m)
                                        for _, i, k, m in parsed]) for pattern in PATTERNS]
    return float(np.mean(scores))


def code_drift(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Drift between codes (N, K, T) generated at equal seeds: `codes`, the fraction of the N·K·T codes that
    differ; `notes`, the fraction of codebook-0 notes (`note_sequence`) that differ."""
    from mmalign.toy.music_rewards import note_sequence

    if a.shape != b.shape:
        raise ValueError(f"drift needs codes of the same shape, got {a.shape} and {b.shape}")
    return {"codes": float((a != b).mean()), "notes": float((note_sequence(a) != note_sequence(b)).mean())}


def compare(base: np.ndarray, aligned: np.ndarray, prompts: Sequence[str]) -> dict:
    """Means and gains of every reward, win rates of pattern and quality over the base (ties within 0.05 worth
    1/2, 95% CIs) and the drift at equal seeds."""
    from mmalign.toy.experiment import win_rate

    rb, ra = ground_truth(base, prompts), ground_truth(aligned, prompts)
    return {"base": {k: float(v.mean()) for k, v in rb.items()},
            "aligned": {k: float(v.mean()) for k, v in ra.items()},
            "gain": {k: float(ra[k].mean() - rb[k].mean()) for k in rb},
            "win_rate": {k: win_rate(ra[k], rb[k]) for k in DIMS},
            "drift": code_drift(base, aligned)}


# -- stages ----------------------------------------------------------------------------------------------------------
def round_robin(rewards: dict[str, np.ndarray], rng: np.random.Generator | int
                ) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """The annotator's labels of all S (S - 1) / 2 pairs (i, j), i < j, of each prompt's samples: `ii`, `jj` (the
    pairs, lexicographic) and the label dicts, prompt-major (pair q * len(ii) + n is prompt q's n-th pair)."""
    from mmalign.toy.music_annotator import label_music_pairs
    from mmalign.toy.music_rewards import MUSIC_DIMENSIONS

    ii, jj = np.triu_indices(rewards["pattern"].shape[1], 1)
    labels = label_music_pairs({d: rewards[d][:, ii].reshape(-1) for d in MUSIC_DIMENSIONS},
                               {d: rewards[d][:, jj].reshape(-1) for d in MUSIC_DIMENSIONS}, rng)
    return ii, jj, labels


def round_robin_scores(ii: np.ndarray, jj: np.ndarray, labels: list[dict[str, str]], shape: tuple[int, int],
                       decide_by: str = "pattern") -> np.ndarray:
    """(P, S) annotator scores of a round robin (`round_robin`): each sample's wins on `decide_by`, 1/2 per
    "same"."""
    p, s = shape
    won = np.array([{"A": 1.0, "B": 0.0, "same": 0.5}[lab[decide_by]] for lab in labels]).reshape(p, len(ii))
    score = np.zeros((p, s))
    np.add.at(score, (slice(None), ii), won)
    np.add.at(score, (slice(None), jj), 1.0 - won)
    return score


def best_and_worst(rewards: dict[str, np.ndarray], rng: np.random.Generator | int,
                   decide_by: str = "pattern") -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """The annotator's best and worst of S samples per prompt, and its label of that pair.

    rewards: {"pattern", "quality"} -> (P, S) ground-truth rewards. The annotator (`label_music_pairs`, default
    temperature and tie margin) labels all S (S - 1) / 2 pairs of each prompt (pairs (i, j), i < j, in
    lexicographic order, prompts in order); a sample scores its wins on `decide_by` plus 1/2 per "same". Returns
    `best`, `worst` (P,) sample indices (the highest and lowest score, first index on equal scores, always two
    different samples) and per prompt the round robin's label dict of the pair (best as "A", worst as "B"), which
    may say "B" (the annotator is noisy) or "same" (dropped by the writer).
    """
    ii, jj, labels = round_robin(rewards, rng)
    return pick_best_and_worst(ii, jj, labels, rewards[decide_by].shape, decide_by)


def pick_best_and_worst(ii: np.ndarray, jj: np.ndarray, labels: list[dict[str, str]], shape: tuple[int, int],
                        decide_by: str = "pattern") -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """`best_and_worst` from a round robin already labelled (`round_robin`'s `ii`, `jj`, `labels`; `shape` (P, S))."""
    score = round_robin_scores(ii, jj, labels, shape, decide_by)
    p = score.shape[0]
    order = np.argsort(-score, axis=1, kind="stable")
    best, worst = order[:, 0], order[:, -1]
    flip = {"A": "B", "B": "A", "same": "same"}
    pair_labels = []
    for q in range(p):
        lo, hi = min(best[q], worst[q]), max(best[q], worst[q])
        lab = labels[q * len(ii) + int(np.flatnonzero((ii == lo) & (jj == hi))[0])]
        pair_labels.append(dict(lab) if best[q] == lo else {d: flip[v] for d, v in lab.items()})
    return best, worst, pair_labels


def write_pairs(out: Path, adapter, n_prompts: int, samples: int, batch: int, seed: int, progress: bool,
                split: str = "train", all_pairs: Path | None = None, ranked: Path | None = None) -> dict:
    """S samples per prompt of `split` from the base, the annotator's best vs worst as music_pair shards in `out`
    (with `all_pairs`, every pair the annotator decided on the pattern there: the reward model's data; with
    `ranked`, each prompt's S samples as a music_ranked list scored by their round-robin wins, for rankdpo; a list
    whose samples all tie is dropped)."""
    from mmalign.toy.music import music_prompt_seed_pairs
    from mmalign.toy.music_annotator import write_music_pair_shards

    pairs = music_prompt_seed_pairs(split, n_prompts)
    prompts = [p for p, _ in pairs]
    codes = generate_codes(adapter, [p for p in prompts for _ in range(samples)],
                           [sample_seed(s, j) for _, s in pairs for j in range(samples)], batch=batch,
                           desc=f"{split} samples", progress=progress)
    rewards = ground_truth(codes, [p for p in prompts for _ in range(samples)])
    grid = {d: rewards[d].reshape(n_prompts, samples) for d in DIMS}
    ii, jj, round_labels = round_robin(grid, seed)  # one annotator pass: the pairs, the lists and the RM data
    best, worst, labels = pick_best_and_worst(ii, jj, round_labels, (n_prompts, samples))
    codes = codes.reshape(n_prompts, samples, *codes.shape[1:])
    rows = np.arange(n_prompts)
    ra, rb = {d: grid[d][rows, best] for d in DIMS}, {d: grid[d][rows, worst] for d in DIMS}
    prov = {"dataset": "mmalign-toy-music", "generator": str(adapter.pretrained), "samples_per_prompt": samples}
    write_music_pair_shards(out, codes[rows, best], codes[rows, worst], prompts, labels, rewards_a=ra, rewards_b=rb,
                            key_prefix=f"toymusic-{split}", provenance=prov, overwrite=True)
    stats = {}
    if ranked is not None:
        from mmalign.data.schemas import music_ranked_sample
        from mmalign.data.writer import ShardSetWriter

        wins = round_robin_scores(ii, jj, round_labels, (n_prompts, samples))
        lists = 0
        with ShardSetWriter(ranked, "music_ranked", overwrite=True) as writer:
            for q in range(n_prompts):
                if wins[q].max() > wins[q].min():
                    writer.write(music_ranked_sample(f"toymusic-{split}-{q:09d}", list(codes[q]), prompt=prompts[q],
                                                     scores=wins[q].tolist(), scorers=["toy annotator (pattern wins)"],
                                                     frame_rate=50.0, true_pattern=grid["pattern"][q].tolist()))
                    lists += 1
        stats["ranked_lists"] = lists
    if all_pairs is not None:
        q, a, b = np.repeat(rows, len(ii)), np.tile(ii, n_prompts), np.tile(jj, n_prompts)
        same = sum(lab["pattern"] == "same" for lab in round_labels)
        write_music_pair_shards(all_pairs, codes[q, a], codes[q, b], [prompts[i] for i in q], round_labels,
                                rewards_a={d: grid[d][q, a] for d in DIMS}, rewards_b={d: grid[d][q, b] for d in DIMS},
                                key_prefix=f"toymusic-{split}-all", provenance=prov, overwrite=True)
        stats.update(all_pairs_written=len(round_labels) - same, all_pairs_same=same)
    decided = np.array([lab["pattern"] != "same" for lab in labels])
    a_won = np.array([lab["pattern"] == "A" for lab in labels])
    chosen = np.where(a_won, ra["pattern"], rb["pattern"])[decided]
    rejected = np.where(a_won, rb["pattern"], ra["pattern"])[decided]
    return {"prompts": n_prompts, "samples_per_prompt": samples, "pairs_written": int(decided.sum()),
            "ties_dropped": int((~decided).sum()),
            "all_samples_tied": int((grid["pattern"].max(1) - grid["pattern"].min(1) <= 0.02).sum()),
            "mean_reward_of_samples": {d: float(grid[d].mean()) for d in DIMS},
            "chosen_pattern": float(chosen.mean()) if decided.any() else None,
            "rejected_pattern": float(rejected.mean()) if decided.any() else None,
            "annotator_agrees_with_truth": float((chosen > rejected).mean()) if decided.any() else None, **stats}


def reward_model_support() -> str | None:
    """None when the reward task can train a music reward model; else why the reward-model stage is skipped."""
    from typing import get_args

    from mmalign.train.tasks import get_task

    # through the task registry: the reward task's module imports the image modalities, which music must not
    model_config = get_task("reward").config_class.model_fields["model"].annotation
    kinds = get_args(model_config.model_fields["kind"].annotation)
    if "music" not in kinds:
        return (f"the reward task (task: reward) has no music model kind (model.kind is one of {', '.join(kinds)}); "
                "no learned reward model was trained on the annotator pairs")
    return None


def _num_pairs(shards: Path) -> int:
    from mmalign.data.manifest import load_manifest

    return int(load_manifest(shards).num_samples)


def train_reward_model(out: Path, pairs: Path, heldout: Path, adapter, progress: bool = True,
                       steps: int = REWARD_RECIPE["train"]["max_steps"]) -> dict:
    """`REWARD_RECIPE` on the annotator's `pairs` (the reward task, through `mmalign.train.trainer.train`), with
    `heldout` as its validation set: {"heldout_accuracy", "heldout_pairs", "train_accuracy_last10", "steps",
    "seconds", "model"} (the exported `MusicCodeScorer` folder)."""
    from mmalign.train.metrics import read_metrics
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    recipe = copy.deepcopy(REWARD_RECIPE)
    recipe["run"]["output_dir"] = str(out)
    recipe["model"]["music"].update(vocab_size=int(adapter.vocab_size), num_codebooks=int(adapter.num_codebooks))
    recipe["data"]["shards"] = str(pairs)
    recipe["train"]["max_steps"] = steps
    # a bench with fewer pairs than a batch (tiny test settings) trains on all of them per step
    recipe["train"]["batch_size"] = min(recipe["train"]["batch_size"], _num_pairs(pairs))
    recipe["validation"] = {"shards": str(heldout), "max_pairs": 100_000}
    cfg = load_train_config(None, [], defaults=recipe, source="<toy music reward-model recipe>")
    cfg.train.progress = progress
    t0 = time.perf_counter()
    result = train(cfg)
    evaluation = json.loads(Path(result.outputs["eval"]).read_text())
    last = [r["rewards/accuracy"] for r in read_metrics(result.run_dir) if "rewards/accuracy" in r][-10:]
    return {"heldout_accuracy": evaluation["accuracy"], "heldout_pairs": evaluation["num_pairs"],
            "train_accuracy_last10": float(np.mean(last)) if last else None, "steps": cfg.train.max_steps,
            "seconds": round(time.perf_counter() - t0, 1), "model": result.outputs["reward_model"]}


def condition_config(condition: str, out: Path, base: str, seed: int, shards: Path, overrides: list[str],
                     samples: int = 4):
    """The recipe with this condition's changes and this run's paths, validated (overrides last)."""
    from mmalign.train.tasks import load_train_config

    recipe = copy.deepcopy(RECIPE)
    recipe["run"].update(output_dir=str(out), seed=seed)
    recipe["model"]["pretrained"] = str(base)
    recipe["data"]["shards"] = str(shards)
    if condition == "sft":
        recipe["method"] = {"name": "sft"}
    if condition == "rankdpo":  # lists of S: as many sequences per step as the pairs' batch
        recipe["method"]["name"] = "rankdpo"
        recipe["train"]["batch_size"] = max(1, recipe["train"]["batch_size"] * 2 // samples)
    return load_train_config(None, overrides, defaults=recipe, source=f"<toy music {condition} recipe>")


def load_aligned(base: str, lora: str):
    """The base with a trained LoRA (peft folder) on its decoder, as a `MusicAdapter`."""
    from peft import PeftModel

    from mmalign.music.adapter import load_music

    adapter = load_music(base)
    adapter.model = PeftModel.from_pretrained(adapter.model, lora).eval()
    return adapter


def bench(out: Path, base: str, conditions: list[str], n_seeds: int, n_prompts: int, samples: int, n_eval: int,
          gen_batch: int, overrides: list[str], progress: bool = True,
          rm_steps: int = REWARD_RECIPE["train"]["max_steps"]) -> dict:
    from mmalign.music.adapter import load_music
    from mmalign.toy.music import music_prompt_seed_pairs
    from mmalign.train.metrics import read_metrics
    from mmalign.train.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    settings = {"base": str(base), "prompts": n_prompts, "samples_per_prompt": samples, "eval_prompts": n_eval,
                "gen_batch": gen_batch, "overrides": overrides, "rm_steps": rm_steps}
    stamp = out / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{out} holds a bench with other settings ({stamp}); use another --out")
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    base_adapter = load_music(base)
    data = out / "data"
    info_path = data / "data.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
    else:
        t0 = time.perf_counter()
        info = {"train": write_pairs(data / "pairs", base_adapter, n_prompts, samples, gen_batch, 0, progress,
                                     all_pairs=data / "rm_pairs", ranked=data / "ranked")}
        info["train"]["seconds"] = round(time.perf_counter() - t0, 1)
        skipped = reward_model_support()
        if skipped or info["train"]["pairs_written"] == 0:
            info["reward_model"] = {"skipped": skipped or "no training pairs"}
        else:
            info["heldout"] = write_pairs(data / "heldout_pairs", base_adapter, n_eval, samples, gen_batch, 1,
                                          progress, split="heldout")
            info["reward_model"] = ({"skipped": "the annotator tied every held-out pair"}
                                    if info["heldout"]["pairs_written"] == 0 else
                                    train_reward_model(data / "reward_model", data / "rm_pairs", data / "heldout_pairs",
                                                       base_adapter, progress, rm_steps))
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    if info["train"]["pairs_written"] == 0:
        raise SystemExit(f"{data / 'pairs'}: the annotator tied every prompt's best and worst samples, no pair to "
                         "train on; use more --samples-per-prompt or another base")

    heldout = music_prompt_seed_pairs("heldout", n_eval)
    eval_prompts, eval_seeds = [p for p, _ in heldout], [s for _, s in heldout]
    base_path = out / "eval" / "base_codes.npy"
    if base_path.is_file():
        base_codes = np.load(base_path)
    else:
        base_codes = generate_codes(base_adapter, eval_prompts, eval_seeds, batch=gen_batch, desc="evaluate base",
                                    progress=progress)
        base_path.parent.mkdir(exist_ok=True)
        np.save(base_path, base_codes)
    runs = []
    for condition in conditions:
        for seed in range(n_seeds):
            run_dir = out / "runs" / f"{condition}-seed{seed}"
            done = run_dir / "eval.json"
            if done.is_file():
                runs.append(json.loads(done.read_text()))
                continue
            t0 = time.perf_counter()
            shards = data / ("ranked" if condition == "rankdpo" else "pairs")
            if not (shards / "manifest.json").is_file():
                raise SystemExit(f"{shards}: no shard set (a data stage of an older bench); use another --out")
            cfg = condition_config(condition, run_dir / "train", base, seed, shards, overrides, samples)
            cfg.train.progress = progress
            result = train(cfg)
            train_s = time.perf_counter() - t0
            codes = generate_codes(load_aligned(base, result.outputs["lora"]), eval_prompts, eval_seeds,
                                   batch=gen_batch, desc=f"evaluate {condition} {seed}", progress=progress)
            np.save(run_dir / "eval_codes.npy", codes)
            ev = compare(base_codes, codes, eval_prompts)
            last = read_metrics(result.run_dir)[-5:]
            train_end = {k: float(np.mean([r[k] for r in last])) for k in ("loss", "rewards/accuracies",
                                                                            "rewards/margins") if k in last[-1]}
            row = {"condition": condition, "seed": seed, "gain": ev["gain"], "aligned": ev["aligned"],
                   "win_rate": ev["win_rate"], "drift": ev["drift"], "train_end_last5": train_end,
                   "train_seconds": round(train_s, 1), "steps": cfg.train.max_steps}
            done.write_text(json.dumps(row, indent=2) + "\n")
            runs.append(row)
            print(f"{condition} seed {seed}: pattern {ev['gain']['pattern']:+.3f} quality "
                  f"{ev['gain']['quality']:+.3f}, pattern win rate {ev['win_rate']['pattern']['value']:.3f}, drift "
                  f"{ev['drift']['codes']:.3f} of codes, {train_s:.0f} s")
    base_rewards = {k: float(v.mean()) for k, v in ground_truth(base_codes, eval_prompts).items()}
    base_rewards["pattern_chance"] = pattern_chance(base_codes, eval_prompts)
    summary = summarize(runs)
    table = markdown_table(summary, base_rewards, info, n_seeds, n_eval)
    report = {"base": base_rewards, "data": info, "runs": runs, "summary": summary, "settings": settings,
              "recipe": RECIPE}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(f"# mmalign bench toy-music\n\n{table}\n")
    report["table"] = table
    return report


def summarize(runs: list[dict]) -> dict:
    """Per condition: [mean, sd over seeds] of every gain, the pattern and quality win rates, the drifts and the
    training time; the seed-0 run's 95% CIs of the win rates."""
    def ms(values):
        return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]

    out = {}
    for cond in dict.fromkeys(r["condition"] for r in runs):
        rows = [r for r in runs if r["condition"] == cond]
        out[cond] = {**{k: ms([r["gain"][k] for r in rows]) for k in PARTS},
                     **{f"win_{d}": ms([r["win_rate"][d]["value"] for r in rows]) for d in DIMS},
                     **{f"win_{d}_ci95_seed0": rows[0]["win_rate"][d]["ci95"] for d in DIMS},
                     "drift_codes": ms([r["drift"]["codes"] for r in rows]),
                     "drift_notes": ms([r["drift"]["notes"] for r in rows]),
                     "train_seconds": ms([r["train_seconds"] for r in rows]), "seeds": len(rows)}
    return out


def markdown_table(summary: dict, base: dict, info: dict, n_seeds: int, n_eval: int) -> str:
    head = ("| condition | pattern gain | quality gain | pattern win rate | quality win rate | drift (codes) | "
            "drift (notes) | train s |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for cond, s in summary.items():
        cells = [f"{s[k][0]:+.3f} ± {s[k][1]:.3f}" for k in DIMS]
        cells += [f"{s[f'win_{d}'][0]:.3f} ± {s[f'win_{d}'][1]:.3f}" for d in DIMS]
        cells += [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("drift_codes", "drift_notes")]
        cells.append(f"{s['train_seconds'][0]:.0f}")
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    t = info["train"]
    rm = info.get("reward_model", {})
    agree = t["annotator_agrees_with_truth"]
    lines += ["",
              f"Base on {n_eval} held-out prompts at equal seeds: pattern {base['pattern']:.3f} (a caption-ignoring "
              f"model: {base['pattern_chance']:.3f}), quality {base['quality']:.3f} (in key {base['in_key']:.3f}, "
              f"sounding {base['sounding']:.3f}, timbre {base['timbre']:.3f}). Mean ± sd over {n_seeds} seeds; win "
              "rates over the base with ties within 0.05 worth 1/2 (seed-0 95% CIs: "
              + "; ".join(f"{c} pattern [{s['win_pattern_ci95_seed0'][0]:.3f}, {s['win_pattern_ci95_seed0'][1]:.3f}]"
                          for c, s in summary.items())
              + "); drift: fraction of codes (and of codebook-0 notes) that changed at equal seeds.",
              "",
              f"Data: {t['samples_per_prompt']} base samples for each of {t['prompts']} training prompts; the "
              f"annotator's best vs worst on the pattern: {t['pairs_written']} pairs written, {t['ties_dropped']} "
              f"ties dropped ({t['all_samples_tied']} prompts with all samples tied on the pattern)"
              + (f"; the chosen side's true pattern is higher in {agree:.1%} of the pairs (chosen "
                 f"{t['chosen_pattern']:.3f}, rejected {t['rejected_pattern']:.3f})." if agree is not None else "."),
              "",
              "Learned reward model: " + (f"skipped: {rm['skipped']}." if rm.get("skipped") else
                                          f"held-out pairwise accuracy {rm['heldout_accuracy']:.3f} on "
                                          f"{rm['heldout_pairs']} annotator pairs of held-out prompts (chance 0.5; "
                                          f"the annotator's chosen side has the higher true pattern in "
                                          f"{info['heldout']['annotator_agrees_with_truth']:.1%} of them), "
                                          f"trained {rm['steps']} steps on the training pairs (task: reward, "
                                          "model.kind music).")]
    return "\n".join(lines)
