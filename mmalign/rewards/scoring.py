"""Batch scoring of shard sets: `mmalign score --scorers hps,pickscore --in SHARDS --out DIR`.

Output, one folder per scorer and one file per input shard:

    DIR/<scorer name>/scorer.json               {"name", "version", "dims", "spec"}
    DIR/<scorer name>/<shard stem>.jsonl        line 1: header {"format": "mmalign-scores", "scorer", "version",
                                                "dims", "shard", "schema", "count", "skipped", "skip_reasons"}
                                                then one line per sample: {"key", "scores": [one entry per item]}
                                                (clip_score rows also hold "cos": [one cosine per item])

An item is an image of a `pair` / `ranked` sample (stored order) or video a / b of a `video_pair`; an entry is a
float, or a list of D floats for a multi-dimension scorer (`dims`).

Resumable: a shard file is written atomically once its shard is fully scored, so a finished (shard, scorer) is
skipped on the next run; a folder holding scores of another scorer version is an error (never mixed).
Distributed: every process scores the shards `shards[rank::world_size]` (RANK / WORLD_SIZE from torchrun or
`accelerate launch`; no communication), each on its own device (`cuda:LOCAL_RANK` when there are GPUs).
Ray: `score_shards_ray` runs the same on Ray Data (decode on CPU tasks, score in an actor pool, write here).
A sample that cannot be read or scored is skipped and counted in the header (`strict=True` raises instead).
`score_summary` gives the set-level means (`<scorer>/mean`; for clip_score also `clip_score/torchmetrics`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mmalign.rewards.base import Scorer

logger = logging.getLogger("mmalign.rewards")

SCORE_FORMAT = "mmalign-scores"
SCORE_FORMAT_VERSION = 1
SCORABLE = ("pair", "ranked", "video_pair")
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError)


class ScoreError(RuntimeError):
    """Scoring cannot go on (bad arguments, mixed versions, a bad sample under strict=True)."""


@dataclass
class ScoreReport:
    shards_scored: int = 0
    shards_already_done: int = 0
    samples: int = 0
    skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    scorers: list[str] = field(default_factory=list)  # names, i.e. the sub-folders of the output


def shard_stem(name: str) -> str:
    return name[:-4] if name.endswith(".tar") else name


def scorer_dir(out_dir: str | os.PathLike, scorer_name: str) -> Path:
    """`out_dir / scorer_name`, refusing a name that is not one plain folder name (it would write elsewhere)."""
    from mmalign.rewards.base import ScorerError, check_scorer_name

    try:
        check_scorer_name(scorer_name)
    except ScorerError as err:
        raise ScoreError(str(err)) from None
    return Path(out_dir) / scorer_name


def score_path(out_dir: str | os.PathLike, scorer_name: str, shard_name: str) -> Path:
    return scorer_dir(out_dir, scorer_name) / f"{shard_stem(shard_name)}.jsonl"


def _prepare_scorer_dir(out_dir: Path, scorer: Scorer, spec: str | None) -> None:
    from mmalign.config import atomic_write_text

    folder = scorer_dir(out_dir, scorer.name)
    folder.mkdir(parents=True, exist_ok=True)
    info_path = folder / "scorer.json"
    info = {**scorer.info(), "spec": spec}
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("version") != scorer.version or old.get("dims") != info["dims"]:
            raise ScoreError(f"{folder} holds scores of {old.get('name')} version {old.get('version')}; this run's "
                             f"scorer is version {scorer.version}: use another --out, or remove that folder")
        return
    atomic_write_text(info_path, json.dumps(info, indent=1) + "\n")


def _items(schema: str, sample: dict[str, Any]) -> tuple[list[Any], str]:
    if schema in ("pair", "ranked"):
        return sample["images"], sample["caption"]
    return [sample["video_a"], sample["video_b"]], sample["prompt"]


def _score_items(scorer: Scorer, items: list[Any], prompts: list[str], batch_size: int) -> list[Any]:
    """One entry per item: its score, or `{"score": s, RAW: r}` for a scorer with a `raw_name` (clip_score's
    cosines; `write_score_file` stores them as a row field beside "scores")."""
    out: list[Any] = []
    raw = getattr(scorer, "raw_name", None)
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            if raw:
                scores, values = scorer.score_with_raw(items[i:i + batch_size], prompts[i:i + batch_size])
                out.extend({"score": s, raw: r} for s, r in zip(scores.detach().cpu().tolist(),
                                                                values.detach().cpu().tolist()))
                continue
            scores = scorer.score(items[i:i + batch_size], prompts[i:i + batch_size])
            out.extend(scores.detach().cpu().tolist())
    return out


def _score_row(key: str, entries: list) -> dict[str, Any]:
    if entries and isinstance(entries[0], dict):  # scores with raw per-item values (see _score_items)
        row = {"key": key, "scores": [e["score"] for e in entries]}
        row.update({name: [e[name] for e in entries] for name in entries[0] if name != "score"})
        return row
    return {"key": key, "scores": entries}


def open_reader(url: str, schema: str, strict: bool):
    """The mmalign reader of one shard, every sample (ties kept), undecoded images as PIL, videos as bytes."""
    from mmalign.data.dataset import READERS

    extra = {"ties": "keep"} if schema == "pair" else {}
    return READERS[schema]([url], strict=strict, rank=0, world_size=1, **extra)


def _iter_samples(url: str, name: str, schema: str, strict: bool, num_workers: int
                  ) -> tuple[Iterator[dict[str, Any]], Any]:
    from torch.utils.data import DataLoader

    dataset = open_reader(url, schema, strict)
    if num_workers == 0:
        return iter(dataset), dataset
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
    return iter(loader), dataset


def score_one_shard(url: str, name: str, schema: str, scorers: list[Scorer], *, batch_size: int = 32,
                    strict: bool = False, num_workers: int = 0) -> tuple[dict[str, list[tuple[str, list]]], int,
                                                                         Counter, int]:
    """Score every sample of one shard with each scorer. Returns ({scorer name: [(key, scores)]}, samples scored,
    skip reasons, skipped count). Images are gathered into batches of about `batch_size` items."""
    samples, dataset = _iter_samples(url, name, schema, strict, num_workers)
    results: dict[str, list[tuple[str, list]]] = {s.name: [] for s in scorers}
    reasons: Counter = Counter()
    pending: list[tuple[str, list[Any], str]] = []
    n_scored = 0

    def flush() -> int:
        if not pending:
            return 0
        items = [it for _, its, _ in pending for it in its]
        prompts = [p for _, its, p in pending for _ in its]
        try:
            per_scorer = {s.name: _score_items(s, items, prompts, batch_size) for s in scorers}
            good = [(i, key) for i, (key, _, _) in enumerate(pending)]
        except _PROGRAMMING_ERRORS:
            raise
        except Exception:  # one bad item fails the batch: score sample by sample to find it
            per_scorer = {s.name: [] for s in scorers}
            good = []
            for i, (key, its, prompt) in enumerate(pending):
                try:
                    scored = {s.name: _score_items(s, its, [prompt] * len(its), batch_size) for s in scorers}
                except _PROGRAMMING_ERRORS:
                    raise
                except Exception as err:
                    if strict:
                        raise ScoreError(f"{name}: sample {key!r}: cannot be scored: {err}") from err
                    logger.warning("skipping sample %r in %s (score): %s", key, name, err)
                    reasons["score"] += 1
                    continue
                for s in scorers:
                    per_scorer[s.name].extend(scored[s.name])
                good.append((i, key))
        for s in scorers:
            flat = iter(per_scorer[s.name])
            for i, key in good:
                results[s.name].append((key, [next(flat) for _ in pending[i][1]]))
        count = len(good)
        pending.clear()
        return count

    n_items = 0
    for sample in samples:
        items, prompt = _items(schema, sample)
        pending.append((sample["__key__"], items, prompt))
        n_items += len(items)
        if n_items >= batch_size:
            n_scored += flush()
            n_items = 0
    n_scored += flush()
    stats = dataset.stats
    reasons.update(stats.reasons)
    for s in scorers:
        results[s.name].sort(key=lambda kv: kv[0])
    return results, n_scored, reasons, stats.skipped + reasons["score"]


def write_score_file(path: Path, scorer_info: dict, shard: str, schema: str, rows: list[tuple[str, list]],
                     skipped: int, reasons: Counter, writer: str = "") -> None:
    from mmalign.config import atomic_write_text

    header = {"format": SCORE_FORMAT, "format_version": SCORE_FORMAT_VERSION, "scorer": scorer_info["name"],
              "version": scorer_info["version"], "dims": scorer_info["dims"], "shard": shard, "schema": schema,
              "count": len(rows), "skipped": skipped, "skip_reasons": dict(reasons),
              "written_by": writer}
    lines = [json.dumps(header)] + [json.dumps(_score_row(k, v)) for k, v in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _resolve_scorers(scorers: Sequence[Scorer | str], device, dtype) -> tuple[list[Scorer], list[str | None]]:
    from mmalign.rewards.registry import load_scorer

    built, specs = [], []
    for s in scorers:
        if isinstance(s, str):
            built.append(load_scorer(s, device=device, dtype=dtype))
            specs.append(s)
        else:
            built.append(s if device is None and dtype is None else s.to(device=device, dtype=dtype))
            specs.append(None)
    names = [s.name for s in built]
    for n in names:
        scorer_dir(".", n)  # a name that is not one plain folder name is refused before anything is written
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ScoreError(f"two scorers share the name(s) {dup}: their scores would share one folder; export "
                         "fine-tuned models with distinct names")
    return built, specs


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def score_shards(source: str | os.PathLike | list, out_dir: str | os.PathLike, scorers: Sequence[Scorer | str], *,
                 schema: str | None = None, batch_size: int = 32, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, rank: int | None = None, world_size: int | None = None,
                 strict: bool = False, num_workers: int = 0, progress: bool = True) -> ScoreReport:
    """Score this process's share of a shard set with every scorer; see the module docstring."""
    from tqdm.auto import tqdm

    from mmalign.data.dataset import resolve_rank_world
    from mmalign.data.manifest import open_source

    if batch_size < 1:
        raise ScoreError(f"batch_size must be >= 1, got {batch_size}")
    src = open_source(source, schema=schema)
    if src.schema not in SCORABLE:
        raise ScoreError(f"{src.description}: holds {src.schema!r} shards; scoring reads {SCORABLE}")
    rank, world = resolve_rank_world(rank, world_size)
    built, specs = _resolve_scorers(scorers, device if device is not None else default_device(), dtype)
    wanted = "video" if src.schema == "video_pair" else "image"
    wrong = [s.name for s in built if s.modality != wanted]
    if wrong:
        kinds = sorted({s.modality for s in built if s.modality != wanted})
        raise ScoreError(f"{src.description} holds {src.schema!r} samples: score them with {wanted} scorers; "
                         f"{wrong} score {' and '.join(k if k == 'audio' else k + 's' for k in kinds)}")
    out = Path(out_dir)
    for s, spec in zip(built, specs):
        _prepare_scorer_dir(out, s, spec)
    report = ScoreReport(scorers=[s.name for s in built])
    mine = list(range(len(src.urls)))[rank::world]
    bar = tqdm(mine, desc=f"score (rank {rank})", disable=not progress, unit="shard")
    for i in bar:
        name = src.names[i]
        todo = [s for s in built if not score_path(out, s.name, name).is_file()]
        if not todo:
            report.shards_already_done += 1
            continue
        results, n, reasons, skipped = score_one_shard(src.urls[i], name, src.schema, todo, batch_size=batch_size,
                                                       strict=strict, num_workers=num_workers)
        for s in todo:
            write_score_file(score_path(out, s.name, name), s.info(), name, src.schema, results[s.name], skipped,
                             reasons, writer=f"rank {rank} of {world}")
        report.shards_scored += 1
        report.samples += n
        report.skipped += skipped
        report.skip_reasons.update(reasons)
        bar.set_postfix(samples=report.samples, skipped=report.skipped)
    return report


