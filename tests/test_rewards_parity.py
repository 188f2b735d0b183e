"""Parity of the reward scorers with the libraries users hold them against (issue 15, "Hardening"):
HPSv2's own preprocessing, torchmetrics' CLIPScore aggregate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess


# -- HPS preprocessing vs HPSv2's `preprocess_val` --------------------------------------------------------------------
def hpsv2_preprocess_val(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform, op by op (hpsv2/src/open_clip/transform.py, `image_transform(...,
    resize_longest_max=True)`): RGB, `ToTensor()` (uint8 -> float32 / 255), `ResizeMaxSize(size)` (torchvision
    `F.resize(tensor, (round(h*s), round(w*s)), BICUBIC)`: on a float tensor that is `interpolate(bicubic,
    align_corners=False, antialias=True)` (torchvision >= 0.17) and no clamp; then `F.pad` with 0, `pad // 2`
    before), `Normalize(OPENAI mean, std)`. Written here independently of mmalign's code."""
    x = torch.from_numpy(np.array(image.convert("RGB"), copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = tuple(round(d * scale) for d in (h, w))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = size - nh, size - nw
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def sharp_images() -> list[Image.Image]:
    """Hard edges and noise (bicubic overshoots below 0 and above 1 on them), down- and upscaled, odd padding."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((300, 200), (97, 251), (20, 30), (224, 224)):
        yy, xx = np.mgrid[0:h, 0:w]
        checker = (((yy // 3) + (xx // 3)) % 2 * 255).astype(np.uint8)
        noise = rng.integers(0, 256, (h, w), dtype=np.uint8)
        out.append(Image.fromarray(np.stack([checker, noise, 255 - checker], -1)))
    return out


@pytest.mark.parametrize("path", ["pil", "tensor"])
def test_hps_letterbox_equals_hpsv2_preprocess_val(path):
    pre = ImagePreprocess("letterbox", size=224)
    for im in sharp_images():
        expected = hpsv2_preprocess_val(im)
        if path == "pil":
            got = pre.from_pil([im])[0]
        else:
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None]
            got = pre.from_tensor(x)[0]
        assert got.shape == expected.shape == (3, 224, 224)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # the images are sharp enough for the difference to matter: HPSv2's values leave [0, 1] after the resize
    unnorm = hpsv2_preprocess_val(sharp_images()[0]) * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + \
        torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    assert unnorm.min() < -0.01 and unnorm.max() > 1.01


# -- CLIP score: per-image mean vs torchmetrics' set-level aggregate -----------------------------------------------
def test_clip_score_aggregates_by_hand():
    from mmalign.rewards.metrics import clip_score_aggregates

    # per image 100*max(cos, 0): 30, 0, 10, 0 -> mean 10; torchmetrics: max(100 * 0.15 / 4, 0) = 3.75
    agg = clip_score_aggregates([0.3, -0.2, 0.1, -0.05])
    assert agg == pytest.approx({"mean": 10.0, "torchmetrics": 3.75}, abs=1e-12)
    assert clip_score_aggregates([-0.3, -0.1]) == {"mean": 0.0, "torchmetrics": 0.0}
    assert clip_score_aggregates([0.25, 0.35]) == pytest.approx({"mean": 30.0, "torchmetrics": 30.0}, abs=1e-12)


def test_clip_score_summaries_in_score_and_eval(tmp_path, capsys):
    """`mmalign score` and `mmalign eval reward` report both `clip_score/mean` and `clip_score/torchmetrics`, equal
    to the hand computation from transformers' own CLIP forward, on a set where some cosines are negative."""
    import io
    import json
    import re

    from mmalign.cli import main
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.rewards.tiny import build_tiny_clip
    from transformers import AutoTokenizer, CLIPModel

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    model_dir = build_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(1)
    words = ["a red circle on the left", "a blue square on the right", "a green triangle on the center"]
    pairs = [(f"p{i:02d}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), words[i % 3]) for i in range(6)]
    root = tmp_path / "pairs"
    with ShardSetWriter(root, "pair", max_count=4) as writer:
        for key, a, b, caption in pairs:
            writer.write(pair_sample(key, png(a), png(b), caption=caption, label_0=1.0))

    # by hand: cosines from CLIPModel's own forward (logits_per_image / logit_scale), then the two aggregates
    model, tok = CLIPModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    pre = ImagePreprocess("center_crop", size=32)
    cos = []
    with torch.no_grad():
        for _, a, b, caption in pairs:
            t = tok([caption] * 2, padding=True, return_tensors="pt")
            out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                        pixel_values=pre.from_pil([Image.fromarray(a), Image.fromarray(b)]))
            cos += (out.logits_per_image.diagonal() / model.logit_scale.exp()).tolist()
    cos = np.array(cos)
    assert (cos < 0).any() and (cos > 0).any()
    per_image_mean = float(np.mean(100 * np.maximum(cos, 0)))
    torchmetrics = max(100 * float(cos.mean()), 0.0)
    assert abs(per_image_mean - torchmetrics) > 0.1  # the two aggregates differ on this set

    out = tmp_path / "scores"
    assert main(["score", "--scorers", f"clip_score={model_dir}", "--in", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name, expected in (("mean", per_image_mean), ("torchmetrics", torchmetrics)):
        found = re.search(rf"clip_score/{name} (-?[0-9.]+)", printed)
        assert found and float(found.group(1)) == pytest.approx(expected, abs=2e-4), printed
    report = tmp_path / "report.json"
    assert main(["eval", "reward", "--scorers", f"clip_score={model_dir}", "--in", str(root), "--scores", str(out),
                 "--out", str(report), "--no-progress"]) == 0
    summary = json.loads(report.read_text())["scorers"]["clip_score"]["summary"]
    assert summary["clip_score/items"] == 12
    assert summary["clip_score/mean"] == pytest.approx(per_image_mean, abs=1e-4)
    assert summary["clip_score/torchmetrics"] == pytest.approx(torchmetrics, abs=1e-4)
    assert "clip_score/torchmetrics" in capsys.readouterr().out
