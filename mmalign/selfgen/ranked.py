"""Ranked synthetic preference sets (the Syn-Pic recipe of RankDPO, Karthik et al. 2025):
K images per prompt from one or more generators, scored by several reward models, written as `ranked` shards.

Per prompt i, image j comes from generator `j % G` with seed `SeedSequence([seed, i, j])`. Every image is scored by
every scorer; each scorer's scores are z-normalised over the whole set, `z = (r - mean_s) / std_s` (population
std; a scorer with std 0 contributes 0), and an image's score is the mean of its z over the scorers. The ranked
sample stores those averaged scores (`scores`), the scorer names, the raw scores per scorer (`raw_scores`) and the
generator of each image (`provenance.generators`); the manifest's `conversion` records each scorer's version,
mean and std.

Generation is staged: each finished prompt is kept under `OUT/.staging/` (PNG files + a JSON record written last),
so an interrupted run resumes where it stopped; the shards are written (sorted keys `000000042`) once every prompt
is done, then the staging folder is removed. A staged run is resumed only by a run with the same inputs: scorers
(and their versions), generators and their settings (steps, guidance, resolution, dtype), k, seed and the prompts
themselves (their sha256, so another file or another `--limit` counts as a change). Otherwise the run is refused,
naming what changed; `--overwrite` discards the staged run and starts again.

    mmalign selfgen ranked --generators runwayml/sd15,/models/sdxl --prompts prompts.txt --k 4 \
        --scorers hps,pickscore --out data/synpic
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from mmalign.selfgen.common import open_stage, sample_seed

STAGING = ".staging"


class ImageGenerator(Protocol):
    """Anything that turns prompts + seeds into PIL images (one per prompt) and has a `name`. A generator may also
    have `settings` (a JSON-serialisable dict of whatever else changes its images: steps, guidance, resolution...);
    a staged run is resumed only with the same names and settings."""

    name: str

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Any]: ...


@dataclass
class DiffusersGenerator:
    """A diffusers text-to-image pipeline (`DiffusionPipeline.from_pretrained(source)`: a folder or hub id) as a
    generator; one `torch.Generator` per image makes each image depend only on its seed."""

    source: str
    steps: int = 30
    guidance_scale: float = 7.5
    resolution: int | None = None
    device: str | None = None
    dtype: str = "fp32"
    name: str | None = None

    def __post_init__(self) -> None:
        import torch
        from diffusers import DiffusionPipeline

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]
        self.pipe = DiffusionPipeline.from_pretrained(self.source, dtype=dtype)
        self.pipe.to(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipe.set_progress_bar_config(disable=True)
        self.name = self.name or self.source

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the images besides prompt and seed (the resume key of a staged run); not the device."""
        return {"source": self.source, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "resolution": self.resolution, "dtype": self.dtype}

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        import torch

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        size = {} if self.resolution is None else {"height": self.resolution, "width": self.resolution}
        out = self.pipe(prompt=prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                        generator=generators, output_type="pil", **size)
        return list(out.images)


image_seed = sample_seed  # the seed of image j of prompt i


def z_normalize(raw: dict[str, list[list[float]]]) -> tuple[list[list[float]], dict[str, dict[str, float]]]:
    """{scorer: N lists of K raw scores} -> (N lists of K averaged z-scores, {scorer: {"mean", "std"}})."""
    import numpy as np

    names = list(raw)
    if not names:
        raise ValueError("need at least one scorer")
    stats, zs = {}, []
    for name in names:
        r = np.asarray(raw[name], dtype=np.float64)
        mean, std = float(r.mean()), float(r.std())
        stats[name] = {"mean": mean, "std": std}
        zs.append((r - mean) / std if std > 0 else np.zeros_like(r))
    return np.mean(zs, axis=0).tolist(), stats


def _stage_dir(out_dir: Path) -> Path:
    return out_dir / STAGING


_RUN_KEYS = {"versions": "scorers", "generators": "generators", "generator_settings": "generator settings",
             "k": "k", "seed": "seed", "prompts": "prompts"}


