"""`selfgen ranked`: generate K images per prompt, score with several scorers, z-normalise, ranked shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.dataset import RankedDataset
from mmalign.rewards import load_scorer
from mmalign.selfgen.ranked import build_ranked_set, image_seed
from mmalign.toy import COLORS, parse_caption, sample_scene

PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle on the center"]


class ToyGenerator:
    """Renders the prompt's scene in a colour drawn from the seed: right colour about 1 time in 4."""

    def __init__(self, name: str, fail_after: int | None = None):
        self.name, self.fail_after, self.calls = name, fail_after, []

    def __call__(self, prompts, seeds):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append(list(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds):
            scene = sample_scene(seed % 1000, caption=prompt)
            scene = dataclasses.replace(scene, color=COLORS[seed % len(COLORS)])
            out.append(Image.fromarray(scene.render()))
        return out


def test_ranked_round_trip_and_resume(tmp_path):
    gens = [ToyGenerator("g0", fail_after=1), ToyGenerator("g1")]
    out = tmp_path / "ranked"
    with pytest.raises(RuntimeError, match="interrupted"):
        build_ranked_set(PROMPTS, gens, ["toy_color", "toy_position"], out, k=3, seed=7, batch_size=3,
                         progress=False)
    assert (out / ".staging" / "000000000.json").is_file() and not (out / "manifest.json").exists()
    gens[0].fail_after = None
    manifest = build_ranked_set(PROMPTS, gens, ["toy_color", "toy_position"], out, k=3, seed=7, batch_size=3,
                                progress=False)
    # g0 makes images 0 and 2 of each prompt; prompt 0 was finished before the interruption and is not redone
    assert gens[0].calls == [[p, p] for p in PROMPTS]
    assert manifest.num_samples == 3 and not (out / ".staging").exists()

    samples = list(RankedDataset(out))
    assert [s["caption"] for s in samples] == PROMPTS
    color, position = load_scorer("toy_color"), load_scorer("toy_position")
    raw = {"toy_color": [], "toy_position": []}
    for s in samples:
        assert len(s["images"]) == 3 and s["scorers"] == ["toy_color", "toy_position"]
        assert s["provenance"]["generators"] == ["g0", "g1", "g0"]  # image j from generator j mod G
        raw["toy_color"].append(color.score(s["images"], s["caption"]).numpy())
        raw["toy_position"].append(position.score(s["images"], s["caption"]).numpy())
    z = [(np.array(v) - np.mean(v)) / np.std(v) if np.std(v) > 0 else np.zeros((3, 3)) for v in raw.values()]
    expected = (z[0] + z[1]) / 2
    np.testing.assert_allclose(np.stack([s["scores"].numpy() for s in samples]), expected, atol=1e-5)
    # the stored images are the generator's output for each (prompt, image) seed
    again = ToyGenerator("x")([PROMPTS[1]], [image_seed(7, 1, 2)])[0]
    assert np.array_equal(np.asarray(samples[1]["images"][2]), np.asarray(again))
    stats = manifest.conversion["scorers"]["toy_color"]
    assert stats["mean"] == pytest.approx(np.mean(raw["toy_color"]))


def _staged_run(out, gens, prompts=PROMPTS):
    """A run killed after its first prompt was staged."""
    gens[0].fail_after = 1
    with pytest.raises(RuntimeError, match="interrupted"):
        build_ranked_set(prompts, gens, ["toy_color"], out, k=3, seed=7, batch_size=3, progress=False)
    assert (out / ".staging" / "000000000.json").is_file()
    gens[0].fail_after = None


def test_ranked_resume_is_keyed_on_prompts_and_generator_settings(tmp_path):
    out = tmp_path / "ranked"
    gens = [ToyGenerator("g0"), ToyGenerator("g1")]
    for g in gens:
        g.settings = {"steps": 2, "guidance_scale": 7.5, "resolution": 32}
    _staged_run(out, gens)
    other = ["a yellow circle on the right"] + PROMPTS[1:]  # another prompts file: prompt 0 differs
    with pytest.raises(ValueError, match=r"prompts"):
        build_ranked_set(other, gens, ["toy_color"], out, k=3, seed=7, batch_size=3, progress=False)
    with pytest.raises(ValueError, match=r"prompts"):  # --limit: a prefix of the same file is another input too
        build_ranked_set(PROMPTS[:2], gens, ["toy_color"], out, k=3, seed=7, batch_size=3, progress=False)
    gens[0].settings = {**gens[0].settings, "steps": 3}  # --steps 3
    with pytest.raises(ValueError, match=r"generator settings.*steps"):
        build_ranked_set(PROMPTS, gens, ["toy_color"], out, k=3, seed=7, batch_size=3, progress=False)
    assert (out / ".staging" / "000000000.json").is_file()  # a refusal leaves the staged run alone

    # overwrite starts again from nothing: no staged image of the old run is reused
    gens[0].calls.clear()
    manifest = build_ranked_set(other, gens, ["toy_color"], out, k=3, seed=7, batch_size=3, progress=False,
                                overwrite=True)
    assert gens[0].calls == [[p, p] for p in other]
    assert manifest.num_samples == 3 and [s["caption"] for s in RankedDataset(out)] == other


def test_selfgen_ranked_cli_refuses_a_resume_with_other_steps(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from mmalign.cli import main
    from mmalign.selfgen import ranked

    calls = []

    class Killed(Exception):
        pass

    def fake_pipe(prompt, num_inference_steps, guidance_scale, generator, output_type, **size):
        if len(calls) == 1 and num_inference_steps == 2:
            raise Killed
        calls.append((list(prompt), num_inference_steps))
        imgs = ToyGenerator("x")(prompt, [int(g.initial_seed()) for g in generator])
        return SimpleNamespace(images=imgs)

    def post_init(self):
        self.pipe, self.name = fake_pipe, self.name or self.source

    monkeypatch.setattr(ranked.DiffusersGenerator, "__post_init__", post_init)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square on the right\n")
    out = tmp_path / "synpic"
    args = ["selfgen", "ranked", "--generators", "fake-sd", "--prompts", str(prompts), "--k", "2",
            "--scorers", "toy_color", "--out", str(out), "--batch-size", "2", "--no-progress"]
    with pytest.raises(Killed):
        main([*args, "--steps", "2"])
    assert (out / ".staging" / "000000000.json").is_file()
    capsys.readouterr()
    assert main([*args, "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and "--overwrite" in err
    calls.clear()
    assert main([*args, "--steps", "3", "--overwrite"]) == 0
    assert calls == [(["a red circle on the left"] * 2, 3), (["a blue square on the right"] * 2, 3)]


def test_ranked_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="k must be >= 2"):
        build_ranked_set(PROMPTS, [ToyGenerator("g")], ["toy_color"], tmp_path / "a", k=1, progress=False)
    with pytest.raises(ValueError, match="several dimensions"):
        build_ranked_set(PROMPTS, [ToyGenerator("g")], ["toy"], tmp_path / "b", k=2, progress=False)


def test_selfgen_ranked_cli_with_a_diffusers_pipeline(tiny_sd15, tmp_path, capsys):
    from mmalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n\na blue square on the right\n")
    out = tmp_path / "synpic"
    code = main(["selfgen", "ranked", "--generators", tiny_sd15, "--prompts", str(prompts), "--k", "2",
                 "--scorers", "toy_color,toy_total", "--out", str(out), "--steps", "2", "--resolution", "32",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    samples = list(RankedDataset(out))
    assert [s["caption"] for s in samples] == ["a red circle on the left", "a blue square on the right"]
    assert all(np.asarray(im).shape == (32, 32, 3) for s in samples for im in s["images"])
    assert "2 ranked samples" in capsys.readouterr().out
    assert parse_caption(samples[0]["caption"])[0] == "red"
    assert torch.isfinite(torch.stack([s["scores"] for s in samples])).all()
