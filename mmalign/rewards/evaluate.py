"""`mmalign eval reward`: how well reward models agree with the labels of a shard set.

- `pair` shards: pairwise accuracy (human ties excluded) and accuracy with ties (tie threshold calibrated, Deutsch
  et al. 2023), per scorer and, for multi-dimension scorers, per dimension;
- `ranked` shards: mean inversion score of the scorer's order against the stored scores;
- `video_pair` shards: both accuracies per dimension (VQ, MQ, TA) against that dimension's label.

Scores come from `mmalign score` folders (`--scores DIR`, reused and completed if partial) or are computed into a
temporary folder. Writes JSON and prints a table, then each scorer's set-level means (`scoring.score_summary`:
`<scorer>/mean`; for clip_score also `clip_score/torchmetrics`, torchmetrics' aggregate).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmalign.rewards.metrics import (accuracy_with_ties, inversion_score, labels_from_pair, labels_from_video,
                                     pairwise_accuracy)


def _labels(source, schema: str) -> dict[str, Any]:
    """{key: label} read from the shards without decoding media (pair: 1/-1/0, ranked: scores, video: {dim: 1/-1/0})."""
    from mmalign.data.dataset import PairDataset, RankedDataset, VideoPairDataset

    if schema == "pair":
        ds = PairDataset(source, ties="keep", decode_images=False, rank=0, world_size=1)
        return {s["__key__"]: labels_from_pair(s["label_0"]) for s in ds}
    if schema == "ranked":
        ds = RankedDataset(source, decode_images=False, rank=0, world_size=1)
        return {s["__key__"]: s["scores"].tolist() for s in ds}
    ds = VideoPairDataset(source, rank=0, world_size=1)
    return {s["__key__"]: {d: labels_from_video(v) for d, v in s["labels"].items()} for s in ds}


def _column(scores: list, dim: int | None) -> np.ndarray:
    return np.asarray([s if dim is None else s[dim] for s in scores], dtype=np.float64)


def metrics_for(schema: str, labels: dict[str, Any], scores: dict[str, list], dims: Sequence[str] | None
                ) -> dict[str, dict[str, float]]:
    """Metrics per dimension ("score" for a scalar scorer) over the samples present in both `labels` and `scores`."""
    keys = sorted(set(labels) & set(scores))
    columns = [("score", None)] if not dims else [(d, j) for j, d in enumerate(dims)]
    out: dict[str, dict[str, float]] = {}
    for dim, j in columns:
        if schema == "ranked":
            inv = [inversion_score(_column(scores[k], j), labels[k]) for k in keys]
            out[dim] = {"inversion_score": float(np.mean(inv)) if inv else float("nan"), "num_lists": len(inv)}
            continue
        if schema == "video_pair":
            if dim not in next(iter(labels.values()), {}):
                continue  # e.g. Overall: the schema has no overall label
            h = [labels[k][dim] for k in keys]
        else:
            h = [labels[k] for k in keys]
        m = [float(_column(scores[k], j)[0] - _column(scores[k], j)[1]) for k in keys]
        acc = pairwise_accuracy(h, m)
        ties = accuracy_with_ties(h, m)
        out[dim] = {"accuracy": acc["accuracy"], "accuracy_with_ties": ties["accuracy"],
                    "tie_epsilon": ties["epsilon"], "num_pairs": acc["num_pairs"], "num_ties": acc["num_ties"]}
    return out


def evaluate_reward(source: str | os.PathLike, scorers: Sequence[Any], *, scores_dir: str | os.PathLike | None = None,
                    batch_size: int = 32, device=None, strict: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score `source` with each scorer (reusing `scores_dir`) and compute the metrics; returns the JSON report."""
    from mmalign.data.manifest import open_source
    from mmalign.rewards.scoring import read_scores, score_shards, score_summary

    src = open_source(source)
    with tempfile.TemporaryDirectory(prefix="mmalign-eval-") as tmp:
        folder = Path(scores_dir) if scores_dir is not None else Path(tmp)
        report = score_shards(source, folder, scorers, batch_size=batch_size, device=device, strict=strict,
                              rank=0, world_size=1, progress=progress)
        labels = _labels(source, src.schema)
        result: dict[str, Any] = {"source": str(source), "schema": src.schema, "num_samples": len(labels),
                                  "skipped": report.skipped, "scorers": {}}
        for name in report.scorers:
            scores, info = read_scores(folder, name, source)
            result["scorers"][name] = {"version": info["version"],
                                       "metrics": metrics_for(src.schema, labels, scores, info.get("dims")),
                                       "summary": score_summary(folder, name, source)}
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of an `evaluate_reward` result."""
    ranked = result["schema"] == "ranked"
    head = ["scorer", "dim", "inversion", "lists"] if ranked else \
        ["scorer", "dim", "acc", "acc w/ ties", "eps", "pairs", "ties"]
    rows = [head]

    def f(x: float) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    for name, entry in result["scorers"].items():
        for dim, m in entry["metrics"].items():
            if ranked:
                rows.append([name, dim, f(m["inversion_score"]), str(m["num_lists"])])
            else:
                rows.append([name, dim, f(m["accuracy"]), f(m["accuracy_with_ties"]), f"{m['tie_epsilon']:.4g}",
                             str(m["num_pairs"]), str(m["num_ties"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    from mmalign.rewards.scoring import format_summary

    lines += [format_summary(e["summary"]) for e in result["scorers"].values() if e.get("summary")]
    return "\n".join(lines)
