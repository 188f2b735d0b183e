"""The toy VLM world: caption 32x32 toy scenes (`mmalign.toy.scenes`) and measure colour hallucination.

A caption is well formed when it parses as ``a {color} {shape} on the {position}``. Metrics over N scenes:

- `hallucination_greedy`: share of greedy captions that name a colour (any palette word) other than the true one;
- `hallucination_sampled`: mean of ``1 - p(true colour word | image, prompt, "a")``, the probability that a caption
  sampled at temperature 1 names a wrong colour (or no colour) in the colour slot: the noise greedy decoding hides;
- `shape_accuracy`, `position_accuracy`: share of greedy captions that parse and name the true shape / position;
- `format_validity`: share of greedy captions that parse;
- `hallucination_greedy_by_colour`: the greedy rate per true colour (a model that learned "never say green"
  shows up here and hardly in the mean).

`pair_differences` says what the chosen and rejected captions of a pair set differ in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mmalign.toy.scenes import COLORS, Scene, noisy_caption, parse_caption, sample_scenes

# What the toy VLM is taught to answer with a caption; STIC's step-by-step prompt is among them.
TOY_PROMPTS = ("describe the image", "what is in the image", "describe the image in detail",
               "describe the image step by step")
TOY_STEP_PROMPT = "describe the image step by step"
TOY_PLAIN_PROMPT = "describe the image"


def scene_images(scenes: Sequence[Scene]):
    from PIL import Image

    return [Image.fromarray(s.render()) for s in scenes]


@dataclass
class ToyData:
    scenes: list[Scene]
    images: list  # PIL
    captions: list[str]  # noisy training captions
    prompts: list[str]


def toy_training_data(n: int, seed: int, p_true: float = 0.6) -> ToyData:
    """`n` scenes with noisy captions (true colour with probability `p_true`) and a prompt each, all fixed by
    `seed`: a small fixed noisy set, which is what a model memorises into greedy hallucination."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng([seed, 1])
    captions = [noisy_caption(s, rng, p_true) for s in scenes]
    prompts = [TOY_PROMPTS[i] for i in rng.integers(len(TOY_PROMPTS), size=n)]
    return ToyData(scenes, scene_images(scenes), captions, prompts)


def heldout_scenes(n: int, seed: int = 10_000) -> list[Scene]:
    """Evaluation scenes from a seed no training split uses (training seeds are small integers)."""
    return sample_scenes(n, seed)


def caption_metrics(caption: str, scene: Scene) -> dict[str, float]:
    words = caption.split()
    named = [w for w in words if w in COLORS]
    out = {"hallucination_greedy": float(bool(named) and named[0] != scene.color)}
    try:
        color, shape, position = parse_caption(caption)
        out.update(format_validity=1.0, shape_accuracy=float(shape == scene.shape),
                   position_accuracy=float(position == scene.position), color_accuracy=float(color == scene.color))
    except ValueError:
        out.update(format_validity=0.0, shape_accuracy=0.0, position_accuracy=0.0, color_accuracy=0.0)
    return out


@torch.no_grad()
def true_colour_probability(adapter, scenes: Sequence[Scene], images, prompt: str) -> np.ndarray:
    """p(true colour word | image, prompt, answer so far "a") under the adapter's policy, per scene."""
    colour_ids = {}
    for c in COLORS:
        ids = adapter.tokenizer(" " + c, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"colour {c!r} is not one token for this tokenizer ({ids}); the sampling-based "
                             "hallucination rate needs single-token colour words")
        colour_ids[c] = ids[0]
    # Score "a" as the response without its end-of-turn: the last logit row then predicts the colour slot.
    inputs = adapter.encode([prompt] * len(scenes), [[im] for im in images], ["a"] * len(scenes))
    logits = adapter.model(**inputs.model_inputs, use_cache=False).logits
    ends = torch.tensor(inputs.prompt_lengths)  # index of the response's first token ("a")
    a_pos = ends + len(adapter.response_ids("a", eos=False)) - 1
    probs = torch.softmax(logits[torch.arange(len(scenes)), a_pos].float(), dim=-1)
    want = torch.tensor([colour_ids[s.color] for s in scenes])
    return probs[torch.arange(len(scenes)), want].numpy()


def evaluate_toy(adapter, scenes: Sequence[Scene], *, prompt: str = TOY_PLAIN_PROMPT, batch_size: int = 128,
                 max_new_tokens: int = 10, progress: bool = False) -> dict[str, float]:
    """Greedy captions + colour-slot probabilities of `scenes` -> the metrics in the module docstring (means),
    plus `n` and the standard error of the greedy hallucination rate."""
    from tqdm.auto import tqdm

    sums: dict[str, float] = {}
    by_colour = {c: [0, 0] for c in COLORS}  # true colour -> [hallucinated, scenes]
    p_true = []
    for start in tqdm(range(0, len(scenes), batch_size), desc="toy eval", disable=not progress):
        chunk = list(scenes[start: start + batch_size])
        images = scene_images(chunk)
        captions = adapter.generate([prompt] * len(chunk), [[im] for im in images], max_new_tokens=max_new_tokens)
        for cap, scene in zip(captions, chunk):
            for k, v in caption_metrics(cap.strip(), scene).items():
                sums[k] = sums.get(k, 0.0) + v
                if k == "hallucination_greedy":
                    by_colour[scene.color][0] += int(v)
                    by_colour[scene.color][1] += 1
        p_true.append(true_colour_probability(adapter, chunk, images, prompt))
    n = len(scenes)
    out = {k: v / n for k, v in sums.items()}
    out["hallucination_sampled"] = float(1.0 - np.concatenate(p_true).mean())
    h = out["hallucination_greedy"]
    out["hallucination_greedy_se"] = math.sqrt(max(h * (1 - h), 1e-12) / n)
    out["hallucination_greedy_by_colour"] = {c: k / m for c, (k, m) in by_colour.items() if m}
    out["n"] = n
    return out


def pair_differences(chosen: Sequence[str], rejected: Sequence[str]) -> dict[str, Any]:
    """What the rejected captions of a pair set change, over the pairs whose two captions both parse:
    `colour`, `shape`, `position` (share of pairs where that slot differs), `colour_only` (only the colour
    differs), `rejected_colours` (share of each colour among the rejected captions that change the colour),
    `n_parsed` and `n`. A preference signal aimed at colour has `colour_only` near 1; rejected colours piled on one
    colour teach "avoid that colour" whatever the image shows."""
    diff = {"colour": 0, "shape": 0, "position": 0, "colour_only": 0}
    rejected_colours = {c: 0 for c in COLORS}
    parsed = 0
    for c, r in zip(chosen, rejected):
        try:
            (cc, cs, cp), (rc, rs, rp) = parse_caption(c), parse_caption(r)
        except ValueError:
            continue
        parsed += 1
        diff["colour"] += rc != cc
        diff["shape"] += rs != cs
        diff["position"] += rp != cp
        diff["colour_only"] += rc != cc and rs == cs and rp == cp
        if rc != cc:
            rejected_colours[rc] += 1
    out: dict[str, Any] = {k: v / max(parsed, 1) for k, v in diff.items()}
    out["rejected_colours"] = {k: v / max(diff["colour"], 1) for k, v in rejected_colours.items()}
    out.update(n_parsed=parsed, n=len(chosen))
    return out
