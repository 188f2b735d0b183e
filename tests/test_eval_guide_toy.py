"""`mmalign eval guide-toy` end to end at toy sizes: every stage runs, the report is consistent with the stored
results, a second run reuses them, and other settings in the same folder are refused."""

import json

import pytest

from mmalign.config import ConfigError
from mmalign.eval.guide_toy import guide_toy
from mmalign.toy.recipe import BASE_MODEL

SMALL = dict(n_eval=6, steps=4, scales=(-1.0, 2.0), model_scales=(2.0,), latent_scales=(4.0,),
             high_noise_window=(0.5, 1.0), trade_off_scale=2.0, best_of=(1, 2), rm_prompts=8, rm_k=2, rm_steps=4,
             rm_batch_size=4, progress=False)


def test_guide_toy_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "gt"
    report = guide_toy(out, str(BASE_MODEL), **SMALL)
    assert set(report["color_soft"]) == {"x0/-1", "x0/2", "model/2"}
    assert set(report["latent"]) == {"noised/4", "noised/4/high_noise", "clean/4", "clean/4/high_noise"}
    assert set(report["trade_off"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert set(report["best_of"]) == {"color/1", "color/2", "latent_noised/1", "latent_noised/2"}
    # The sign check holds even at these sizes: a negative scale lowers colour adherence, a positive one raises it.
    assert report["color_soft"]["x0/-1"]["color_gain"] < 0 < report["color_soft"]["x0/2"]["color_gain"]
    # Best-of-1 is the base sample itself; best-of-2 by the exact colour reward never loses colour.
    assert report["best_of"]["color/1"]["color_gain"] == 0 and report["best_of"]["color/1"]["drift"] == 0
    assert report["best_of"]["color/2"]["color_gain"] >= 0
    # Guidance with the prediction held fixed never runs the UNet backward; the exact gradient does, every step.
    assert report["color_soft"]["x0/2"]["cost"]["denoiser_backward"] == 0
    assert report["color_soft"]["model/2"]["cost"]["denoiser_backward"] == SMALL["steps"]
    assert report["latent"]["noised/4"]["cost"]["denoiser_backward"] == 0
    acc = report["latent_models"]["accuracy"]["noised"]["by_noise_level"]
    assert set(acc) == {"0", "0.25", "0.5", "0.75", "0.9"} and all(0 <= v <= 1 for v in acc.values())
    assert (out / "guide_toy.png").stat().st_size > 10_000
    stored = json.loads((out / "results" / "color_soft_x0_2.json").read_text())
    assert stored["color_gain"] == report["color_soft"]["x0/2"]["color_gain"]
    # Reuse: the stored measurements come back unchanged (a changed number would mean something reran).
    (out / "results" / "color_soft_x0_2.json").write_text(json.dumps({**stored, "color_gain": 0.123}))
    again = guide_toy(out, str(BASE_MODEL), **SMALL)
    assert again["color_soft"]["x0/2"]["color_gain"] == 0.123
    with pytest.raises(ConfigError, match="other settings"):
        guide_toy(out, str(BASE_MODEL), **{**SMALL, "steps": 5})