def read_scores(out_dir: str | os.PathLike, scorer_name: str, source: str | os.PathLike | None = None
                ) -> tuple[dict[str, list], dict[str, Any]]:
    """({sample key: scores}, scorer info) from a score folder. With `source` (the scored shard set), every shard
    must have its file (else an error naming the missing ones)."""
    folder = scorer_dir(out_dir, scorer_name)
    info_path = folder / "scorer.json"
    if not info_path.is_file():
        raise ScoreError(f"{folder}: no scores of {scorer_name!r} (no scorer.json); run mmalign score first")
    info = json.loads(info_path.read_text())
    files = sorted(p for p in folder.glob("*.jsonl"))
    if source is not None:
        from mmalign.data.manifest import open_source

        names = open_source(source).names
        missing = [n for n in names if not score_path(out_dir, scorer_name, n).is_file()]
        if missing:
            raise ScoreError(f"{folder}: {len(missing)} of {len(names)} shards are not scored yet (e.g. "
                             f"{missing[0]}); run or resume mmalign score")
        files = [score_path(out_dir, scorer_name, n) for n in names]
    scores: dict[str, list] = {}
    for path in files:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0])
        if header.get("format") != SCORE_FORMAT or header.get("version") != info["version"]:
            raise ScoreError(f"{path}: not a score file of {scorer_name} version {info['version']}")
        for line in lines[1:]:
            row = json.loads(line)
            scores[row["key"]] = row["scores"]
    return scores, info


