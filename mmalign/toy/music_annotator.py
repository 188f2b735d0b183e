"""Simulated music annotator and `music_pair` shards of toy phrases.

Labels are given per dimension (pattern, quality), as the video annotator's are: for phrases A and B and each
dimension d, the image toy's pairwise annotator (`mmalign.toy.annotator.label_pairs`: Bradley-Terry with a tie
margin) is applied to the ground-truth rewards ``r_d(A)``, ``r_d(B)`` of `mmalign.toy.music_rewards`:

- ``|r_d(A) - r_d(B)| <= tie_margin_d``  -> "same", always;
- otherwise -> "A" with probability ``sigmoid((r_d(A) - r_d(B)) / temperature_d)``, else "B".

A `music_pair` sample has one chosen and one rejected side, so one dimension decides (`decide_by`, default
"pattern", the dimension the toy base model gets wrong); pairs whose deciding label is "same" are dropped and
counted (`ties_dropped` in the manifest's `conversion`). Codes are stored as they are (int64 `.npy`): the reader
gives back exactly the codes the labels were computed on.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from mmalign.data.schemas import sanitize_key
from mmalign.toy.annotator import label_dimensions
from mmalign.toy.music import FRAME_RATE
from mmalign.toy.music_rewards import MUSIC_DIMENSIONS, check_codes



def label_music_pairs(
    rewards_a: Mapping[str, np.ndarray],
    rewards_b: Mapping[str, np.ndarray],
    rng: np.random.Generator | int,
    temperature: float | Mapping[str, float] = 0.05,
    tie_margin: float | Mapping[str, float] = 0.02,
) -> list[dict[str, str]]:
    """One label dict ``{"pattern": "A" | "B" | "same", "quality": ...}`` per pair (module docstring).

    `rewards_a` / `rewards_b`: {"pattern", "quality"} -> (N,) ground-truth rewards (e.g. `music_rewards`).
    `temperature` and `tie_margin` are one value for all dimensions or a dict per dimension (reward units; the
    defaults make a one-step pattern gap, 1/7, a 0.95 preference and gaps up to 0.02 ties). Dimensions draw from
    `rng` in pattern, quality order, N uniforms each.
    """
    return label_dimensions(rewards_a, rewards_b, MUSIC_DIMENSIONS, rng, temperature, tie_margin)


def write_music_pair_shards(
    out_dir: str | os.PathLike,
    codes_a: np.ndarray,
    codes_b: np.ndarray,
    prompts: Sequence[str],
    labels: Sequence[Mapping[str, str]],
    *,
    rewards_a: Mapping[str, np.ndarray] | None = None,
    rewards_b: Mapping[str, np.ndarray] | None = None,
    decide_by: str = "pattern",
    key_prefix: str = "toymusic",
    provenance: Mapping[str, Any] | None = None,
    max_count: int = 1000,
    overwrite: bool = False,
):
    """Write N toy phrase pairs as a `music_pair` shard set in `out_dir`; returns its `Manifest`.

    `codes_a` / `codes_b`: int (N, 4, T) codes (`check_codes`); `prompts`: N captions; `labels`: N dicts
    {pattern, quality} -> A / B / same (e.g. `label_music_pairs`). The label of `decide_by` picks chosen and
    rejected; a "same" there drops the pair (counted as ``conversion["ties_dropped"]``). Pair i keeps key
    ``f"{key_prefix}-{i:09d}"`` (i indexes the input, so dropped ties leave gaps) and its JSON holds
    ``frame_rate`` (50), ``decided_by``, ``labels`` ({dimension: "chosen" | "rejected" | "same"}, the annotator's
    verdicts on the stored sides) and, when rewards are given, the per-dimension ground-truth scores
    ``scores_chosen`` / ``scores_rejected`` ({dimension: float}). `provenance` defaults to
    ``{"dataset": "mmalign-toy-music"}``.
    """
    from mmalign.data.schemas import music_pair_sample
    from mmalign.data.writer import ShardSetWriter

    a, single_a = check_codes(codes_a, "codes_a")
    b, single_b = check_codes(codes_b, "codes_b")
    n = len(prompts)
    if single_a or single_b or a.shape[0] != n or b.shape[0] != n:
        raise ValueError(f"codes_a and codes_b must be (N, K, T) batches with N = {n} (one per prompt), got "
                         f"{np.shape(codes_a)} and {np.shape(codes_b)}")
    if len(labels) != n:
        raise ValueError(f"got {n} prompts but {len(labels)} label dicts")
    if decide_by not in MUSIC_DIMENSIONS:
        raise ValueError(f"decide_by must be one of {MUSIC_DIMENSIONS}, got {decide_by!r}")
    for i, lab in enumerate(labels):
        if any(lab.get(d) not in ("A", "B", "same") for d in MUSIC_DIMENSIONS):
            raise ValueError(f"labels[{i}] = {dict(lab)}: each of {list(MUSIC_DIMENSIONS)} must be 'A', 'B' or "
                             "'same'")
    if (rewards_a is None) != (rewards_b is None):
        raise ValueError("give both rewards_a and rewards_b (the scores of both sides) or neither")
    scores = {}
    for name, r in (("A", rewards_a), ("B", rewards_b)):
        if r is not None:
            if any(d not in r or np.shape(r[d]) != (n,) for d in MUSIC_DIMENSIONS):
                raise ValueError(f"rewards_{name.lower()} must map each of {list(MUSIC_DIMENSIONS)} to (N,) = ({n},) "
                                 f"scores, got keys {sorted(r)}")
            scores[name] = {d: np.asarray(r[d], dtype=np.float64) for d in MUSIC_DIMENSIONS}
    prov = dict(provenance) if provenance is not None else {"dataset": "mmalign-toy-music"}
    prefix = sanitize_key(key_prefix)
    dropped = 0
    with ShardSetWriter(out_dir, "music_pair", max_count=max_count, overwrite=overwrite) as writer:
        for i in range(n):
            winner = labels[i][decide_by]
            if winner == "same":
                dropped += 1
                continue
            loser = "B" if winner == "A" else "A"
            codes = {"A": a[i], "B": b[i]}
            extra: dict[str, Any] = {
                "decided_by": decide_by,
                "labels": {d: {winner: "chosen", loser: "rejected", "same": "same"}[labels[i][d]]
                           for d in MUSIC_DIMENSIONS},
            }
            if scores:
                extra["scores_chosen"] = {d: float(scores[winner][d][i]) for d in MUSIC_DIMENSIONS}
                extra["scores_rejected"] = {d: float(scores[loser][d][i]) for d in MUSIC_DIMENSIONS}
            writer.write(music_pair_sample(f"{prefix}-{i:09d}", codes[winner], codes[loser], prompt=prompts[i],
                                           frame_rate=FRAME_RATE, provenance=prov, **extra))
        writer.set_conversion({"from": "mmalign.toy.music_annotator", "decide_by": decide_by, "pairs": n,
                               "written": n - dropped, "ties_dropped": dropped})
        return writer.close()
