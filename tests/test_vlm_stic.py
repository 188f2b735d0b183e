"""STIC: corruptions are real and recorded, pairs round-trip through shards, skips are counted, stage 2 rows."""

import json

import numpy as np
import pytest
from PIL import Image

from mmalign.selfgen.corrupt import (Corruption, CorruptionNoOpError, corrupt_image, pixels_changed)
from mmalign.vlm.stic import STICConfig, infuse_description, stic_pairs, stic_stage2, toy_image_items, write_pairs


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from mmalign.vlm.adapter import load_vlm
    from mmalign.vlm.tiny import build_tiny_vlm

    return load_vlm(str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava", "llava")))


def _toy_image(seed=0):
    return toy_image_items(1, seed)[0][1]


@pytest.mark.parametrize("spec", ["resize", "jitter", "jitter:brightness=0,hue=0.3", "jitter:brightness=0.5,hue=0",
                                  "jitter:brightness=0,hue=0.5,hue_min=0.2"])
def test_each_corruption_changes_pixels_and_is_recorded(spec):
    corruption = Corruption.parse(spec)
    image = _toy_image()
    for seed in range(5):
        out, record = corrupt_image(image, corruption, np.random.default_rng(seed))
        assert pixels_changed(image, out)
        assert record["name"] == corruption.name
        if corruption.name == "resize":
            assert min(out.size) == 20 and record["size"] == list(out.size)
        else:
            p = corruption.resolved()
            assert abs(record["hue"]) <= p["hue"] and (record["hue"] == 0 or abs(record["hue"]) >= p["hue_min"])
            assert 1 - p["brightness"] <= record["brightness"] <= 1 + p["brightness"]
    # The record reproduces the pixels: re-applying the drawn hue shift gives the same image.
    if spec.endswith("hue_min=0.2"):
        from mmalign.selfgen.corrupt import _shift_hue

        out, record = corrupt_image(image, corruption, np.random.default_rng(0))
        assert np.array_equal(np.asarray(out), np.asarray(_shift_hue(image, record["hue"])))
        # The shape's colour really changed (the background is grey and keeps its value).
        mask = np.asarray(image).astype(int).std(-1) > 5
        assert (np.abs(np.asarray(out).astype(int) - np.asarray(image).astype(int))[mask].sum(-1) > 30).all()


def test_a_corruption_that_changes_nothing_is_an_error_not_a_silent_skip():
    grey = Image.new("RGB", (32, 32), (24, 24, 24))
    with pytest.raises(CorruptionNoOpError, match="left every pixel unchanged"):
        corrupt_image(grey, Corruption.parse("jitter:brightness=0,hue=0.3"), np.random.default_rng(0))
    flat = Image.new("RGB", (32, 32), (200, 10, 10))
    with pytest.raises(CorruptionNoOpError):
        corrupt_image(flat, Corruption("resize"), np.random.default_rng(0))


def test_corruption_specs_are_validated():
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        Corruption.parse("blur")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['size'\]"):
        Corruption.parse("resize:size=3")
    with pytest.raises(ValueError, match="not key=number"):
        Corruption.parse("jitter:hue")
    with pytest.raises(ValueError, match="hue_min <= hue"):
        Corruption.parse("jitter:hue=0.1,hue_min=0.2")


class _Recorder:
    """Wraps an adapter; records the prompts and images each generate call received."""

    def __init__(self, adapter, answer=None):
        self.adapter, self.calls, self.answer = adapter, [], answer
        self.pretrained = adapter.pretrained

    def generate(self, prompts, images, **kw):
        self.calls.append((list(prompts), [list(i) for i in images]))
        if self.answer is not None:
            return [self.answer] * len(prompts)
        return [f"answer {i} {p[:10]}" for i, p in enumerate(prompts)]


def test_stic_pairs_use_corrupted_images_and_hallucination_prompts_for_real(tmp_path, tiny_llava):
    from mmalign.data import VLMPairDataset

    items = toy_image_items(8, seed=3)
    rec = _Recorder(tiny_llava)
    cfg = STICConfig(batch_size=4, seed=1)
    write_pairs(str(tmp_path / "stic"), stic_pairs(rec, items, cfg), {"from": "test"})
    samples = list(VLMPairDataset(str(tmp_path / "stic"), strict=True))
    assert len(samples) == 8 and cfg.counts["image_corruption"] + cfg.counts["hallucination_prompt"] == 8
    assert cfg.counts["image_corruption"] and cfg.counts["hallucination_prompt"]
    # Rejected rows of each generate call are the second half; their image is corrupted iff the record says so.
    rejected = [(p, ims[0]) for prompts, images in rec.calls
                for p, ims in zip(prompts[len(prompts) // 2:], images[len(images) // 2:])]
    clean = dict(items)
    for s, (prompt, image) in zip(samples, rejected):
        prov = s["provenance"]
        assert np.array_equal(np.asarray(s["images"][0]), np.asarray(clean[s["__key__"]]))
        if prov["corruption"] == "image_corruption":
            assert pixels_changed(s["images"][0], image)
            assert prov["corruption_params"]["name"] in ("resize", "jitter")
            assert prompt in cfg.corrupted_prompts
        else:
            assert prov["corruption"] == "hallucination_prompt" and prov["corruption_params"] == {}
            assert not pixels_changed(s["images"][0], image)
            assert prompt in cfg.hallucination_prompts
        assert prov["prompts"]["chosen"] in cfg.describe_prompts
        assert s["prompt"][0]["content"] in cfg.pair_prompts
        assert s["chosen"] != s["rejected"] and prov["origin"] == "self"


def test_stic_with_the_real_tiny_model_round_trips_and_is_deterministic(tmp_path, tiny_llava):
    from mmalign.data import VLMPairDataset

    items = toy_image_items(4, seed=5)
    runs = []
    for name in ("a", "b"):
        cfg = STICConfig(batch_size=4, seed=2, max_new_tokens=6, hallucination_prob=0.0)
        write_pairs(str(tmp_path / name), stic_pairs(tiny_llava, items, cfg), {"from": "test"})
        runs.append([(s["chosen"], s["rejected"], s["provenance"]["corruption_params"])
                     for s in VLMPairDataset(str(tmp_path / name), strict=True)])
        assert len(runs[-1]) + cfg.counts["skipped_identical_answers"] + cfg.counts["skipped_empty_answer"] == 4
    assert runs[0] == runs[1]


def test_identical_answers_are_skipped_and_counted_or_raise_when_strict(tiny_llava):
    items = toy_image_items(3, seed=0)
    cfg = STICConfig(batch_size=2)
    assert list(stic_pairs(_Recorder(tiny_llava, answer="same"), items, cfg)) == []
    assert cfg.counts["skipped_identical_answers"] == 3
    with pytest.raises(ValueError, match="image 000000000-toy: identical answers"):
        list(stic_pairs(_Recorder(tiny_llava, answer="same"), items, STICConfig(strict=True)))


def test_stage2_prepends_the_model_description(tmp_path, tiny_llava):
    assert infuse_description("<image>\nWhat colour?", " a red circle ") == \
        "<image>\nImage description: a red circle\nWhat colour?"
    assert infuse_description("What?", "x") == "Image description: x\nWhat?"
    (tmp_path / "img").mkdir()
    _toy_image().save(tmp_path / "img" / "a.png")
    rows = [{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                         {"from": "gpt", "value": "Red."}]},
            {"id": 2, "image": "../outside.png", "conversations": [{"from": "human", "value": "x"}]},
            {"id": 3, "image": "missing.png", "conversations": [{"from": "human", "value": "x"}]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    counts = stic_stage2(_Recorder(tiny_llava, answer="a red circle"), str(tmp_path / "in.jsonl"),
                         str(tmp_path / "img"), str(tmp_path / "out.jsonl"), STICConfig(), progress=False)
    assert counts == {"written": 1, "skipped": 2}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["conversations"][0]["value"] == "<image>\nImage description: a red circle\nWhat colour?"
    assert out[0]["conversations"][1] == rows[0]["conversations"][1]


def test_cli_writes_shards_from_an_image_folder(tmp_path, tiny_llava):
    from mmalign.cli import main
    from mmalign.data import VLMPairDataset

    (tmp_path / "imgs").mkdir()
    for i, (_, im) in enumerate(toy_image_items(3, seed=9)):
        im.save(tmp_path / "imgs" / f"scene{i}.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "plain.txt").write_text("# plain prompts\ndescribe the image\n")
    rc = main(["selfgen", "stic", "--model", tiny_llava.pretrained, "--images", str(tmp_path / "imgs"),
               "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--pair-prompts", str(tmp_path / "plain.txt"),
               "--corruption", "jitter:brightness=0,hue=0.4,hue_min=0.2", "--hallucination-prob", "0"])
    assert rc == 0
    samples = list(VLMPairDataset(str(tmp_path / "out"), strict=True))
    assert all(s["prompt"][0]["content"] == "describe the image" for s in samples)
    assert all(s["provenance"]["corruption_params"]["name"] == "jitter" for s in samples)
    rc = main(["selfgen", "stic", "--model", tiny_llava.pretrained, "--images", str(tmp_path / "imgs"),
               "--out", str(tmp_path / "out2"), "--corruption", "blur"])
    assert rc == 2
