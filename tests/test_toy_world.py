"""Toy world contract: scenes, ground-truth rewards, differentiable colour reward, simulated annotator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.toy import annotator, rewards, scenes
from mmalign.toy.scenes import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    POSITION_BANDS,
    POSITIONS,
    SHAPES,
    Scene,
)

RED, GREEN, BLUE, YELLOW = (np.array(PALETTE[c], dtype=np.uint8) for c in COLORS)


def blank(n: int | None = None) -> np.ndarray:
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3) if n is None else (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    image = np.empty(shape, dtype=np.uint8)
    image[:] = BACKGROUND
    return image


def grid_scenes() -> list[Scene]:
    """Every allowed (shape, position, size, cx, cy); colours cycle so all four appear."""
    out = []
    for shape in SHAPES:
        for position in POSITIONS:
            for size in range(scenes.SIZE_RANGE[0], scenes.SIZE_RANGE[1] + 1):
                for cx in scenes.allowed_cx(position, size):
                    for cy in range(scenes.CY_RANGE[0], scenes.CY_RANGE[1] + 1):
                        color = COLORS[len(out) % len(COLORS)]
                        out.append(Scene(color, shape, position, size, cx, cy))
    return out


@pytest.fixture(scope="module")
def grid() -> tuple[list[Scene], np.ndarray]:
    all_scenes = grid_scenes()
    return all_scenes, np.stack([s.render() for s in all_scenes])


@pytest.fixture(scope="module")
def sampled() -> tuple[list[Scene], np.ndarray]:
    sample = scenes.sample_scenes(400, seed=0)
    return sample, np.stack([s.render() for s in sample])


# ---------------------------------------------------------------- scenes


def test_sampling_is_deterministic_by_seed():
    a = np.stack([s.render() for s in scenes.sample_scenes(64, seed=3)])
    b = np.stack([s.render() for s in scenes.sample_scenes(64, seed=3)])
    c = np.stack([s.render() for s in scenes.sample_scenes(64, seed=4)])
    assert np.array_equal(a, b)
    assert (a != c).any(axis=(1, 2, 3)).sum() >= 60  # almost every scene differs
    assert scenes.sample_scene(11) == scenes.sample_scene(np.random.default_rng(11))
    with pytest.raises(TypeError, match="Generator or an integer seed"):
        scenes.sample_scene(1.5)


def test_sampled_scenes_cover_the_grammar(sampled):
    sample, _ = sampled
    assert {s.color for s in sample} == set(COLORS)
    assert {s.shape for s in sample} == set(SHAPES)
    assert {s.position for s in sample} == set(POSITIONS)
    assert {s.size for s in sample} == set(range(8, 15))
    assert {s.cy for s in sample} == set(range(9, 23))


def test_palette_contract_on_sampled_scenes(sampled):
    sample, images = sampled
    for scene, image in zip(sample, images):
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        colours = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
        assert colours == {BACKGROUND, PALETTE[scene.color]}
        fg = (image != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
        assert np.array_equal(fg, scene.mask())
        ys, xs = np.nonzero(fg)
        # Size bound: the bounding box is exactly size x size, size in 8..14.
        assert xs.max() - xs.min() + 1 == scene.size == ys.max() - ys.min() + 1
        assert 8 <= scene.size <= 14
        lo, hi = POSITION_BANDS[scene.position]
        assert lo <= scene.cx <= hi and 9 <= scene.cy <= 22
        assert (xs.min(), ys.min()) == scene.box
        assert scene.caption == f"a {scene.color} {scene.shape} on the {scene.position}"


def test_every_allowed_shape_stays_in_frame(grid):
    all_scenes, images = grid
    assert len(all_scenes) == 3 * (18 * 7 - 3) * 14  # exhaustive grid: 5166 scenes
    for scene, image in zip(all_scenes, images):
        local = scenes.shape_mask(scene.shape, scene.size)
        vs, us = np.nonzero(local)
        xs, ys = us + scene.box[0], vs + scene.box[1]  # unclipped pixel coordinates
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= 31 and ys.max() <= 31
        fg = (image != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
        assert fg.sum() == local.sum()  # nothing was clipped away
        # The box is centred on cx (odd size) or half a pixel left of it (even size).
        assert (xs.min() + xs.max()) / 2 == scene.cx - 0.5 * (1 - scene.size % 2)


def test_only_out_of_frame_combinations_are_refused():
    refused = set()
    for position, (lo, hi) in POSITION_BANDS.items():
        for size in range(8, 15):
            for cx in range(lo, hi + 1):
                try:
                    Scene("red", "square", position, size, cx, 15)
                except ValueError as err:
                    assert "valid columns" in str(err)
                    refused.add((size, cx))
    assert refused == {(14, 6), (14, 26), (13, 26)}
    for bad, match in [
        (dict(color="purple"), "valid colours"),
        (dict(shape="star"), "valid shapes"),
        (dict(size=15), "valid sizes"),
        (dict(cy=23), "valid rows"),
        (dict(cx=12), "valid columns"),
    ]:
        kwargs = dict(color="red", shape="circle", position="left", size=10, cx=8, cy=15) | bad
        with pytest.raises(ValueError, match=match):
            Scene(**kwargs)


def test_shapes_are_distinct_and_hard_edged():
    for size in range(8, 15):
        masks = {s: scenes.shape_mask(s, size) for s in SHAPES}
        for m in masks.values():  # every row and column of the box is touched: the shape is size px across
            assert m.any(0).all() and m.any(1).all()
        assert masks["square"].all()
        fill = {s: m.mean() for s, m in masks.items()}
        assert 0.75 < fill["circle"] < 0.86 and 0.5 <= fill["triangle"] < 0.54
        tri = masks["triangle"]
        widths = tri.sum(1)
        assert widths[0] <= 2 and widths[-1] == size and np.all(np.diff(widths) >= 0)  # apex up, flat base
        assert np.array_equal(tri, tri[:, ::-1]) and np.array_equal(masks["circle"], masks["circle"].T)


def test_captions_parse_and_reject():
    prompts = scenes.all_prompts()
    assert len(prompts) == len(set(prompts)) == 36
    assert prompts[0] == "a red circle on the left" and prompts[-1] == "a yellow triangle on the right"
    assert {scenes.parse_caption(p) for p in prompts} == {
        (c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS
    }
    assert scenes.parse_caption("  a blue square  on the center ") == ("blue", "square", "center")
    for bad in ["a purple circle on the left", "a red circle", "A red circle on the left", "a red circle at the left"]:
        with pytest.raises(ValueError, match="outside the toy grammar"):
            scenes.parse_caption(bad)
    scene = scenes.sample_scene(5, caption="a green triangle on the right")
    assert (scene.color, scene.shape, scene.position) == ("green", "triangle", "right")


def test_noisy_caption_statistics():
    scene = Scene("blue", "triangle", "center", 10, 15, 15)
    rng = np.random.default_rng(0)
    n = 20000
    parsed = [scenes.parse_caption(scenes.noisy_caption(scene, rng)) for _ in range(n)]
    assert {(s, p) for _, s, p in parsed} == {("triangle", "center")}
    counts = {c: sum(col == c for col, _, _ in parsed) / n for c in COLORS}
    for colour, expected in [("blue", 0.6), ("red", 0.4 / 3), ("green", 0.4 / 3), ("yellow", 0.4 / 3)]:
        se = math.sqrt(expected * (1 - expected) / n)
        assert abs(counts[colour] - expected) < 3 * se, (colour, counts[colour])
    a = [scenes.noisy_caption(scene, np.random.default_rng(9)) for _ in range(3)]
    assert len(set(a)) == 1
    assert scenes.noisy_caption(scene, 1, p_true=1.0) == scene.caption
    assert all(scenes.noisy_caption(scene, s, p_true=0.0) != scene.caption for s in range(50))


def test_prompt_seed_pairs_split():
    train = scenes.prompt_seed_pairs("train", 100)
    heldout = scenes.prompt_seed_pairs("heldout", 100)
    assert train == scenes.prompt_seed_pairs("train", 100)
    assert not {s for _, s in train} & {s for _, s in heldout}
    assert [p for p, _ in train[:36]] == scenes.all_prompts() == [p for p, _ in heldout[:36]]
    counts = np.unique([p for p, _ in train], return_counts=True)[1]
    assert counts.min() == 2 and counts.max() == 3
    with pytest.raises(ValueError, match="'train', 'heldout' or 'val'"):
        scenes.prompt_seed_pairs("test", 3)


def test_save_scene_grid(tmp_path):
    images = np.stack([s.render() for s in scenes.sample_scenes(10, seed=1)])
    path = tmp_path / "grid.png"
    scenes.save_scene_grid(images, str(path), ncol=4, scale=3, pad=1)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (3 * (3 * 33 + 1), 3 * (4 * 33 + 1), 3)
    # Second image of the first row, nearest-neighbour upscaled.
    assert np.array_equal(sheet[3:99:3, 3 * 34 : 3 * 34 + 96 : 3], images[1])


# ---------------------------------------------------------------- rewards


def test_color_adherence_hand_built():
    image = blank()
    image[4:12, 4:12] = RED  # 64 red
    image[20:28, 4:12] = BLUE  # 64 blue
    assert rewards.color_adherence(image, "a red square on the left") == 0.5
    assert rewards.color_adherence(image, "a blue square on the left") == 0.5
    assert rewards.color_adherence(image, "a green square on the left") == 0.0
    image[0, 0] = (84, 24, 24)  # distance exactly 60 to the background: not foreground
    image[0, 1] = (60, 60, 60)  # distance 62.4: foreground, nearest palette colour green
    assert rewards.color_adherence(image, "a red circle on the left") == 64 / 129
    assert rewards.color_adherence(image, "a green circle on the left") == 1 / 129
    noisy = blank()
    noisy[10:20, 10:20] = np.clip(RED.astype(int) + np.random.default_rng(0).integers(-25, 26, (10, 10, 3)), 0, 255)
    assert rewards.color_adherence(noisy, "a red square on the center") == 1.0
    assert rewards.color_adherence(blank(), "a red square on the center") == 0.0
    batch = np.stack([image, blank()])
    assert np.array_equal(
        rewards.color_adherence(batch, ["a red circle on the left"] * 2), np.array([64 / 129, 0.0])
    )


def test_rewards_validate_inputs():
    with pytest.raises(TypeError, match="to_uint8_images"):
        rewards.color_adherence(blank().astype(np.float32), "a red circle on the left")
    with pytest.raises(ValueError, match="32, 32, 3"):
        rewards.color_adherence(np.zeros((16, 16, 3), np.uint8), "a red circle on the left")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        rewards.shape_adherence(blank(2), ["a red circle on the left"])
    with pytest.raises(ValueError, match="outside the toy grammar"):
        rewards.position_adherence(blank(), "a red blob on the left")


def test_rendered_scenes_score_one_on_own_caption_and_lower_otherwise(sampled):
    sample, images = sampled
    captions = [s.caption for s in sample]
    parts = rewards.reward_components(images, captions)
    for name in ("color", "shape", "position"):
        assert np.array_equal(parts[name], np.ones(len(sample))), name
    assert np.array_equal(rewards.total_reward(images, captions), np.ones(len(sample)))

    def recaption(attr: str, values: tuple[str, ...]) -> list[str]:
        out = []
        for s in sample:
            fields = dict(color=s.color, shape=s.shape, position=s.position)
            fields[attr] = values[(values.index(fields[attr]) + 1) % len(values)]
            out.append(scenes.CAPTION_TEMPLATE.format(**fields))
        return out

    wrong_color = recaption("color", COLORS)
    assert np.array_equal(rewards.color_adherence(images, wrong_color), np.zeros(len(sample)))
    assert np.array_equal(rewards.total_reward(images, wrong_color), np.full(len(sample), 0.5))
    assert np.array_equal(rewards.shape_adherence(images, recaption("shape", SHAPES)), np.zeros(len(sample)))
    wrong_pos = rewards.position_adherence(images, recaption("position", POSITIONS))
    assert wrong_pos.max() <= 0.5 and wrong_pos.mean() < 0.05
    weighted = rewards.total_reward(images, wrong_color, w_color=1.0, w_shape=2.0, w_position=0.0)
    assert np.array_equal(weighted, np.full(len(sample), 2.0))


def test_shape_classifier_is_exact_on_the_full_grid(grid):
    all_scenes, images = grid
    predicted = rewards.classify_shape(images)
    accuracy = np.mean([p == s.shape for p, s in zip(predicted, all_scenes)])
    assert accuracy == 1.0
    scores = rewards.shape_scores(images)
    truth = np.array([SHAPES.index(s.shape) for s in all_scenes])
    own = scores[np.arange(len(truth)), truth]
    other = np.where(np.arange(3) == truth[:, None], -1.0, scores).max(1)
    assert own[truth != SHAPES.index("triangle")].min() == 1.0  # circle and square match their template exactly
    assert own.min() >= 0.94 and other.max() <= 0.86  # the margins stated in the shape_scores docstring


def test_shape_classifier_tolerates_stray_pixels_and_noise(sampled):
    sample, images = sampled
    rng = np.random.default_rng(0)
    dirty = images.astype(np.int16) + rng.normal(0, 8, images.shape).round().astype(np.int16)
    dirty = np.clip(dirty, 0, 255).astype(np.uint8)
    dirty[:, [0, 0, 31], [0, 31, 0]] = PALETTE["yellow"]  # stray pixels: rows 0 and 31 are never next to a shape
    captions = [s.caption for s in sample]
    assert rewards.shape_adherence(dirty, captions).mean() == 1.0
    assert rewards.classify_shape(blank()) is None
    assert rewards.shape_adherence(blank(), "a red circle on the left") == 0.0


def test_shape_classifier_on_blurred_scenes(sampled):
    """Soft edges (3x3 box blur) grow every shape by a pixel; shapes 10 px and larger are still recognised."""
    sample, images = sampled
    padded = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, dy : dy + 32, dx : dx + 32] for dy in range(3) for dx in range(3)) / 9
    blurred = np.rint(blurred).astype(np.uint8)
    large = np.array([s.size >= 10 for s in sample])
    score = rewards.shape_adherence(blurred, [s.caption for s in sample])
    assert large.sum() > 200 and score[large].mean() == 1.0
    assert rewards.position_adherence(blurred, [s.caption for s in sample]).min() == 1.0


def test_position_adherence_hand_built():
    image = blank()
    image[5:25, 12] = GREEN  # a single column at x = 12, between the left (<= 11.5) and center (>= 12.5) bands
    got = {p: rewards.position_adherence(image, f"a green square on the {p}") for p in POSITIONS}
    assert got == {"left": 0.75, "center": 0.75, "right": 0.0}
    image = blank()
    image[5:25, 9] = GREEN
    image[5:25, 10] = GREEN  # centroid 9.5: inside the left band
    assert rewards.position_adherence(image, "a green square on the left") == 1.0
    assert rewards.position_adherence(image, "a green square on the center") == 0.0
    assert rewards.position_adherence(image, "a green square on the center", falloff=6.0) == pytest.approx(0.5)
    assert rewards.position_adherence(blank(), "a green square on the left") == 0.0


def test_to_uint8_images_round_trip(sampled):
    _, images = sampled
    chw = images.transpose(0, 3, 1, 2).astype(np.float64)
    assert np.array_equal(rewards.to_uint8_images(chw / 255.0), images)
    assert np.array_equal(rewards.to_uint8_images(torch.from_numpy(chw / 127.5 - 1.0), (-1.0, 1.0)), images)
    with pytest.raises(ValueError, match="channel-first"):
        rewards.to_uint8_images(images.astype(np.float32))


# ---------------------------------------------------------------- differentiable colour reward

HARD = dict(fg_temperature=1e-3, color_temperature=1e-3)


def hand_built_hard_images() -> tuple[np.ndarray, list[str]]:
    images = blank(4)
    images[0, :5, :3] = RED
    images[0, 10:17, 20:25] = BLUE
    images[0, 30, :] = GREEN  # 15 red, 35 blue, 32 green
    images[0, 31, :2] = [(79, 24, 24), (89, 24, 24)]  # off-palette, 55 (background) and 65 (red) from background
    images[1, ::2, ::3] = YELLOW
    images[1, 1::2, ::5] = RED  # 176 yellow, 112 red
    images[2] = np.array(PALETTE["green"], dtype=np.uint8)  # all foreground
    captions = ["a blue circle on the left", "a yellow square on the center", "a green circle on the right",
                "a red square on the left"]  # the last image is empty: 0
    return images, captions


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_color_adherence_matches_numpy_on_hard_images(sampled, dtype):
    sample, rendered = sampled
    rng = np.random.default_rng(1)
    captions = [scenes.noisy_caption(s, rng) for s in sample]
    hand, hand_captions = hand_built_hard_images()
    images = np.concatenate([rendered, hand])
    captions = captions + hand_captions
    expected = rewards.color_adherence(images, captions)
    assert 0.3 < expected[: len(sample)].mean() < 0.9  # the noisy captions give both 0s and 1s
    assert np.array_equal(expected[len(sample):], [35 / 83, 176 / 288, 1.0, 0.0])  # counted by hand
    x = torch.from_numpy(images.transpose(0, 3, 1, 2) / 255.0).to(dtype)
    got = rewards.color_adherence_torch(x, captions, **HARD).double().numpy()
    assert np.abs(got - expected).max() < 1e-6
    got_pm1 = rewards.color_adherence_torch(x * 2 - 1, captions, value_range=(-1.0, 1.0), **HARD)
    assert np.abs(got_pm1.double().numpy() - expected).max() < 1e-6


def test_torch_color_adherence_defaults_are_close_on_rendered_scenes(sampled):
    sample, images = sampled
    x = torch.from_numpy(images.transpose(0, 3, 1, 2) / 255.0).float()
    got = rewards.color_adherence_torch(x, [s.caption for s in sample])
    assert got.min().item() > 0.99  # background leak at the default temperatures is small


def test_torch_color_adherence_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    captions = ["a red circle on the left", "a green circle on the left", "a blue square on the right",
                "a yellow triangle on the center"]
    r = rewards.color_adherence_torch(x, captions)
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad.abs().sum((1, 2, 3)) > 1e-6).all()  # every image gets a signal
    assert (grad != 0).double().mean() > 0.9
    small = x[:1, :, :4, :4].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rewards.color_adherence_torch(t, captions[:1]), (small,))
    # Gradient ascent on the pixels raises the reward (what reward guidance relies on).
    y = x.detach().clone().requires_grad_(True)
    before = rewards.color_adherence_torch(y, captions).detach()
    for _ in range(20):
        (g,) = torch.autograd.grad(rewards.color_adherence_torch(y, captions).sum(), y)
        y = (y + 0.5 * g / g.abs().amax()).clamp(0, 1).detach().requires_grad_(True)
    after = rewards.color_adherence_torch(y, captions).detach()
    assert (after > before + 0.05).all()


def test_torch_color_adherence_validates_inputs():
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="value_range"):
        rewards.color_adherence_torch(x * 255, ["a red circle on the left"])
    with pytest.raises(ValueError, match="\\(N, 3, H, W\\)"):
        rewards.color_adherence_torch(x.permute(0, 2, 3, 1), ["a red circle on the left"])
    with pytest.raises(TypeError, match="float"):
        rewards.color_adherence_torch((x * 255).to(torch.uint8), ["a red circle on the left"])


# ---------------------------------------------------------------- annotator


def test_ties_appear_exactly_within_the_margin():
    delta = np.array([0.0, 0.05, 0.1, -0.1, 0.1 + 1e-9, -0.1 - 1e-9, 0.5, -0.5])
    zeros = np.zeros_like(delta)
    for temperature in (0.0, 0.1, 10.0):
        labels = annotator.label_pairs(delta, zeros, rng=0, temperature=temperature, tie_margin=0.1)
        assert np.array_equal(labels[:4], np.full(4, 0.5))
        assert set(labels[4:]) <= {0.0, 1.0}
    exact = annotator.label_pairs(delta, zeros, rng=0, temperature=0.0, tie_margin=0.1)
    assert np.array_equal(exact[4:], [1.0, 0.0, 1.0, 0.0])
    labels = annotator.label_pairs(np.array([0.3, 0.3, 0.2]), np.array([0.3, 0.2, 0.3]), rng=0, temperature=0.0)
    assert np.array_equal(labels, [0.5, 1.0, 0.0])  # default margin 0: only exactly equal rewards tie


def test_preference_probability():
    delta = np.array([-0.2, -0.1, 0.0, 0.1, 0.2, 1.0])
    p = annotator.preference_probability(delta, np.zeros(6), temperature=0.1, tie_margin=0.1)
    assert np.allclose(p, [1 / (1 + math.e**2), 0.5, 0.5, 0.5, 1 / (1 + math.e**-2), 1 / (1 + math.e**-10)])
    p0 = annotator.preference_probability(delta, np.zeros(6), temperature=0.0, tie_margin=0.0)
    assert np.array_equal(p0, [0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        annotator.label_pairs(delta, delta, rng=0, temperature=-1.0)


def test_label_pairs_is_deterministic_by_seed():
    rng = np.random.default_rng(0)
    a, b = rng.random(1000), rng.random(1000)
    first = annotator.label_pairs(a, b, rng=5, temperature=0.2)
    assert np.array_equal(first, annotator.label_pairs(a, b, rng=np.random.default_rng(5), temperature=0.2))
    assert (first != annotator.label_pairs(a, b, rng=6, temperature=0.2)).sum() > 50


@pytest.mark.parametrize("temperature,tie_margin", [(0.1, 0.0), (0.2, 0.05), (0.03, 0.02)])
def test_agreement_matches_bradley_terry_expectation(temperature, tie_margin):
    rng = np.random.default_rng(42)
    n = 20000
    # A mix like the toy rewards: many exact 0/1 values plus continuous ones.
    a = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n).astype(float), rng.random(n))
    b = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n).astype(float), rng.random(n))
    labels = annotator.label_pairs(a, b, rng=rng, temperature=temperature, tie_margin=tie_margin)
    measured = annotator.agreement(labels, a, b, tie_margin=tie_margin)
    expected = annotator.expected_agreement(a, b, temperature=temperature, tie_margin=tie_margin)
    scored = np.abs(a - b) > tie_margin
    p = 0.5 * (1 + np.tanh(0.5 * np.abs(a - b)[scored] / temperature))
    se = math.sqrt((p * (1 - p)).sum()) / scored.sum()
    assert abs(measured - expected) < 3 * se, (measured, expected, se)
    assert np.array_equal(labels == 0.5, ~scored)
    # Calibration: the mean label of scored pairs matches the mean preference probability.
    prob = annotator.preference_probability(a, b, temperature, tie_margin)[scored]
    se_mean = math.sqrt((prob * (1 - prob)).sum()) / scored.sum()
    assert abs(labels[scored].mean() - prob.mean()) < 3 * se_mean


def test_zero_temperature_agrees_perfectly():
    rng = np.random.default_rng(0)
    a, b = rng.random(5000), rng.random(5000)
    for temperature in (0.0, 1e-9):
        labels = annotator.label_pairs(a, b, rng=1, temperature=temperature, tie_margin=1e-6)
        assert annotator.agreement(labels, a, b, tie_margin=1e-6) == 1.0
    assert annotator.expected_agreement(a, b, temperature=0.0) == 1.0


def test_agreement_hand_computed():
    labels = np.array([1.0, 0.0, 1.0, 0.5, 1.0, 0.0])
    a = np.array([0.9, 0.9, 0.1, 0.9, 0.50, 0.2])
    b = np.array([0.1, 0.1, 0.9, 0.1, 0.45, 0.8])
    # Scored with margin 0.1: pairs 0, 1, 2, 5 (pair 3 is a labelled tie, pair 4 is within the margin).
    assert annotator.agreement(labels, a, b, tie_margin=0.1) == 0.5
    assert math.isnan(annotator.agreement(np.full(2, 0.5), a[:2], b[:2]))
    with pytest.raises(ValueError, match="in \\{0, 0.5, 1\\}"):
        annotator.agreement(np.array([0.3]), a[:1], b[:1])


def test_rank_plackett_luce_statistics():
    r = np.array([0.2, 0.9, 0.5, 0.5])
    order = annotator.rank(r, rng=0, temperature=0.0)
    assert order[0] == 1 and order[-1] == 0 and set(order[1:3]) == {2, 3}
    batch = np.tile(np.array([0.0, 0.1, 0.3]), (20000, 1))
    orders = annotator.rank(batch, rng=3, temperature=0.1)
    assert orders.shape == batch.shape and np.array_equal(np.sort(orders, 1), np.tile(np.arange(3), (20000, 1)))
    assert np.array_equal(orders, annotator.rank(batch, rng=3, temperature=0.1))
    p_first = np.exp(batch[0] / 0.1) / np.exp(batch[0] / 0.1).sum()
    for i in range(3):
        freq = (orders[:, 0] == i).mean()
        assert abs(freq - p_first[i]) < 3 * math.sqrt(p_first[i] * (1 - p_first[i]) / 20000), i
    # K = 2 is the pairwise Bradley-Terry model: P(item 0 first) = sigmoid((r0 - r1) / T).
    pair = np.tile(np.array([0.25, 0.1]), (20000, 1))
    freq = (annotator.rank(pair, rng=4, temperature=0.1)[:, 0] == 0).mean()
    p = 1 / (1 + math.exp(-1.5))
    assert abs(freq - p) < 3 * math.sqrt(p * (1 - p) / 20000)