def score_summary(out_dir: str | os.PathLike, scorer_name: str, source: str | os.PathLike | None = None
                  ) -> dict[str, float | int]:
    """Set-level means of a score folder over every stored item (image, or video), named for `mmalign score` /
    `mmalign eval` summaries: `<scorer>/mean` (per dimension `<scorer>/<dim>/mean`) and `<scorer>/items`. A
    clip_score folder also gets `clip_score/torchmetrics` = `max(100 * mean(cos), 0)` (torchmetrics' CLIPScore over
    the set, what papers report; `metrics.clip_score_aggregates`) beside `clip_score/mean`, the mean of the clamped
    per-image scores; the two differ when some cosines are negative. `source`: as `read_scores`."""
    import numpy as np

    from mmalign.rewards.metrics import clip_score_aggregates

    scores, info = read_scores(out_dir, scorer_name, source)
    name = info.get("name", scorer_name)
    flat = [x for key in sorted(scores) for x in scores[key]]
    out: dict[str, float | int] = {f"{name}/items": len(flat)}
    if info.get("dims"):
        cols = np.asarray(flat, dtype=np.float64).reshape(len(flat), len(info["dims"]))
        for j, dim in enumerate(info["dims"]):
            out[f"{name}/{dim}/mean"] = float(cols[:, j].mean()) if len(flat) else float("nan")
    else:
        out[f"{name}/mean"] = float(np.mean(flat)) if flat else float("nan")
    cos: dict[str, list] = {}
    if source is not None:
        from mmalign.data.manifest import open_source

        files = [score_path(out_dir, scorer_name, n) for n in open_source(source).names]
    else:
        files = sorted(scorer_dir(out_dir, scorer_name).glob("*.jsonl"))
    for path in files:
        for line in path.read_text().splitlines()[1:]:
            row = json.loads(line)
            if "cos" in row and row["key"] in scores:
                cos[row["key"]] = row["cos"]
    if cos and cos.keys() == scores.keys():
        agg = clip_score_aggregates([c for key in sorted(cos) for c in cos[key]])
        out[f"{name}/torchmetrics"] = agg["torchmetrics"]
    return out