def _run_key(versions: dict, generators: Sequence[Any], k: int, seed: int, prompts: Sequence[str]) -> dict:
    """Every input that changes a staged prompt's images or scores (a resumed run must match it exactly)."""
    import hashlib

    settings = [getattr(g, "settings", None) for g in generators]
    return json.loads(json.dumps({
        "versions": versions, "generators": [g.name for g in generators], "generator_settings": settings,
        "k": k, "seed": seed,
        "prompts": {"count": len(prompts),
                    "sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()}}, default=str))


def _key_changes(staged: Any, now: dict) -> list[str]:
    """What differs between a staged run's key and this run's, in words."""
    if not isinstance(staged, dict):
        return ["inputs (its run.json is missing or unreadable)"]
    out = []
    for key, words in _RUN_KEYS.items():
        old, new = staged.get(key), now.get(key)
        if old == new:
            continue
        detail = f"{old} -> {new}"
        if key == "generator_settings" and isinstance(old, list) and len(old) == len(new):
            diffs = []
            for o, n in zip(old, new):
                o, n = o if isinstance(o, dict) else {}, n if isinstance(n, dict) else {}
                diffs += [f"{name} {o.get(name)} -> {n.get(name)}" for name in sorted(set(o) | set(n))
                          if o.get(name) != n.get(name)]
            detail = "; ".join(dict.fromkeys(diffs)) or detail
        elif key == "prompts" and isinstance(old, dict):
            detail = (f"{old.get('count')} prompts, sha256 {str(old.get('sha256'))[:12]} -> {new['count']} prompts, "
                      f"sha256 {new['sha256'][:12]}")
        out.append(f"{words} ({detail})")
    return out


def build_ranked_set(prompts: Sequence[str], generators: Sequence[ImageGenerator], scorers: Sequence[Any],
                     out_dir: str | os.PathLike, *, k: int = 4, seed: int = 0, batch_size: int = 8,
                     max_count: int = 1000, overwrite: bool = False, progress: bool = True):
    """Generate, score, normalise and write; returns the shard set's Manifest (see the module docstring).
    `scorers` are Scorer objects or specs for `load_scorer`."""
    import torch
    from tqdm.auto import tqdm

    from mmalign.config import atomic_write_text
    from mmalign.data.schemas import ranked_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.rewards.registry import load_scorer

    if k < 2:
        raise ValueError(f"k must be >= 2 images per prompt (a ranked sample needs K >= 2), got {k}")
    if not generators:
        raise ValueError("need at least one generator")
    if not prompts:
        raise ValueError("no prompts")
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds a shard set; pass overwrite=True (--overwrite) to replace it")
    scorers = [load_scorer(s) if isinstance(s, str) else s for s in scorers]
    names = [s.name for s in scorers]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"need one or more scorers with distinct names, got {names}")
    if any(s.dims for s in scorers):
        raise ValueError(f"ranking needs scalar rewards; {[s.name for s in scorers if s.dims]} give several "
                         "dimensions")
    stage = _stage_dir(out)
    stage.mkdir(parents=True, exist_ok=True)
    versions = {s.name: s.version for s in scorers}
    gen_names = [g.name for g in generators]
    run_info = _run_key(versions, generators, k, seed, prompts)
    open_stage(stage, run_info, overwrite, _key_changes, "images", "mmalign.selfgen.ranked")
    todo = [i for i in range(len(prompts)) if not (stage / f"{i:09d}.json").is_file()]
    per_chunk = max(1, batch_size // k)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="selfgen ranked", disable=not progress,
               unit="prompt")
    for start in range(0, len(todo), per_chunk):
        chunk = todo[start:start + per_chunk]
        jobs = [(i, j) for i in chunk for j in range(k)]
        images: dict[tuple[int, int], Any] = {}
        for g, gen in enumerate(generators):
            mine = [(i, j) for i, j in jobs if j % len(generators) == g]
            for b in range(0, len(mine), batch_size):
                part = mine[b:b + batch_size]
                made = gen([prompts[i] for i, _ in part], [image_seed(seed, i, j) for i, j in part])
                if len(made) != len(part):
                    raise RuntimeError(f"generator {gen.name!r} returned {len(made)} images for {len(part)} prompts")
                images.update(zip(part, made))
        flat = [images[job] for job in jobs]
        flat_prompts = [prompts[i] for i, _ in jobs]
        raw = {}
        with torch.inference_mode():
            for s in scorers:
                raw[s.name] = torch.cat([s.score(flat[b:b + batch_size], flat_prompts[b:b + batch_size]).cpu()
                                         for b in range(0, len(flat), batch_size)]).tolist()
        for n, i in enumerate(chunk):
            for j in range(k):
                images[(i, j)].save(stage / f"{i:09d}.{j}.png", format="PNG")
            record = {"prompt": prompts[i], "raw": {name: raw[name][n * k:(n + 1) * k] for name in names},
                      "generators": [gen_names[j % len(generators)] for j in range(k)],
                      "seeds": [image_seed(seed, i, j) for j in range(k)]}
            atomic_write_text(stage / f"{i:09d}.json", json.dumps(record))
        bar.update(len(chunk))
    bar.close()

    records = [json.loads((stage / f"{i:09d}.json").read_text()) for i in range(len(prompts))]
    for i, rec in enumerate(records):  # the run key covers this; a staged record of another prompt is never used
        if rec.get("prompt") != prompts[i]:
            raise ValueError(f"{stage / f'{i:09d}.json'} was staged for another prompt ({rec.get('prompt')!r}, now "
                             f"{prompts[i]!r}); pass --overwrite to start again")
    scores, stats = z_normalize({name: [r["raw"][name] for r in records] for name in names})
    with ShardSetWriter(out, "ranked", max_count=max_count, overwrite=overwrite) as writer:
        for i, (rec, sc) in enumerate(zip(records, scores)):
            pngs = [(stage / f"{i:09d}.{j}.png").read_bytes() for j in range(k)]
            writer.write(ranked_sample(f"{i:09d}", pngs, caption=rec["prompt"], scores=sc, scorers=names,
                                       provenance={"origin": "self", "generators": rec["generators"]},
                                       raw_scores=rec["raw"], seeds=rec["seeds"]))
        writer.set_conversion({"from": "selfgen ranked", "k": k, "seed": seed, "generators": gen_names,
                               "num_prompts": len(prompts),
                               "scorers": {n: {"version": versions[n], **stats[n]} for n in names},
                               "score": "mean over scorers of (raw - mean) / std"})
        manifest = writer.close()
    shutil.rmtree(stage)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generators", required=True,
                        help="comma-separated diffusers pipelines (folders or hub ids); image j of a prompt comes "
                             "from generator j mod G")
    parser.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .jsonl ('prompt')")
    parser.add_argument("--scorers", required=True, help="comma-separated scorer specs (see mmalign score --help)")
    parser.add_argument("--out", required=True, help="output shard-set folder")
    parser.add_argument("--k", type=int, default=4, help="images per prompt (4)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (30)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image's generator (0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generator / scorer call (8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="generator dtype (fp32)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete shard set in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mmalign.rewards.base import ScorerError
    from mmalign.rewards.cli import scorer_specs
    from mmalign.rewards.registry import load_scorer

    try:
        from mmalign.data.prompts import read_prompts

        prompts = read_prompts(args.prompts, args.limit)
        scorers = [load_scorer(s, device=args.device) for s in scorer_specs(args.scorers)]
        generators: list[Callable] = [
            DiffusersGenerator(src, steps=args.steps, guidance_scale=args.guidance, resolution=args.resolution,
                               device=args.device, dtype=args.dtype) for src in scorer_specs(args.generators)]
        manifest = build_ranked_set(prompts, generators, scorers, args.out, k=args.k, seed=args.seed,
                                    batch_size=args.batch_size, max_count=args.max_count, overwrite=args.overwrite,
                                    progress=not args.no_progress)
    except (ScorerError, ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"mmalign selfgen ranked: {err}", file=sys.stderr)
        return 2
    print(f"mmalign selfgen ranked: {manifest.num_samples} ranked samples of {args.k} images in "
          f"{len(manifest.shards)} shards -> {args.out}")
    return 0
