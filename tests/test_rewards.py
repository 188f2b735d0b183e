"""Scorers: preprocessing and scale conventions against hand computations on tiny models; loading, export, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.rewards import load_scorer
from mmalign.rewards.base import ScorerError
from mmalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

PROMPTS = ["a red circle on the left", "a blue square on the right", "a red circle on the left",
           "a green triangle on the center"]


def rgb(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mmalign.rewards.tiny import build_tiny_aesthetic, build_tiny_clip, build_tiny_hps

    root = tmp_path_factory.mktemp("reward_models")
    clip_dir = build_tiny_clip(root / "clip", resize_to=40)
    hps_ckpt, hps_cfg, hps_tok = build_tiny_hps(root / "hps")
    mlp, aes_clip = build_tiny_aesthetic(root / "aes")
    return {"clip": str(clip_dir), "hps": (str(hps_ckpt), str(hps_cfg), str(hps_tok)), "aes": (str(mlp),
            str(aes_clip)), "root": root}


@pytest.fixture(scope="module")
def images():
    return [rgb(i, 36 + 9 * i, 48) for i in range(4)]


def normalized(arr01: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> normalised (3, H, W) with the OpenAI CLIP mean / std."""
    return ((arr01 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)).transpose(2, 0, 1)


# -- preprocessing ---------------------------------------------------------------------------------------------------
def test_center_crop_matches_transformers_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    ims = [rgb(0, 45, 70), rgb(1, 80, 41), rgb(2, 40, 40)]
    expected = proc(images=ims, return_tensors="pt")["pixel_values"]
    ours = ImagePreprocess("center_crop", size=32, resize_to=40).from_pil(ims)
    assert ours.shape == expected.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=0)


def test_letterbox_by_hand():
    im = rgb(3, 30, 60)  # h=30, w=60 -> scale 32/60 -> (16, 32): 8 black rows above and below
    out = ImagePreprocess("letterbox", size=32).from_pil([im])[0].numpy()
    # HPSv2 resizes the float image (ToTensor first): no uint8 step, no clamp
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None]
    resized = torch.nn.functional.interpolate(x, size=(16, 32), mode="bicubic", align_corners=False,
                                              antialias=True)[0].permute(1, 2, 0).double().numpy()
    black = normalized(np.zeros((1, 1, 3)))[:, 0, 0]
    np.testing.assert_allclose(out[:, 8:24, :], normalized(resized), atol=1e-5)
    np.testing.assert_allclose(out[:, :8, :], np.broadcast_to(black[:, None, None], (3, 8, 32)), atol=1e-6)
    np.testing.assert_allclose(out[:, 24:, :], np.broadcast_to(black[:, None, None], (3, 8, 32)), atol=1e-6)
    # odd padding: 31 -> the extra row goes after (HPSv2: pad // 2 before, the rest after)
    tall = ImagePreprocess("letterbox", size=32).from_pil([rgb(4, 64, 62)])[0].numpy()  # -> (32, 31)
    assert np.allclose(tall[:, :, 31], black[:, None]) and not np.allclose(tall[:, :, 0], black[:, None])


@pytest.mark.parametrize("mode", ["center_crop", "letterbox"])
def test_tensor_path_agrees_with_pil_path(mode):
    yy, xx = np.mgrid[0:50, 0:70]
    ims = [Image.fromarray(np.stack([(xx * 3 + s) % 256, (yy * 4) % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8))
           for s in (0, 90)]
    pre = ImagePreprocess(mode, size=32, resize_to=40 if mode == "center_crop" else None)
    x = torch.from_numpy(np.stack([np.asarray(i) for i in ims])).permute(0, 3, 1, 2).float() / 255
    diff = (pre.from_tensor(x) - pre.from_pil(ims)).abs()
    # PIL rounds to uint8 between its two resize passes: agree to a few uint8 steps (1/255/std ~ 0.015)
    assert diff.mean() < 0.01 and diff.max() < 0.1


# -- CLIP scorers: scale conventions vs transformers' own forward ---------------------------------------------------
def _reference_cosines(model, tokenizer, pixel_values, prompts):
    tok = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixel_values)
    logits = out.logits_per_image.diagonal()
    return logits / model.logit_scale.exp(), logits