def format_summary(summary: dict[str, float | int]) -> str:
    return "  ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in summary.items())


# -- Ray Data ----------------------------------------------------------------------------------------------------
def score_shards_ray(source: str | os.PathLike, out_dir: str | os.PathLike, scorer_specs: Sequence[str], *,
                     batch_size: int = 32, num_actors: int = 1, gpus_per_actor: float = 0.0, wave: int = 64,
                     strict: bool = False, progress: bool = True) -> ScoreReport:
    """`score_shards` on Ray Data (the `ray` extra): shards are read and decoded in CPU tasks, scored in a pool of
    `num_actors` actors (each loads the scorers once, with `gpus_per_actor` GPUs) and the per-shard files are
    written here, `wave` shards at a time (an interrupted run loses at most one wave). Connects to the running
    cluster (`ray.init()`: RAY_ADDRESS, or a local one)."""
    try:
        import ray
    except ImportError as err:
        raise ScoreError("the Ray backend needs the ray extra: pip install 'mmalign[ray]'") from err
    from tqdm.auto import tqdm

    from mmalign.data.manifest import open_source

    src = open_source(source)
    if src.schema not in ("pair", "ranked"):
        raise ScoreError(f"the Ray backend scores image shards (pair, ranked); {src.description} is {src.schema!r}")
    scorers, _ = _resolve_scorers(list(scorer_specs), "cpu", None)
    out = Path(out_dir)
    for s, spec in zip(scorers, scorer_specs):
        _prepare_scorer_dir(out, s, spec)
    infos = {s.name: s.info() for s in scorers}
    todo = [i for i in range(len(src.urls))
            if not all(score_path(out, n, src.names[i]).is_file() for n in infos)]
    report = ScoreReport(shards_already_done=len(src.urls) - len(todo), scorers=list(infos))
    if not ray.is_initialized():
        ray.init()
    urls, names, schema = src.urls, src.names, src.schema

    def decode(row: dict) -> list[dict]:
        import numpy as np

        i = int(row["shard"])
        dataset = open_reader(urls[i], schema, strict)
        rows = []
        for sample in dataset:
            images, prompt = _items(schema, sample)
            for j, im in enumerate(images):
                rows.append({"shard": i, "key": sample["__key__"], "item": j, "n_items": len(images),
                             "image": np.asarray(im), "prompt": prompt, "skipped": 0, "reasons": ""})
        # One marker row per shard carries its skip count and reasons (it has no image to score).
        rows.append({"shard": i, "key": "", "item": -1, "n_items": 0, "image": np.zeros((1, 1, 3), np.uint8),
                     "prompt": "", "skipped": int(dataset.stats.skipped),
                     "reasons": json.dumps(dict(dataset.stats.reasons))})
        return rows

    class ScoreActor:
        def __init__(self, specs: list[str]):
            from mmalign.rewards.registry import load_scorer

            self.scorers = [load_scorer(s, device=default_device()) for s in specs]

        def __call__(self, batch: dict) -> dict:
            import numpy as np

            real = [k for k in range(len(batch["item"])) if batch["item"][k] >= 0]
            for s in self.scorers:
                # JSON text, "" on marker rows: one string type in every block (Ray unifies block schemas).
                col = np.array([""] * len(batch["item"]), dtype=object)
                if real:
                    scores = _score_items(s, [batch["image"][k] for k in real],
                                          [str(batch["prompt"][k]) for k in real], len(real))
                    for k, v in zip(real, scores):
                        col[k] = json.dumps(v)
                batch[f"score:{s.name}"] = col
            del batch["image"]
            return batch

    for start in tqdm(range(0, len(todo), wave), desc="score (ray)", disable=not progress, unit="wave"):
        chunk = todo[start:start + wave]
        ds = ray.data.from_items([{"shard": i} for i in chunk]).flat_map(decode)
        ds = ds.map_batches(ScoreActor, fn_constructor_args=(list(scorer_specs),), batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=gpus_per_actor,
                            batch_format="numpy")
        per_shard: dict[int, dict[str, dict[str, list]]] = {i: {n: {} for n in infos} for i in chunk}
        skipped: Counter = Counter()
        reasons: dict[int, Counter] = {i: Counter() for i in chunk}
        for row in ds.iter_rows():
            i = int(row["shard"])
            if int(row["item"]) < 0:
                skipped[i] += int(row["skipped"])
                reasons[i].update(json.loads(row["reasons"]))
                continue
            for n in infos:
                slots = per_shard[i][n].setdefault(row["key"], [None] * int(row["n_items"]))
                slots[int(row["item"])] = json.loads(row[f"score:{n}"])
        for i in chunk:
            for n, info in infos.items():
                rows = sorted(per_shard[i][n].items())
                write_score_file(score_path(out, n, names[i]), info, names[i], schema, rows, skipped[i],
                                 reasons[i], writer="ray")
            report.shards_scored += 1
            report.samples += len(per_shard[i][next(iter(infos))])
            report.skipped += skipped[i]
            report.skip_reasons.update(reasons[i])
    return report
