"""Music preference pairs a MusicGen model makes itself (MusicRL's recipe on open models): N samples per prompt,
scored by audio rewards, the best against the worst, written as `music_pair` shards.

Sampling: sample j of prompt i is one `MusicAdapter.generate` call seeded `sample_seed(seed, i, j)`, so it depends
only on the model, its prompt, its seed and the sampling settings (frames, temperature, top_k, guidance_scale),
never on batching or on where a run was resumed. Its codes (K, frames) are kept as generated: the shards hold them,
never a re-encoding of the audio (EnCodec's encode(decode(c)) is not c). They are decoded with the model's EnCodec
only for the rewards, the N samples of a prompt as one batch.

Rewards: audio scorers (`clap`, `clap=FOLDER`, an exported CLAP scorer folder, a user function
`package.module:function` with `fn.modality = "audio"`; a learned audio reward model plugs in the same way), each
with a weight, and per-dimension weights for multi-dimension ones: the reward list and combination of
`mmalign guide` (`mmalign.rewards.combine.RewardSet`; on the command line `clap:1.0,my_pkg.quality:score:0.5`).
A sample's reward is `R = sum over columns of weight · score` (a scalar scorer is one column named after it, a
multi-dimension one a column `name/dim` per dimension); with `normalize="z"` each column is first z-normalised over
the prompt's N samples, so rewards of different scales count as their weights say. The pair of a prompt is its best
sample by R (chosen) against its worst (rejected); the first such sample wins a tie of R. A prompt whose best and
worst R differ by no more than `min_gap` gives no pair: dropped, and counted in the manifest
(`conversion.counts.no_gap`).

Shards: `music_pair` samples keyed by the prompt's index (`000000042`): `chosen.npy` / `rejected.npy` the int64 codes
(K, T) bit-exact as generated; in the json: prompt, codec, frame_rate, sample_rate (of the decoded audio), provenance
(origin self, generator = the model), `scores` {"chosen": {column: raw score}, "rejected": {...}}, `reward`
{"chosen": R, "rejected": R}, `seeds` {"chosen", "rejected"} and `candidates` {"n": N, "chosen": j, "rejected": j}.
The manifest's `conversion` records the model, the sampling settings, N, the seed, each scorer's version, the
weights and the counts.

Ranked lists (`ranked=True`, `--ranked`; for method rankdpo of `task: music`): `music_ranked` samples instead, one
per prompt with all N code arrays `0.npy` .. `<N-1>.npy` in sample order and `scores` the N rewards R (the json also
holds `columns` {column: N raw scores}, `seeds`, codec, frame_rate, sample_rate). A prompt whose R differ by no more
than `min_gap` is dropped and counted (`no_gap`), as for pairs.

Resumable as `selfgen ranked`: each finished prompt is kept under `OUT/.staging/` (its codes `000000042.npy` (N, K,
T), then a JSON record of its seeds and every column's N raw scores, written last), so an interrupted run resumes
where it stopped and gives the same shards as an uninterrupted one. A staged run is resumed only by a run with the
same model, sampling settings, N, seed, prompts (their sha256) and scorers (their versions); otherwise it is refused,
naming what changed (`overwrite=True` / `--overwrite` starts again). Weights, `normalize` and `min_gap` act only
when the shards are written, so they may change between an interrupted run and its resumption.

    mmalign selfgen music --model facebook/musicgen-small --prompts prompts.txt --n 8 --duration 10 \
        --rewards clap:1.0,my_pkg.quality:score:0.5 --out data/music_pairs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from mmalign.selfgen.common import open_stage, sample_seed

STAGING = ".staging"
_RUN_KEYS = {"model": "model", "sampling": "sampling settings", "n": "n", "seed": "seed", "prompts": "prompts",
             "scorers": "scorers"}


def _base(adapter):
    model = adapter.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _reward_set(rewards, device):
    """A `RewardSet` of audio scorers from a RewardSet, or from RewardSpecs / dicts / spec strings / (spec, weight)."""
    from mmalign.rewards.combine import RewardSet, RewardSpec

    if not isinstance(rewards, RewardSet):
        specs = []
        for r in rewards:
            if isinstance(r, str):
                r = RewardSpec(scorer=r)
            elif isinstance(r, dict):
                r = RewardSpec(**r)
            specs.append(r)
        rewards = RewardSet.load(specs, device=device)
    for term in rewards.terms:
        modality = getattr(term.model, "modality", "image")
        if term.latent or modality not in ("audio", "music_codes"):
            raise ValueError(f"reward {term.spec!r} scores {'noisy latents' if term.latent else modality + 's'}; "
                             "music samples are scored as audio or as codes: use an audio scorer (clap, "
                             "clap=FOLDER, or a package.module:function with fn.modality = 'audio') or a music "
                             "reward model (music=FOLDER)")
    return rewards


def _run_key(adapter, sampling: dict, n: int, seed: int, prompts: Sequence[str], versions: dict) -> dict:
    """Every input that changes a staged prompt's codes or scores (a resumed run must match it exactly)."""
    return json.loads(json.dumps({
        "model": {"pretrained": adapter.pretrained, "revision": adapter.revision,
                  "dtype": str(next(_base(adapter).parameters()).dtype)},
        "sampling": sampling, "n": n, "seed": seed, "scorers": versions,
        "prompts": {"count": len(prompts), "sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()},
    }, default=str))


def _key_changes(staged: Any, now: dict) -> list[str]:
    if not isinstance(staged, dict):
        return ["inputs (its run.json is missing or unreadable)"]
    return [f"{words} ({staged.get(key)} -> {now.get(key)})" for key, words in _RUN_KEYS.items()
            if staged.get(key) != now.get(key)]


def _write_npy(path: Path, array) -> None:
    """`np.save` via a temporary file and a rename: a staged file is whole or absent."""
    from mmalign.data.schemas import npy_bytes

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(npy_bytes(array))
    os.replace(tmp, path)


def build_music_pairs(adapter, prompts: Sequence[str], rewards, out_dir: str | os.PathLike, *, n: int = 4,
                      frames: int, temperature: float = 1.0, top_k: int | None = None,
                      guidance_scale: float | None = None, seed: int = 0, normalize: Literal["none", "z"] = "none",
                      min_gap: float = 0.0, max_count: int = 1000, overwrite: bool = False, progress: bool = True,
                      ranked: bool = False):
    """Sample, decode, score, stage, then write best-vs-worst `music_pair` shards (`ranked`: `music_ranked` lists
    of all n samples); returns the Manifest (see the module docstring).

    adapter: a `MusicAdapter` of a "musicgen" model (`load_music`; its EnCodec decodes the codes for the rewards).
    rewards: a `RewardSet` of audio scorers, or reward specs (`RewardSpec`, dicts {scorer, weight, dims}, spec
        strings) loaded on the model's device.
    n: samples per prompt (>= 2). frames: code frames per sample (50 per second for MusicGen).
    temperature, top_k, guidance_scale: `MusicAdapter.generate`'s (None: the checkpoint's generation config).
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from mmalign.config import atomic_write_text
    from mmalign.data.schemas import load_npy, music_pair_sample, music_ranked_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.rewards.base import ScorerError

    if n < 2:
        raise ValueError(f"n must be >= 2 samples per prompt (a pair needs a best and a worst), got {n}")
    if not prompts:
        raise ValueError("no prompts")
    if normalize not in ("none", "z"):
        raise ValueError(f"normalize {normalize!r}: use 'none' or 'z'")
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if adapter.kind != "musicgen":
        raise ValueError(f"{adapter.pretrained}: a {adapter.kind} model has no audio codec to decode its samples for "
                         "the rewards; use a MusicgenForConditionalGeneration folder (text encoder, EnCodec, decoder)")
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds a shard set; pass overwrite=True (--overwrite) to replace it")
    device = next(_base(adapter).parameters()).device
    rewards = _reward_set(rewards, device)
    codec = _base(adapter).config.audio_encoder
    sample_rate = int(codec.sampling_rate)
    sampling = {"frames": frames, "temperature": temperature, "top_k": top_k, "guidance_scale": guidance_scale}
    versions = {term.name: term.model.version for term in rewards.terms}
    stage = out / STAGING
    open_stage(stage, _run_key(adapter, sampling, n, seed, prompts, versions), overwrite, _key_changes, "samples",
               "mmalign.selfgen.music")

    todo = [i for i in range(len(prompts)) if not (stage / f"{i:09d}.json").is_file()]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="selfgen music", disable=not progress,
               unit="prompt")
    for i in todo:
        seeds = [sample_seed(seed, i, j) for j in range(n)]
        codes = torch.cat([adapter.generate([prompts[i]], frames=frames, temperature=temperature, top_k=top_k,
                                            guidance_scale=guidance_scale, seed=s).cpu() for s in seeds])
        with torch.inference_mode():
            audio = adapter.decode_audio(codes).float().cpu()
            columns: dict[str, list[float]] = {}
            for term in rewards.terms:
                try:
                    raw = term.raw([prompts[i]] * n, audio=audio, sample_rate=sample_rate, codes=codes).cpu()
                except ScorerError as err:
                    raise ScorerError(f"prompt {i} ({prompts[i]!r}): reward {term.spec!r}: {err}") from None
                columns.update({c: raw[:, d].double().tolist() for d, c in enumerate(term.columns)})
        for column, values in columns.items():
            bad = [j for j, v in enumerate(values) if not np.isfinite(v)]
            if bad:
                raise ValueError(f"prompt {i} ({prompts[i]!r}): reward column {column!r} gave non-finite scores for "
                                 f"samples {bad}")
        _write_npy(stage / f"{i:09d}.npy", codes.numpy().astype(np.int64))
        atomic_write_text(stage / f"{i:09d}.json", json.dumps({"prompt": prompts[i], "seeds": seeds,
                                                               "scores": columns}))
        bar.update(1)
    bar.close()

    records = [json.loads((stage / f"{i:09d}.json").read_text()) for i in range(len(prompts))]
    for i, rec in enumerate(records):  # the run key covers this; a staged record of another prompt is never used
        if rec.get("prompt") != prompts[i]:
            raise ValueError(f"{stage / f'{i:09d}.json'} was staged for another prompt ({rec.get('prompt')!r}, now "
                             f"{prompts[i]!r}); pass --overwrite to start again")
    names = list(rewards.column_weights())
    reward = rewards.combine({c: torch.tensor([v for rec in records for v in rec["scores"][c]], dtype=torch.float64)
                              for c in names}, normalize=normalize, group=n).view(len(prompts), n).numpy()
    generator = adapter.pretrained if adapter.revision is None else f"{adapter.pretrained}@{adapter.revision}"
    no_gap = 0
    with ShardSetWriter(out, "music_ranked" if ranked else "music_pair", max_count=max_count,
                        overwrite=overwrite) as writer:
        for i, rec in enumerate(records):
            best, worst = int(np.argmax(reward[i])), int(np.argmin(reward[i]))
            if reward[i, best] - reward[i, worst] <= min_gap:
                no_gap += 1
                continue
            codes = load_npy((stage / f"{i:09d}.npy").read_bytes())
            if ranked:
                writer.write(music_ranked_sample(
                    f"{i:09d}", list(codes), prompt=rec["prompt"], scores=reward[i].tolist(), scorers=names,
                    codec=codec.model_type, frame_rate=float(codec.frame_rate), sample_rate=sample_rate,
                    provenance={"origin": "self", "generator": generator}, columns=rec["scores"],
                    seeds=rec["seeds"]))
                continue
            writer.write(music_pair_sample(
                f"{i:09d}", codes[best], codes[worst], prompt=rec["prompt"], codec=codec.model_type,
                frame_rate=float(codec.frame_rate), sample_rate=sample_rate,
                provenance={"origin": "self", "generator": generator},
                scores={side: {c: rec["scores"][c][j] for c in names} for side, j in (("chosen", best),
                                                                                      ("rejected", worst))},
                reward={"chosen": float(reward[i, best]), "rejected": float(reward[i, worst])},
                seeds={"chosen": rec["seeds"][best], "rejected": rec["seeds"][worst]},
                candidates={"n": n, "chosen": best, "rejected": worst}))
        writer.set_conversion({
            "from": "selfgen music", "model": generator, "sampling": sampling, "n": n, "seed": seed,
            "num_prompts": len(prompts), "sample_rate": sample_rate,
            "rewards": {t.name: {"spec": t.spec, "version": t.model.version, "weight": t.weight,
                                 "dim_weights": list(t.dim_weights)} for t in rewards.terms},
            "normalize": normalize, "min_gap": min_gap,
            "reward": "sum over reward columns of weight * score" + (" (z over the prompt's n samples)"
                                                                     if normalize == "z" else ""),
            "counts": {"lists" if ranked else "pairs": len(prompts) - no_gap, "no_gap": no_gap}})
        manifest = writer.close()
    shutil.rmtree(stage)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a MusicgenForConditionalGeneration folder or hub id "
                                                       "(e.g. facebook/musicgen-small)")
    parser.add_argument("--revision", default=None, help="hub revision of --model")
    parser.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .jsonl ('prompt')")
    parser.add_argument("--rewards", required=True,
                        help="comma-separated audio rewards SPEC[:WEIGHT]: clap, clap=FOLDER, an exported scorer "
                             "folder, package.module:function (fn.modality = 'audio'); weight 1 when omitted")
    parser.add_argument("--out", required=True, help="output shard-set folder")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (4)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of music per sample (10): round(duration x the codec's frame rate) frames")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: the checkpoint's; 0 = off)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the checkpoint's; 1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample's generation (0)")
    parser.add_argument("--normalize", choices=("none", "z"), default="none",
                        help="z: z-normalise each reward over a prompt's samples before weighting (none)")
    parser.add_argument("--ranked", action="store_true",
                        help="write music_ranked lists of all n samples with their rewards (for method rankdpo) "
                             "instead of best-vs-worst music_pair shards")
    parser.add_argument("--min-gap", type=float, default=0.0,
                        help="drop a prompt whose best and worst rewards differ by no more than this (0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model dtype (float32)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete shard set or a staged run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from mmalign.data.prompts import read_prompts
    from mmalign.rewards.combine import parse_reward_list
    from mmalign.models.loading import ModelLoadError
    from mmalign.music.adapter import load_music
    from mmalign.rewards.base import ScorerError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        prompts = read_prompts(args.prompts, args.limit)
        rewards = parse_reward_list(args.rewards)
        if args.duration <= 0:
            raise ValueError(f"--duration must be > 0 seconds, got {args.duration}")
        adapter = load_music(args.model, revision=args.revision, dtype=args.dtype, device=device)
        if adapter.kind != "musicgen":
            raise ValueError(f"{args.model}: a {adapter.kind} model has no audio codec; selfgen music needs a "
                             "MusicgenForConditionalGeneration (text encoder, EnCodec, decoder)")
        frame_rate = float(_base(adapter).config.audio_encoder.frame_rate)
        frames = max(1, round(args.duration * frame_rate))
        manifest = build_music_pairs(adapter, prompts, rewards, args.out, n=args.n, frames=frames,
                                     temperature=args.temperature, top_k=args.top_k, guidance_scale=args.guidance,
                                     seed=args.seed, normalize=args.normalize, min_gap=args.min_gap,
                                     max_count=args.max_count, overwrite=args.overwrite,
                                     progress=not args.no_progress, ranked=args.ranked)
    except (ScorerError, ModelLoadError, ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"mmalign selfgen music: {err}", file=sys.stderr)
        return 2
    counts = manifest.conversion["counts"]
    what = f"ranked lists of {args.n}" if args.ranked else f"pairs (best vs worst of {args.n})"
    print(f"mmalign selfgen music: {manifest.num_samples} {what} from {len(prompts)} "
          f"prompts ({counts['no_gap']} without a reward gap) in {len(manifest.shards)} shards -> {args.out}")
    return 0
