"""The toy world's text-to-image model and experiment stages: pipeline, pixel-space adapter, data, metrics,
and a shortened `mmalign quickstart` that must write every file a user is promised."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.models.tiny import TOY_WORDS, word_clip_tokenizer
from mmalign.toy import experiment as ex
from mmalign.toy.pipeline import ToyT2IPipeline, build_toy_t2i
from mmalign.toy.scenes import BACKGROUND, PALETTE, sample_scene

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "toy" / "t2i"


@pytest.mark.parametrize("special_last", [False, True])
def test_every_toy_word_is_one_token(special_last):
    tok = word_clip_tokenizer(special_last=special_last)
    for word in TOY_WORDS:
        assert tok.tokenize(word) == [f"{word}</w>"], word
    ids = tok("a green triangle on the right").input_ids
    assert len(ids) == 8  # BOS + 6 words + EOS: fits the toy encoder's 8 positions without truncation
    vocab = tok.get_vocab()
    if special_last:  # the real CLIP layout the tiny reward models use: EOS has the largest id
        assert vocab["<|endoftext|>"] == max(vocab.values())


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy") / "t2i"
    build_toy_t2i(seed=0).save_pretrained(folder)
    return folder


def test_pipeline_round_trip_and_per_image_seeds(toy_folder):
    pipe = ToyT2IPipeline.from_pretrained(toy_folder)
    assert pipe.vae if hasattr(pipe, "vae") else True
    index = json.loads((toy_folder / "model_index.json").read_text())
    assert index["_class_name"] == "ToyT2IPipeline" and "vae" not in index
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = pipe(["a red circle on the left", "a blue square on the right"], num_inference_steps=3,
                generator=gens, output_type="np").images
    alone = pipe(["a blue square on the right"], num_inference_steps=3,
                 generator=[torch.Generator().manual_seed(4)], output_type="np").images
    assert both.shape == (2, 32, 32, 3) and 0.0 <= both.min() and both.max() <= 1.0
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)  # an image depends on its own seed only
    with pytest.raises(ValueError, match="32x32"):
        pipe("a red circle on the left", height=64)


def test_shipped_base_model_loads_with_from_pretrained_and_generates():
    card = json.loads((SHIPPED / "pretrain.json").read_text())
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    pipe = ToyT2IPipeline.from_pretrained(SHIPPED)
    prompts = ["a red circle on the left", "a yellow triangle on the right"] * 4
    images = ex.generate(pipe, prompts, list(range(8)), num_inference_steps=20, progress=False)
    r = ex.rewards(images, prompts)
    # A trained model draws one clean shape per image: shape and position mostly right; colour imperfect.
    assert r["position"].mean() > 0.5
    assert card["heldout"]["mean_color"] < 0.9


def test_pixel_space_adapter_is_identity_and_dpo_starts_at_ln2(toy_folder):
    from mmalign.t2i.adapter import T2IAdapter, load_t2i_components
    from mmalign.losses import diffusion_dpo_loss

    comps = load_t2i_components(str(toy_folder))
    assert comps.vae is None and comps.prediction_type == "sample"
    adapter = T2IAdapter(comps, reference="copy")
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    posterior = adapter.encode_images(pixels)
    assert torch.equal(adapter.sample_latents(posterior, torch.Generator().manual_seed(0)), pixels)
    cond = adapter.encode_text(["a red circle on the left", "a blue square on the right"])
    gen = torch.Generator().manual_seed(0)
    policy, ref, _ = adapter.group_errors(comps.unet, pixels.view(2, 2, 3, 32, 32), cond, None, gen, True)
    loss, _ = diffusion_dpo_loss(policy[0], policy[1], ref[0], ref[1], 2000.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def _scene_image(color: str, shape: str = "circle", position: str = "left", seed: int = 0) -> np.ndarray:
    return sample_scene(seed, caption=f"a {color} {shape} on the {position}").render()


def test_win_rate_counts_ties_as_half_with_a_normal_interval():
    cand = np.array([0.9, 0.5, 0.52, 0.1])
    base = np.array([0.1, 0.5, 0.50, 0.9])  # win, tie, tie (within 0.05), loss
    out = ex.win_rate(cand, base)
    scores = np.array([1.0, 0.5, 0.5, 0.0])
    half = 1.96 * scores.std(ddof=1) / 2
    assert out["value"] == 0.5 and (out["wins"], out["ties"], out["losses"]) == (1, 2, 1)
    assert out["ci95"] == pytest.approx([0.5 - half, min(1.0, 0.5 + half)])
    with pytest.raises(ValueError, match="equal 1-D"):
        ex.win_rate(cand, base[:3])


def test_pixel_drift_is_mean_rgb_distance():
    a = np.zeros((1, 32, 32, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = (3, 4, 0)  # distance 5 on one pixel of 1024
    assert ex.pixel_drift(a, b) == pytest.approx(5 / 1024)
    assert ex.pixel_drift(a, a) == 0.0


def test_preference_data_labels_follow_the_ground_truth(tmp_path):
    from mmalign.data import PairDataset, RankedDataset

    # Per prompt: K=3 images, the captioned colour, another colour, and background only (reward order known).
    prompts = ["a red circle on the left", "a blue square on the center"]
    images, seeds = [], []
    for g, prompt in enumerate(prompts):
        color, shape, _, _, position = prompt.split()[1:6]
        other = "green" if color != "green" else "red"
        blank = np.empty((32, 32, 3), np.uint8)
        blank[:] = BACKGROUND
        images += [_scene_image(color, shape, position), _scene_image(other, shape, position), blank]
        seeds += [10 * g, 10 * g + 1, 10 * g + 2]
    stats = ex.write_preference_data(np.stack(images), prompts, seeds, 3, tmp_path,
                                     ex.Annotator(temperature=1e-4, tie_margin=0.05, seed=0), ranked=True)
    assert stats["pairs"] == 6 and stats["ties"] == 0 and stats["annotator_agreement"] == 1.0
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["conversion"]["counts"] == {"pairs": 6, "ties": 0}
    samples = list(PairDataset(str(tmp_path / "pairs")))
    assert len(samples) == 6
    ranked = list(RankedDataset(str(tmp_path / "ranked")))
    assert [list(map(float, s["scores"])) for s in ranked] == [[2.0, 1.0, 0.0]] * 2
    assert PALETTE["red"] in {tuple(px) for px in images[0].reshape(-1, 3)}


def test_side_by_side_grid_places_base_left_and_aligned_right():
    base = np.zeros((4, 32, 32, 3), np.uint8)
    aligned = np.full((4, 32, 32, 3), 200, np.uint8)
    grid = np.asarray(ex.side_by_side_grid(base, aligned, rows=2, cols=2, scale=1))
    assert grid.shape == (64, 64 + 8 + 64, 3)
    assert grid[:, :64].max() == 0 and grid[:, 72:].min() == 200


def test_captioned_grid_labels_the_sides_and_puts_each_prompt_and_score_under_its_image():
    base = np.full((4, 32, 32, 3), 120, np.uint8)
    aligned = np.full((4, 32, 32, 3), 200, np.uint8)
    prompts = ["a red circle on the left", "a blue square on the right", "a green triangle on the center", "x"]
    notes = [f"colour {i / 4:.2f}" for i in range(4)]
    plain = np.asarray(ex.side_by_side_grid(base, aligned, rows=2, cols=2, scale=2))
    arr = np.asarray(ex.side_by_side_grid(base, aligned, rows=2, cols=2, scale=2, captions=prompts,
                                          base_notes=notes, aligned_notes=notes))
    assert arr.shape[0] > plain.shape[0]  # caption bands and the base / aligned headers
    assert not (plain < 50).all(-1).any() and (arr < 50).all(-1).any()  # black text only where captions are
    other = np.asarray(ex.side_by_side_grid(base, aligned, rows=2, cols=2, scale=2, captions=prompts[::-1],
                                            base_notes=notes, aligned_notes=notes))
    assert other.shape == arr.shape and (other != arr).any()  # the text drawn is the captions'
    with pytest.raises(ValueError, match="needs 4 captions"):
        ex.side_by_side_grid(base, aligned, rows=2, cols=2, captions=prompts[:2])


def test_shortened_quickstart_writes_every_promised_file(tmp_path):
    from mmalign.cli import main

    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--prompts", "8", "--images-per-prompt", "3", "--eval-prompts", "8",
               "--sample-steps", "4", "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=2",
               "train.progress=false", "validation.images_per_prompt=1", "validation.num_inference_steps=2"])
    assert rc == 0
    for name in ("report.md", "report.json", "grid.png", "samples/prompts.jsonl", "train/config.yaml",
                 "train/metrics.jsonl", "train/lora/pytorch_lora_weights.safetensors", "data/pairs/manifest.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "samples" / "prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and {x["file"] for x in lines} == {f"{m}/{i:04d}.png" for m in ("base", "aligned")
                                                               for i in range(8)}
    assert all((out / "samples" / x["file"]).is_file() for x in lines)
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 3 and report["eval"]["n"] == 8
    assert 0.0 <= report["eval"]["win_rate"]["value"] <= 1.0
    # Same seeds for both models: the report's means are recomputable from the saved samples.
    from PIL import Image

    base = np.stack([np.asarray(Image.open(out / "samples" / "base" / f"{i:04d}.png")) for i in range(8)])
    prompts = [x["prompt"] for x in lines[:8]]
    assert report["eval"]["base"]["total"] == pytest.approx(ex.rewards(base, prompts)["total"].mean())


def test_saved_lora_with_conv_targets_reproduces_the_trained_unet(tmp_path):
    """The quickstart recipe adapts attention and resnet convs; the saved LoRA, loaded the way users load it,
    must give the trained policy's predictions exactly (a mixed-format save once dropped the attention LoRA)."""
    from mmalign.toy.recipe import training_config
    from mmalign.train.trainer import train

    pairs = [("a red circle on the left", 0), ("a blue square on the right", 1)]
    images = np.stack([sample_scene(s, caption=p).render() for p, s in pairs for _ in range(2)])
    images[1::2] = BACKGROUND  # the second image of each prompt is empty: a clear loser
    ex.write_preference_data(images, [p for p, _ in pairs], [0, 1, 2, 3], 2, tmp_path / "data",
                             ex.Annotator(temperature=1e-4))
    cfg = training_config(tmp_path, str(SHIPPED), 0, ["train.max_steps=2", "train.batch_size=2",
                                                      "train.progress=false", "validation.prompts=[]",
                                                      "optim.lr=1e-2"], tmp_path / "data" / "pairs")
    result = train(cfg)
    pipe = ToyT2IPipeline.from_pretrained(SHIPPED)
    pipe.load_lora_weights(result.outputs["lora"])
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    cond = pipe.encode_prompt([p for p, _ in pairs])
    result.module.eval()
    with torch.no_grad():
        trained = result.module(x, t, cond).sample
        loaded = pipe.unet(x, t, cond).sample
        base = ToyT2IPipeline.from_pretrained(SHIPPED).unet(x, t, cond).sample
    assert (trained - base).abs().max() > 1e-4  # training changed the model...
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)  # ...and the saved LoRA carries all of it


def test_bench_toy_runs_each_method_and_writes_table_and_plot(tmp_path):
    from mmalign.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "toy", "--out", str(out), "--methods", "sft,rankdpo", "--seeds", "2", "--prompts", "8",
               "--images-per-prompt", "3", "--eval-prompts", "4", "--sample-steps", "8", "train.max_steps=2",
               "train.batch_size=2", "train.progress=false", "validation.prompts=[]"])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("sft", 0), ("sft", 1), ("rankdpo", 0),
                                                                  ("rankdpo", 1)]
    gains = [r["reward_gain"] for r in report["runs"] if r["method"] == "sft"]
    assert report["summary"]["sft"]["reward_gain"][0] == pytest.approx(np.mean(gains))
    assert report["summary"]["sft"]["reward_gain"][1] == pytest.approx(np.std(gains, ddof=1))
    table = (out / "bench.md").read_text()
    assert "| sft |" in table and "| rankdpo |" in table
    assert (out / "bench.png").stat().st_size > 1000
    cfg = (out / "runs" / "rankdpo-seed1" / "train" / "config.yaml").read_text()
    assert "rankdpo" in cfg and "ranked" in cfg
    assert main(["bench", "toy", "--methods", "ppo"]) == 2