def test_pickscore_and_clip_score_match_hand_computation(models, images):
    from mmalign.rewards import clip_score, pickscore

    ps, cs = pickscore(models["clip"]), clip_score(models["clip"])
    with torch.no_grad():
        p_scores, c_scores = ps.score(images, PROMPTS), cs.score(images, PROMPTS)
    pixels = ImagePreprocess("center_crop", size=32, resize_to=40).from_pil(images)
    cos, logits = _reference_cosines(ps.model, ps.tokenizer, pixels, PROMPTS)
    torch.testing.assert_close(p_scores, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5)
    # negative cosines are clamped at 0 for clip_score: flip the text embedding to get them
    with torch.no_grad():
        cs.model.text_projection.weight.neg_()
        flipped = cs.score(images, PROMPTS)
    assert (cos > 0).any() and torch.all(flipped[cos > 0] == 0)
    torch.testing.assert_close(flipped[cos < 0], -100 * cos[cos < 0], atol=1e-4, rtol=1e-5)


def test_hps_loads_open_clip_checkpoint_and_reports_raw_cosine(models, images):
    from mmalign.rewards import hps
    from mmalign.rewards.hpsv2 import load_state_dict_file
    from mmalign.rewards.tiny import build_tiny_clip_model

    ckpt, cfg, tok = models["hps"]
    sd = load_state_dict_file(ckpt)
    # the open_clip layout (as in HPS_v2.1_compressed.pt): fused qkv, (width, embed) projections, causal mask buffer
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert sd["text_projection"].shape == (32, 16) and sd["visual.proj"].shape == (32, 16)
    assert {"visual.conv1.weight", "visual.ln_pre.weight", "ln_final.weight", "attn_mask"} <= set(sd)
    scorer = hps(ckpt, model_config=cfg, tokenizer=tok)
    with torch.no_grad():
        got = scorer.score(images, PROMPTS)
    original, tokenizer, _ = build_tiny_clip_model(seed=0)  # the model the checkpoint was exported from
    pixels = ImagePreprocess("letterbox", size=32).from_pil(images)
    cos, _ = _reference_cosines(original, tokenizer, pixels, PROMPTS)
    torch.testing.assert_close(got, cos, atol=1e-5, rtol=1e-5)
    assert scorer.version.startswith("hps-")


def test_hps_refuses_pickled_objects(tmp_path):
    import argparse

    from mmalign.rewards.hpsv2 import load_state_dict_file

    # any object outside torch's weights_only allow-list stands for an arbitrary pickled payload
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": argparse.Namespace(x=1)}, tmp_path / "bad.pt")
    with pytest.raises(ScorerError, match="weights_only"):
        load_state_dict_file(tmp_path / "bad.pt")


