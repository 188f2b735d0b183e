"""Toy VLM proof: what a pair set's rejected captions change, per-colour hallucination, the report."""

import pytest

from mmalign.vlm.proof import markdown, summarise
from mmalign.vlm.toy import caption_metrics, pair_differences


def test_pair_differences_counts_each_slot_and_the_rejected_colours():
    chosen = ["a red circle on the left", "a red circle on the left", "a blue square on the right",
              "a blue square on the right", "not a caption"]
    rejected = ["a green circle on the left",  # colour only
                "a green square on the left",  # colour and shape
                "a blue square on the center",  # position only
                "a green triangle on the left",  # all three
                "a red circle on the left"]  # the chosen does not parse: not counted
    d = pair_differences(chosen, rejected)
    assert (d["n"], d["n_parsed"]) == (5, 4)
    assert d["colour"] == pytest.approx(3 / 4)
    assert d["shape"] == pytest.approx(2 / 4)
    assert d["position"] == pytest.approx(2 / 4)
    assert d["colour_only"] == pytest.approx(1 / 4)
    # Every colour change went to green: a signal that says "avoid green" whatever the image.
    assert d["rejected_colours"] == {"red": 0.0, "green": 1.0, "blue": 0.0, "yellow": 0.0}


def _metrics(h, by):
    return {"hallucination_greedy": h, "hallucination_sampled": 0.3, "shape_accuracy": 0.99,
            "position_accuracy": 0.98, "format_validity": 1.0, "hallucination_greedy_by_colour": by}


def test_summary_and_report_carry_seeds_colours_differences_and_timings():
    base = _metrics(0.12, {"red": 0.2, "green": 0.05, "blue": 0.18, "yellow": 0.05})
    runs = {"bdhs_dpo_sft": [_metrics(0.10, {"red": 0.1, "green": 0.4, "blue": 0.0, "yellow": 0.0}),
                             _metrics(0.14, {"red": 0.1, "green": 0.2, "blue": 0.0, "yellow": 0.0})]}
    s = summarise(runs, base)
    row = s["bdhs_dpo_sft"]
    assert row["hallucination_greedy"]["mean"] == pytest.approx(0.12)
    assert row["hallucination_greedy"]["sd"] == pytest.approx(0.02828, abs=1e-4)
    assert row["hallucination_greedy_relative_change"] == pytest.approx(0.0)
    assert row["hallucination_greedy_by_colour"]["green"] == pytest.approx(0.3)
    diffs = {"bdhs/seed0": pair_differences(["a red circle on the left"], ["a green circle on the left"])}
    timings = {"bdhs_dpo_sft/seed0": {"s_per_step_steady": 0.2}, "bdhs_dpo_sft/seed1": {"s_per_step_steady": 0.3}}
    text = markdown(s, 1024, [0, 1], diffs, timings)
    assert "| bdhs_dpo_sft | 12.0 ± 2.8 | 30.0 ± 0.0 | 99.0 ± 0.0 | 98.0 ± 0.0 | 100.0 ± 0.0 |" in text
    assert "bdhs_dpo_sft 10.0 / 14.0" in text
    assert "| bdhs_dpo_sft | 10.0 | 30.0 | 0.0 | 0.0 |" in text
    assert "colour only 100" in text and "green 100" in text
    assert "bdhs_dpo_sft 0.250" in text


def test_evaluate_toy_reports_greedy_hallucination_per_true_colour(monkeypatch):
    import numpy as np

    import mmalign.vlm.toy as toy
    from mmalign.toy.scenes import sample_scenes

    scenes = sample_scenes(40, 3)

    class SaysGreen:  # a captioner that always answers "green": wrong on every scene that is not green
        def generate(self, prompts, images, max_new_tokens):
            return [f"a green {s.shape} on the {s.position}" for s in scenes[:len(prompts)]]

    monkeypatch.setattr(toy, "true_colour_probability", lambda adapter, chunk, images, prompt: np.ones(len(chunk)))
    out = toy.evaluate_toy(SaysGreen(), scenes, batch_size=len(scenes))
    present = {s.color for s in scenes}
    assert set(out["hallucination_greedy_by_colour"]) == present and len(present) > 1
    for colour, rate in out["hallucination_greedy_by_colour"].items():
        assert rate == (0.0 if colour == "green" else 1.0)
    assert out["hallucination_greedy"] == pytest.approx(sum(s.color != "green" for s in scenes) / len(scenes))
