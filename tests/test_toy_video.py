"""The toy video world: the clip contract, ground-truth VQ / MQ / TA rewards, the per-dimension annotator,
`video_pair` shards of toy clips, the pixel-space `ToyVideoPipeline`, and the pretraining script's resume."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.toy.scenes import BACKGROUND, COLORS, PALETTE, SHAPES, shape_mask
from mmalign.toy.video import (
    CLIP_SIZE_RANGE,
    DIRECTION_STEPS,
    DIRECTIONS,
    NUM_FRAMES,
    SPEED_RANGE,
    VIDEO_WORDS,
    Clip,
    all_video_prompts,
    displacement,
    noisy_video_caption,
    parse_video_caption,
    render_clips,
    sample_clip,
    sample_clips,
    save_clip_gif,
    save_clip_strip,
    start_range,
    video_prompt_seed_pairs,
)
from mmalign.toy.video_rewards import (
    clip_features,
    motion_quality,
    text_alignment,
    to_uint8_clips,
    video_reward_components,
    video_rewards,
    visual_quality,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips() -> list[Clip]:
    return sample_clips(120, seed=7)


@pytest.fixture(scope="module")
def frames(clips) -> np.ndarray:
    return render_clips(clips)


# ---------------------------------------------------------------------------------------------------------- contract


def test_clips_are_deterministic_from_a_seed():
    a, b = sample_clips(20, seed=3), sample_clips(20, seed=3)
    assert a == b and a != sample_clips(20, seed=4)
    np.testing.assert_array_equal(render_clips(a), render_clips(b))
    assert sample_clip(11, caption="a blue square moving up") == sample_clip(11, caption="a blue square moving up")


def test_frames_hold_one_shape_on_the_exact_background(clips, frames):
    assert frames.shape == (len(clips), NUM_FRAMES, 32, 32, 3) and frames.dtype == np.uint8
    for clip, f in zip(clips, frames):
        masks = clip.masks()
        assert (f[~masks] == BACKGROUND).all() and (f[masks] == PALETTE[clip.color]).all()
        # Every frame holds the whole shape: nothing is cut off at the border.
        assert (masks.sum((1, 2)) == shape_mask(clip.shape, clip.size).sum()).all()
        for (x0, y0), m in zip(clip.boxes(), masks):
            assert 0 <= x0 <= 32 - clip.size and 0 <= y0 <= 32 - clip.size
            np.testing.assert_array_equal(m[y0:y0 + clip.size, x0:x0 + clip.size], shape_mask(clip.shape, clip.size))


def test_motion_is_constant_speed_along_the_caption_direction(clips):
    for clip in clips:
        steps = np.diff(clip.boxes(), axis=0)  # (8, 2) pixels per frame
        ux, uy = DIRECTION_STEPS[clip.direction]
        along = steps @ np.array([ux, uy])
        np.testing.assert_array_equal(steps, along[:, None] * np.array([ux, uy]))  # no motion across
        if clip.direction == "still":
            assert clip.speed == 0 and (steps == 0).all()
        else:
            assert SPEED_RANGE[0] <= clip.speed <= SPEED_RANGE[1]
            # Rounded positions: each step is the speed rounded down or up, and the travel is round(8 * speed).
            assert set(along) <= {int(np.floor(clip.speed)), int(np.ceil(clip.speed))}
            assert along.sum() == np.floor(8 * clip.speed + 0.5)
    seen = {(c.color, c.shape, c.direction) for c in sample_clips(600, seed=0)}
    assert len(seen) == 60  # every combination is drawn
    assert {c.size for c in sample_clips(300, seed=1)} == set(range(CLIP_SIZE_RANGE[0], CLIP_SIZE_RANGE[1] + 1))


def test_the_fastest_largest_clip_still_fits_and_invalid_clips_are_refused():
    cols, rows = start_range("right", 12, 2.5)
    assert (cols.start, cols.stop) == (0, 1) and (rows.start, rows.stop) == (0, 21)  # travel 20 px: 0..20
    assert displacement(8, 2.5) == 20 and displacement(1, 1.5) == 2  # halves round up
    with pytest.raises(ValueError, match="leaves the frame"):
        Clip("red", "circle", "right", 12, 1, 0, 2.5)
    with pytest.raises(ValueError, match="still clip has speed 0"):
        Clip("red", "circle", "still", 10, 5, 5, 2.0)
    with pytest.raises(ValueError, match="valid directions"):
        Clip("red", "circle", "sideways", 10, 5, 5, 2.0)


def test_captions_parse_and_conditioned_clips_match_them():
    prompts = all_video_prompts()
    assert len(prompts) == len(set(prompts)) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) == 60
    assert prompts[0] == "a red circle moving left"
    for i, prompt in enumerate(prompts):
        clip = sample_clip(i, caption=prompt)
        assert clip.caption == prompt and parse_video_caption(prompt) == (clip.color, clip.shape, clip.direction)
    with pytest.raises(ValueError, match="outside the toy video grammar"):
        parse_video_caption("a red circle on the left")


def test_prompt_seed_splits_cycle_through_all_prompts_and_never_share_a_seed():
    train, held = video_prompt_seed_pairs("train", 120), video_prompt_seed_pairs("heldout", 120)
    assert {s for _, s in train}.isdisjoint(s for _, s in held)
    assert [p for p, _ in train] == [p for p, _ in held] == all_video_prompts() * 2
    assert video_prompt_seed_pairs("heldout", 3) == held[:3]
    with pytest.raises(ValueError, match="split"):
        video_prompt_seed_pairs("test", 3)


@pytest.mark.parametrize("attribute", ["color", "shape", "direction"])
def test_noisy_captions_change_only_the_chosen_attribute_at_the_chosen_rate(clips, attribute):
    rng = np.random.default_rng(0)
    index = {"color": 0, "shape": 1, "direction": 2}[attribute]
    wrong = 0
    for _ in range(5):
        for clip in clips:
            caption = noisy_video_caption(clip, rng, p_wrong=0.4, attribute=attribute)
            got, true = parse_video_caption(caption), (clip.color, clip.shape, clip.direction)
            assert [g == t for i, (g, t) in enumerate(zip(got, true)) if i != index] == [True, True]
            wrong += got[index] != true[index]
    assert abs(wrong / (5 * len(clips)) - 0.4) < 0.06  # 600 draws: standard error 0.02
    clip = clips[0]
    assert noisy_video_caption(clip, 0, p_wrong=0.0) == clip.caption
    assert parse_video_caption(noisy_video_caption(clip, 0, p_wrong=1.0))[0] != clip.color
    # Two draws per call whatever p_wrong is: the streams stay aligned.
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    noisy_video_caption(clip, r1, p_wrong=0.0)
    noisy_video_caption(clip, r2, p_wrong=1.0)
    assert r1.random() == r2.random()


def test_strip_and_gif_writers(tmp_path, frames):
    from PIL import Image

    save_clip_strip(frames[:3], str(tmp_path / "s.png"), captions=["a", "b", "c"], scale=2)
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == ((9 * 33 + 1) * 2, 3 * ((32 + 2) * 2 + 14))
        # The first frame of the first clip, enlarged 2x, starts one (scaled) pad below the caption band.
        np.testing.assert_array_equal(np.asarray(im)[14 + 2:14 + 2 + 64:2, 2:2 + 64:2], frames[0, 0])
    save_clip_gif(frames[:5], str(tmp_path / "g.gif"), ncol=3, scale=1)
    with Image.open(tmp_path / "g.gif") as im:
        assert im.n_frames == NUM_FRAMES and im.size == (3 * 33 + 1, 2 * 33 + 1)
    with pytest.raises(ValueError, match="captions"):
        save_clip_strip(frames[:3], str(tmp_path / "x.png"), captions=["a"])


# ----------------------------------------------------------------------------------------------------------- rewards


def _blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return np.rint(sum(p[:, :, i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9).astype(np.uint8)


def test_rendered_clips_score_full_marks_on_their_own_captions(clips, frames):
    r = video_reward_components(frames, [c.caption for c in clips])
    for name in ("VQ", "MQ", "TA", "color", "shape", "direction"):
        assert r[name].shape == (len(clips),) and r[name].min() >= 0.95, name
    assert set(video_rewards(frames, [c.caption for c in clips])) == {"VQ", "MQ", "TA"}
    # One clip in, one float out; each reward function agrees with the joint computation.
    assert visual_quality(frames[0]) == pytest.approx(r["VQ"][0])
    assert motion_quality(frames[1]) == pytest.approx(r["MQ"][1])
    assert text_alignment(frames[2], clips[2].caption) == pytest.approx(r["TA"][2])


def test_shuffled_frames_lose_motion_quality_but_keep_visual_quality(clips, frames):
    moving = np.array([c.direction != "still" for c in clips])
    order = np.array([4, 0, 7, 2, 8, 1, 6, 3, 5])
    shuffled = frames[:, order]
    np.testing.assert_allclose(visual_quality(shuffled), visual_quality(frames))
    mq = motion_quality(shuffled)
    assert mq[moving].max() < 0.2 and mq[~moving].min() == 1.0  # a still clip is unchanged by shuffling


def test_other_colour_or_direction_loses_text_alignment(clips, frames):
    def other(clip: Clip, attribute: str, values) -> str:
        words = {"color": clip.color, "shape": clip.shape, "direction": clip.direction}
        words[attribute] = next(v for v in values if v != words[attribute])
        return f"a {words['color']} {words['shape']} moving {words['direction']}"

    wrong_color = video_reward_components(frames, [other(c, "color", COLORS) for c in clips])
    assert wrong_color["color"].max() == 0.0 and wrong_color["TA"].max() <= 2 / 3 + 1e-9
    wrong_direction = video_reward_components(frames, [other(c, "direction", DIRECTIONS) for c in clips])
    assert wrong_direction["direction"].max() == 0.0 and wrong_direction["TA"].max() <= 2 / 3 + 1e-9
    # Rendering another colour under the same caption has the same effect.
    clip = next(c for c in clips if c.color != "blue")
    blue = Clip("blue", clip.shape, clip.direction, clip.size, clip.x, clip.y, clip.speed).render()
    assert text_alignment(blue, clip.caption) == pytest.approx(2 / 3)
    assert visual_quality(blue) == 1.0 and motion_quality(blue) == 1.0


def test_blurred_or_noisy_clips_lose_visual_quality(clips, frames):
    captions = [c.caption for c in clips]
    blurred = video_reward_components(_blur(frames), captions)
    assert blurred["VQ"].max() < 0.7 and blurred["MQ"].min() > 0.9  # blur is not a motion defect
    noise = np.random.default_rng(0).normal(0.0, 20.0, frames.shape)
    noisy = np.clip(frames + noise, 0, 255).round().astype(np.uint8)
    assert visual_quality(noisy).max() < 0.5 and text_alignment(noisy, captions).mean() > 0.9


def test_noise_and_empty_clips_score_nothing_shape_like(frames):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, frames[:8].shape).astype(np.uint8)
    empty = np.broadcast_to(np.array(BACKGROUND, np.uint8), frames[:8].shape).copy()
    captions = ["a red square moving still"] * 8
    for clip in (noise, empty):
        r = video_reward_components(clip, captions)
        assert r["VQ"].max() == 0 and r["MQ"].max() == 0 and r["shape"].max() == 0 and r["direction"].max() == 0


def test_a_vanishing_frame_costs_the_hand_computed_motion_and_visual_quality(clips, frames):
    i = next(k for k, c in enumerate(clips) if c.direction != "still")
    clip = frames[i].copy()
    clip[4] = BACKGROUND
    f = clip_features(clip[None])
    assert f["area"][0, 4] == 0 and np.isnan(f["centroid"][0, 4]).all()
    a = np.array([1.0] * 4 + [0.0] + [1.0] * 4)
    assert motion_quality(clip) == pytest.approx(1 - a.std() / a.mean())  # steady; track and colours intact
    assert visual_quality(clip) == pytest.approx(8 / 9)


def test_direction_is_read_from_the_centroid_track():
    still = Clip("red", "square", "still", 10, 11, 11, 0.0).render()
    base = np.broadcast_to(np.array(BACKGROUND, np.uint8), still.shape).copy()
    # A square that moves right 2 px/frame and down 1 px/frame: full credit along "right", none across it.
    diagonal = base.copy()
    for k in range(NUM_FRAMES):
        diagonal[k, 5 + k:15 + k, 2 + 2 * k:12 + 2 * k] = PALETTE["red"]
    f = clip_features(diagonal[None])
    np.testing.assert_allclose(f["velocity"][0], [2.0, 1.0])
    np.testing.assert_allclose(f["residual"], [0.0], atol=1e-12)
    assert video_reward_components(diagonal, "a red square moving right")["direction"] == 0.0
    assert video_reward_components(still, "a red square moving still")["direction"] == 1.0
    assert video_reward_components(still, "a red square moving up")["direction"] == 0.0


def test_reward_inputs_are_checked():
    with pytest.raises(TypeError, match="to_uint8_clips"):
        visual_quality(np.zeros((1, 9, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="2 clips but 1 captions"):
        text_alignment(np.zeros((2, 9, 32, 32, 3), np.uint8), ["a red circle moving up"])
    with pytest.raises(ValueError, match="outside the toy video grammar"):
        text_alignment(np.zeros((9, 32, 32, 3), np.uint8), "a red circle on the left")
    x = np.linspace(0, 1, 2 * 9 * 32 * 32 * 3).reshape(2, 9, 32, 32, 3)
    u8 = to_uint8_clips(x)
    assert u8.dtype == np.uint8 and u8.max() == 255 and u8.min() == 0
    np.testing.assert_array_equal(to_uint8_clips(2 * x - 1, value_range=(-1, 1)), u8)


# --------------------------------------------------------------------------------------------------------- annotator


def test_annotator_labels_each_dimension_from_its_own_reward():
    from mmalign.toy.video_annotator import label_video_pairs

    ra = {"VQ": np.array([0.9, 0.5, 0.50]), "MQ": np.array([0.1, 0.5, 0.8]), "TA": np.array([0.6, 0.6, 0.0])}
    rb = {"VQ": np.array([0.1, 0.6, 0.51]), "MQ": np.array([0.9, 0.5, 0.2]), "TA": np.array([0.6, 0.1, 1.0])}
    labels = label_video_pairs(ra, rb, rng=0, temperature=0.0, tie_margin=0.02)
    assert labels == [{"VQ": "A", "MQ": "B", "TA": "same"}, {"VQ": "B", "MQ": "same", "TA": "A"},
                      {"VQ": "same", "MQ": "A", "TA": "B"}]
    # Bradley-Terry: a gap of 0.05 at temperature 0.05 is preferred with probability sigmoid(1) = 0.731.
    n = 4000
    a = {d: np.full(n, 0.55) for d in ("VQ", "MQ", "TA")}
    b = {d: np.full(n, 0.50) for d in ("VQ", "MQ", "TA")}
    noisy = label_video_pairs(a, b, rng=1, temperature={"VQ": 0.05, "MQ": 0.05, "TA": 1e-6}, tie_margin=0.0)
    share = {d: np.mean([lab[d] == "A" for lab in noisy]) for d in ("VQ", "MQ", "TA")}
    assert abs(share["VQ"] - 0.731) < 0.03 and abs(share["MQ"] - 0.731) < 0.03 and share["TA"] == 1.0
    assert noisy == label_video_pairs(a, b, rng=1, temperature={"VQ": 0.05, "MQ": 0.05, "TA": 1e-6})
    with pytest.raises(ValueError, match="missing"):
        label_video_pairs({"VQ": [1.0]}, {"VQ": [0.0]}, rng=0)


def test_video_pair_shards_round_trip_through_the_reader(tmp_path, clips, frames):
    from mmalign.data import VideoPairDataset, validate_shards
    from mmalign.data.video import video_info
    from mmalign.toy.video_annotator import encode_mp4, label_video_pairs, write_video_pair_shards

    prompts = [c.caption for c in clips[:3]]
    a, b = frames[:3], _blur(frames[:3])
    ra, rb = video_rewards(a, prompts), video_rewards(b, prompts)
    labels = label_video_pairs(ra, rb, rng=0, temperature=0.0)
    manifest = write_video_pair_shards(tmp_path / "vp", a, b, prompts, labels, rewards_a=ra, rewards_b=rb, fps=8)
    assert manifest.num_samples == 3 and validate_shards(tmp_path / "vp").ok
    samples = list(VideoPairDataset(tmp_path / "vp", frames={"backend": "pyav"}))
    assert [s["prompt"] for s in samples] == prompts
    assert [s["labels"] for s in samples] == labels and labels[0]["VQ"] == "A"
    for i, s in enumerate(samples):
        # Lossless mp4: the decoded frames are the labelled ones, bit for bit.
        np.testing.assert_array_equal(s["frames_a"].numpy(), a[i])
        np.testing.assert_array_equal(s["frames_b"].numpy(), b[i])
        assert s["fps"] == (8.0, 8.0) and s["num_frames"] == (9, 9)
    shard = next((tmp_path / "vp").glob("*.tar"))
    with tarfile.open(shard) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert meta["rewards_a"]["VQ"] == pytest.approx(ra["VQ"][0])
    assert meta["rewards_b"]["TA"] == pytest.approx(rb["TA"][0])
    lossy = encode_mp4(frames[0], fps=4, codec="h264")
    assert lossy[4:8] == b"ftyp" and video_info(lossy) == {"fps": 4.0, "num_frames": 9, "height": 32, "width": 32}
    with pytest.raises(ValueError, match="codec"):
        encode_mp4(frames[0], codec="vp9")


# ---------------------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    from mmalign.toy.video_pipeline import build_toy_video

    folder = tmp_path_factory.mktemp("toy") / "video"
    build_toy_video(seed=0).save_pretrained(folder)
    return folder


def test_every_video_word_is_one_token(video_folder):
    from mmalign.toy.video_pipeline import ToyVideoPipeline

    tok = ToyVideoPipeline.from_pretrained(video_folder).tokenizer
    for word in VIDEO_WORDS:
        assert tok.tokenize(word) == [f"{word}</w>"], word
    assert len(tok("a yellow triangle moving still").input_ids) == 7 <= tok.model_max_length


def test_pipeline_round_trip_shapes_and_per_clip_seeds(video_folder):
    from mmalign.toy.video_pipeline import ToyVideoPipeline, build_toy_video

    pipe = ToyVideoPipeline.from_pretrained(video_folder)
    pipe.set_progress_bar_config(disable=True)
    index = json.loads((video_folder / "model_index.json").read_text())
    assert index["_class_name"] == "ToyVideoPipeline" and "vae" not in index
    assert pipe.transformer.config.in_channels == pipe.transformer.config.out_channels == 3
    prompts = ["a red circle moving left", "a blue square moving up"]
    both = pipe(prompts, num_inference_steps=3, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).frames
    alone = pipe(prompts[1:], num_inference_steps=3, generator=[torch.Generator().manual_seed(4)]).frames
    assert both.shape == (2, NUM_FRAMES, 32, 32, 3) and both.dtype == np.float32
    assert 0.0 <= both.min() and both.max() <= 1.0
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)  # a clip depends on its own seed only
    fresh = build_toy_video(seed=0)
    fresh.set_progress_bar_config(disable=True)
    again = fresh(prompts, num_inference_steps=3, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                  output_type="pt").frames
    assert again.shape == (2, NUM_FRAMES, 3, 32, 32)
    np.testing.assert_allclose(again.permute(0, 1, 3, 4, 2).numpy(), both, atol=1e-6)  # saved == built
    with pytest.raises(ValueError, match="one per clip"):
        pipe(prompts, num_inference_steps=2, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="patch size"):
        pipe(prompts[0], height=30)


def test_sampler_follows_the_velocity_convention(video_folder):
    """With the exact velocity of a single clip x0, v(x_t, t) = (x_t - x0) / t, the Euler sampler must land on
    x0; the transformer must be called with timestep = 1000 t and the text encoder's last hidden state."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from mmalign.toy.video_pipeline import ToyVideoPipeline

    pipe = ToyVideoPipeline.from_pretrained(video_folder)
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.from_numpy(sample_clip(0).render()).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, 9, 32, 32)
    seen = []

    def oracle(hidden_states, timestep, encoder_hidden_states, **kwargs):
        t = timestep.view(-1, 1, 1, 1, 1) / 1000.0
        seen.append((float(timestep[0]), tuple(encoder_hidden_states.shape)))
        return Transformer2DModelOutput(sample=(hidden_states - x0) / t)

    pipe.transformer.forward = oracle
    out = pipe("a red circle moving left", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
               output_type="pt").frames  # (1, 9, 3, 32, 32) in [0, 1]
    torch.testing.assert_close(out.permute(0, 2, 1, 3, 4) * 2 - 1, x0, atol=1e-5, rtol=0)
    assert [round(t, 2) for t, _ in seen] == [1000.0, 750.25, 500.5, 250.75, 1.0]
    assert seen[0][1] == (1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    # `velocity` is the same call with t in [0, 1].
    x_t, t = torch.randn(1, 3, 9, 32, 32), torch.tensor([0.3])
    emb = pipe.encode_prompt(["a red circle moving left"])
    torch.testing.assert_close(pipe.velocity(x_t, t, emb), (x_t - x0) / 0.3)


# ------------------------------------------------------------------------------------------------------ pretraining


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_toy_video", REPO / "scripts" / "pretrain_toy_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_resumes_exactly_and_saves_a_loadable_model(tmp_path):
    from mmalign.toy.video_pipeline import ToyVideoPipeline, build_toy_video

    main = _pretrain_module().main
    small = ["--heads", "2", "--head-dim", "8", "--layers", "1", "--ffn", "16", "--text-width", "16",
             "--batch-size", "2", "--eval-prompts", "2", "--eval-steps", "2", "--eval-every", "0", "--threads", "1"]
    assert main(["--steps", "2", "--out", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ck"), *small]) == 0
    assert main(["--steps", "4", "--resume", "--out", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ck"),
                 *small]) == 0
    assert main(["--steps", "4", "--out", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "ck2"), *small]) == 0
    ra, rb = (json.loads((tmp_path / d / "pretrain.json").read_text()) for d in ("a", "b"))
    assert ra["steps_done"] == rb["steps_done"] == 4
    resumed, straight = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("ck", "ck2"))
    assert resumed["losses"] == straight["losses"]
    for k, v in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][k], v, atol=0, rtol=0)
    pipe = ToyVideoPipeline.from_pretrained(tmp_path / "a")
    assert pipe.transformer.config.num_layers == 1
    fresh = build_toy_video(seed=0, num_heads=2, head_dim=8, num_layers=1, ffn_dim=16, text_width=16)
    for k, v in fresh.text_encoder.state_dict().items():  # the text encoder stays frozen by default
        torch.testing.assert_close(pipe.text_encoder.state_dict()[k], v, atol=0, rtol=0)
    assert not torch.equal(pipe.transformer.proj_out.weight, fresh.transformer.proj_out.weight)
    assert "Ground truth on held-out prompts" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert (tmp_path / "a" / "samples.gif").is_file()