def test_text_encoded_once_per_distinct_prompt(models, images):
    scorer = load_scorer(f"pickscore={models['clip']}")
    calls = []
    original = scorer.encode_text

    def counting(prompts):
        calls.append(list(prompts))
        return original(prompts)

    scorer.encode_text = counting
    with torch.no_grad():
        batched = scorer.score(images, PROMPTS)
        singles = torch.cat([scorer.score([im], [p]) for im, p in zip(images, PROMPTS)])
    assert calls[0] == [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


def test_a_scorer_built_around_a_moved_model_is_where_its_model_is(models):
    """The GPU benchmark found it: a CLIPScorer built around a model already on cuda tokenised prompts onto the
    CPU (its device came from a buffer only `.to()` moves). Its device is its parameters' now (meta here)."""
    from mmalign.rewards.clip import CLIPScorer

    scorer = load_scorer(f"pickscore={models['clip']}")
    moved = CLIPScorer(scorer.model.to("meta"), scorer.tokenizer, scorer.preprocess, "cosine", name="moved")
    assert moved.device.type == "meta" and moved.tokenize(["a red circle"])["input_ids"].device.type == "meta"


def test_differentiable_path_and_dtype(models, images):
    scorer = load_scorer(f"pickscore={models['clip']}")
    arr = np.stack([np.asarray(im.resize((48, 40))) for im in images])
    x = (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    scores = scorer.score(x, PROMPTS)
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        from_uint8 = scorer.score(arr, PROMPTS)
        as64 = load_scorer(f"pickscore={models['clip']}", dtype=torch.float64).score(arr, PROMPTS)
    assert from_uint8.dtype == torch.float32 and as64.dtype == torch.float32
    torch.testing.assert_close(scores.detach(), from_uint8, atol=0.05, rtol=0.02)
    torch.testing.assert_close(as64, from_uint8, atol=1e-4, rtol=1e-4)


def test_aesthetic_loads_released_layout(models, images):
    from mmalign.rewards.laion_aesthetic import aesthetic

    mlp_file, clip_dir = models["aes"]
    scorer = aesthetic(mlp=mlp_file, clip=clip_dir)
    with torch.no_grad():
        got = scorer.score(images, "ignored")
        emb = scorer.vision(pixel_values=ImagePreprocess("center_crop", size=32).from_pil(images)).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        sd = torch.load(mlp_file, weights_only=True)
        h = emb
        for i in (0, 2, 4, 6, 7):
            h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(got, h.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_toy_scorers_equal_ground_truth():
    from mmalign.toy import color_adherence, sample_scenes, total_reward
    from mmalign.toy.rewards import color_adherence_torch

    scenes = sample_scenes(6, 0)
    arr = np.stack([s.render() for s in scenes])
    caps = [s.caption for s in scenes][::-1]  # mismatched captions for some: not all rewards are 1
    toy = load_scorer("toy").score(arr, caps)
    assert load_scorer("toy").dims == ("color", "shape", "position", "total") and toy.shape == (6, 4)
    np.testing.assert_allclose(toy[:, 0].numpy(), color_adherence(arr, caps), atol=1e-6)
    np.testing.assert_allclose(toy[:, 3].numpy(), total_reward(arr, caps), atol=1e-6)
    np.testing.assert_allclose(load_scorer("toy_total").score(arr, caps).numpy(), total_reward(arr, caps), atol=1e-6)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(load_scorer("toy_color_soft").score(x, caps), color_adherence_torch(x, caps))


def test_user_function_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\n"
        "def brightness(images, prompts):\n"
        "    return [float(np.asarray(im).mean()) / 255 for im in images]\n"
        "def two(images, prompts):\n"
        "    return [[len(p), 1.0] for p in prompts]\n"
        "two.dims = ('length', 'one')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ims = [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 255)]
    torch.testing.assert_close(load_scorer("my_rewards:brightness").score(ims, "x"), torch.tensor([0.0, 1.0]))
    two = load_scorer("my_rewards:two")
    assert two.dims == ("length", "one")
    torch.testing.assert_close(two.score(ims, ["ab", "abc"]), torch.tensor([[2.0, 1.0], [3.0, 1.0]]))
    with pytest.raises(ScorerError, match="has no attribute"):
        load_scorer("my_rewards:missing")
    sys.modules.pop("my_rewards", None)


def test_bad_inputs_have_clear_errors(models, images):
    scorer = load_scorer(f"pickscore={models['clip']}")
    with pytest.raises(ScorerError, match=r"\[0, 1\]"):
        scorer.score(torch.full((1, 3, 8, 8), 200.0), "x")
    with pytest.raises(ScorerError, match="2 images but 3 prompts"):
        scorer.score(images[:2], ["a", "b", "c"])
    with pytest.raises(ScorerError, match="unknown scorer"):
        load_scorer("nonsense")


def test_exports_load_back_through_load_scorer(models, images, tmp_path):
    from mmalign.rewards import hps, pickscore, save_hps_folder
    from mmalign.rewards.laion_aesthetic import aesthetic

    ckpt, cfg, tok = models["hps"]
    import json

    built = [pickscore(models["clip"]), hps(ckpt, model_config=cfg, tokenizer=tok),
             aesthetic(mlp=models["aes"][0], clip=models["aes"][1])]
    for scorer in built:
        folder = tmp_path / scorer.name
        if scorer.name == "hps":
            save_hps_folder(scorer, json.loads(open(cfg).read()), folder)
        else:
            scorer.save_pretrained(folder)
        loaded = load_scorer(str(folder))
        with torch.no_grad():
            torch.testing.assert_close(loaded.score(images, PROMPTS), scorer.score(images, PROMPTS),
                                       atol=1e-5, rtol=1e-5)
        assert loaded.name == scorer.name
