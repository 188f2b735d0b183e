"""`mmalign guide CONFIG [key=value ...] --prompts FILE --out DIR`: reward-guided sampling (and best-of-N).

DIR gets `config.yaml` (the resolved config), `images/NNNNN.png` (sample NNNNN = line NNNNN of the prompts,
counting prompts), `samples.jsonl` (one row per image: `file` relative to DIR, `prompt`, `seed`, `scores` with
every reward column; with best_of > 1 also the chosen `candidate`, its seed, and every candidate's seed, scores and
weighted score), `grid.png` (the first images with prompt and scores under each) and `summary.json` (mean scores,
cost per image, wall time).

A run that stops part-way resumes when called again with the same DIR and config: rows already in samples.jsonl
are kept and their prompts skipped (a different config in DIR is refused; `--overwrite` starts again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GRID_IMAGES = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML guide config (see configs/guide/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. guidance.scale=2 rewards=toy_color_soft:1,toy_brightness:0.3")
    parser.add_argument("--prompts", required=True, help="prompts: one per line, or JSONL with 'prompt' (and "
                                                         "optionally 'seed') per row")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--overwrite", action="store_true", help="start again in an --out folder holding another "
                                                                 "run (its samples are replaced)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _existing_rows(out: Path, config_text: str, overwrite: bool, rows: list[tuple[str, int]]) -> dict[int, dict]:
    """Rows of a previous run of the same config and prompts in `out`, by sample index (resume), or {} for a fresh
    folder. A row whose image is gone is redone; a row whose prompt or seed differs from the prompts file now is an
    error (another prompts file in the same folder)."""
    from mmalign.config import ConfigError

    saved, rows_path = out / "config.yaml", out / "samples.jsonl"
    kept: dict[int, dict] = {}
    if rows_path.is_file() and not overwrite:
        for line in rows_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a row cut by an interrupted write: it and what follows are redone
            if isinstance(row, dict) and isinstance(row.get("index"), int) and (out / row.get("file", "")).is_file():
                kept[row["index"]] = row
    if overwrite or not kept:
        return {}  # nothing to keep: the config (and prompts) may change
    if not saved.is_file() or saved.read_text() != config_text:
        raise ConfigError(f"--out {out}: holds samples of a run with another config ({saved}); use the same config "
                          "and overrides to resume it, another --out, or --overwrite")
    for index, row in sorted(kept.items()):
        if index >= len(rows) or (row.get("prompt"), row.get("seed")) != rows[index]:
            now = rows[index] if index < len(rows) else "no such line"
            raise ConfigError(f"--out {out}: samples.jsonl sample {index} is {row.get('prompt')!r} seed "
                              f"{row.get('seed')}, but the prompts file now gives {now}: another prompts file or "
                              "seed? use another --out or --overwrite")
    return kept


def run(args: argparse.Namespace) -> int:
    from mmalign.config import ConfigError, atomic_write_text, config_to_yaml, load_config
    from mmalign.data.prompts import read_prompt_rows
    from mmalign.guidance.config import GuideConfig

    try:
        cfg = load_config(GuideConfig, args.config, args.overrides)
    except ConfigError as err:
        sep = "\n" if "\n" in str(err) else " "
        print(f"mmalign guide: invalid config:{sep}{err}", file=sys.stderr)
        return 2
    config_text = config_to_yaml(cfg)
    if args.print_config:
        print(config_text, end="")
        return 0
    from mmalign.guidance.pipelines import preflight
    from mmalign.models.loading import ModelLoadError

    try:
        prompt_rows = read_prompt_rows(args.prompts, args.limit)
        rows = [(p, seed if seed is not None else cfg.run.seed + i) for i, (p, seed) in enumerate(prompt_rows)]
        out = Path(args.out)
        done = _existing_rows(out, config_text, args.overwrite, rows)
        preflight(cfg)
    except (OSError, ValueError, ModelLoadError) as err:
        print(f"mmalign guide: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_text)
    try:
        guide(cfg, rows, out, done)
    except (ModelLoadError, ValueError) as err:  # ScorerError is a ValueError
        print(f"mmalign guide: {err}", file=sys.stderr)
        return 2
    print(f"mmalign guide: wrote {len(rows)} images to {out} (samples.jsonl, grid.png, summary.json)")
    return 0


def guide(cfg, rows: list[tuple[str, int]], out: Path, done: dict[int, dict]) -> None:
    """Sample every (prompt, seed) row not already in `done`, appending images and samples.jsonl rows as each chunk
    finishes; at the end samples.jsonl is rewritten in sample order."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from mmalign.config import atomic_write_text
    from mmalign.guidance.config import DTYPES, resolve_device
    from mmalign.guidance.pipelines import load_pipeline
    from mmalign.rewards.combine import RewardSet
    from mmalign.guidance.sample import best_of_n, guided_sample

    device = resolve_device(cfg.pipeline.device)
    p = cfg.pipeline
    pipe = load_pipeline(p.pretrained, revision=p.revision, variant=p.variant, dtype=DTYPES[p.dtype], device=device,
                         lora=p.lora)
    rewards = RewardSet.load(cfg.rewards, device=device)
    (out / "images").mkdir(exist_ok=True)
    rows_path = out / "samples.jsonl"
    # Rewrite the kept rows (drops a cut last line and rows whose image is gone) before appending.
    atomic_write_text(rows_path, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    todo = [i for i in range(len(rows)) if i not in done]
    chunk = max(1, cfg.sampler.batch_size // cfg.best_of) if cfg.best_of > 1 else cfg.sampler.batch_size
    started, cost = time.time(), {}
    with open(rows_path, "a", encoding="utf-8") as fh:
        for start in tqdm(range(0, len(todo), chunk), desc="mmalign guide", unit="chunk"):
            index = todo[start:start + chunk]
            prompts = [rows[i][0] for i in index]
            seeds = [rows[i][1] for i in index]
            if cfg.best_of > 1:
                result = best_of_n(pipe, prompts, seeds, rewards, cfg.best_of, normalize=cfg.best_of_normalize,
                                   guidance=cfg.guidance, sampler=cfg.sampler, progress=False)
                samples = result.samples
            else:
                result, samples = None, guided_sample(pipe, prompts, seeds, rewards, guidance=cfg.guidance,
                                                      sampler=cfg.sampler, progress=False)
            cost = samples.cost
            images = (samples.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            for j, i in enumerate(index):
                file = f"images/{i:05d}.png"
                Image.fromarray(images[j]).save(out / file)
                row = {"index": i, "file": file, "prompt": prompts[j], "seed": seeds[j],
                       "scores": {k: float(v[j]) for k, v in samples.scores.items()}}
                if result is not None:
                    n = cfg.best_of
                    row["candidate"] = int(result.chosen[j])
                    row["candidate_seed"] = samples.seeds[j]
                    row["candidates"] = [
                        {"seed": result.candidates.seeds[j * n + c], "combined": float(result.combined[j, c]),
                         "scores": {k: float(v[j * n + c]) for k, v in result.candidates.scores.items()}}
                        for c in range(n)]
                fh.write(json.dumps(row) + "\n")
            fh.flush()
    ordered = sorted((json.loads(line) for line in rows_path.read_text().splitlines()), key=lambda r: r["index"])
    atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in ordered))
    _write_report(out, rows_path, cost, time.time() - started, len(todo), cfg)


def _write_report(out: Path, rows_path: Path, cost: dict, seconds: float, sampled: int, cfg) -> None:
    import numpy as np
    from PIL import Image

    from mmalign.config import atomic_write_text
    from mmalign.grids import captioned_grid

    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    columns = sorted({k for r in rows for k in r["scores"]})
    summary = {
        "images": len(rows),
        "mean_scores": {c: float(np.mean([r["scores"][c] for r in rows if c in r["scores"]])) for c in columns},
        # passes per kept image: every candidate of best-of-N costs the same
        "cost_per_image": {k: v * cfg.best_of for k, v in cost.items()}, "best_of": cfg.best_of,
        "seconds_this_call": round(seconds, 2), "images_this_call": sampled,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    shown = rows[:GRID_IMAGES]
    if shown:
        images = np.stack([np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in shown])
        captions = [r["prompt"] + "\n" + " ".join(f"{k.split('/')[-1]}={v:.3g}" for k, v in r["scores"].items())
                    for r in shown]
        scale = max(1, 128 // images.shape[1])
        title = f"guidance.scale {cfg.guidance.scale}, best_of {cfg.best_of}: {cfg.pipeline.pretrained}"
        captioned_grid(images, captions, cols=min(8, len(shown)), scale=scale, title=title).save(out / "grid.png")
