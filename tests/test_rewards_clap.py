"""CLAP text-audio scorer and the audio inputs of audio scorers: resampling against analytic signals, the cosine
against transformers' own `logits_per_audio`, long clips, export round trip, the user audio hook, and clear errors
for audio the scorers cannot take. Tiny `ClapModel`s are built from configs and loaded with `from_pretrained`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.rewards import load_scorer
from mmalign.rewards.audio import check_sample_rate, resample, split_audio
from mmalign.rewards.base import ScorerError
from mmalign.rewards.clap import ClapScorer, load_clap_scorer
from mmalign.rewards.registry import is_differentiable, scorer_kind

PROMPTS = ["a calm piano melody", "loud drums", "rain"]


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    from mmalign.rewards.tiny import build_tiny_clap

    return str(build_tiny_clap(tmp_path_factory.mktemp("clap") / "unfused"))


@pytest.fixture(scope="module")
def tiny_clap_fused(tmp_path_factory):
    from mmalign.rewards.tiny import build_tiny_clap

    return str(build_tiny_clap(tmp_path_factory.mktemp("clap") / "fused", fusion=True, seed=1))


def tones(sr: int, n: int, freqs=(220.0, 1250.0, 3100.0), envelope: bool = False) -> np.ndarray:
    """A sum of sines (band-limited below max(freqs)) sampled at `sr`; `envelope` fades it in and out with
    sin^2(pi t / T), which keeps it band-limited and makes both ends silent."""
    t = np.arange(n) / sr
    x = sum(a * np.sin(2 * np.pi * f * t + i) for i, (a, f) in enumerate(zip((0.3, 0.2, 0.1), freqs)))
    return x * np.sin(np.pi * t / (n / sr)) ** 2 if envelope else x


def noise(n: int, seed: int, scale: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n) * scale


# -- resampling -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orig, target", [(8000, 48000), (32000, 48000), (44100, 48000), (96000, 48000),
                                          (22050, 16000), (11025, 48000)])
def test_resample_equals_band_limited_sines_evaluated_at_the_new_rate(orig, target):
    n = orig // 2 + 7  # half a second and a length that does not divide evenly
    y = resample(tones(orig, n, freqs=(50.0, 440.0, 1234.5)), orig, target)
    assert y.dtype == np.float64 and y.shape == (math.ceil(n * target / orig),)
    expected = tones(target, y.size, freqs=(50.0, 440.0, 1234.5))  # the same sound, computed at the new rate
    inner = slice(y.size // 10, -y.size // 10)  # away from the clip's edges (the signal is zero outside it)
    np.testing.assert_allclose(y[inner], expected[inner], atol=1e-4)


def test_resample_removes_tones_above_the_new_nyquist_frequency_and_keeps_equal_rates():
    t = np.arange(48000) / 96000
    y = resample(np.sin(2 * np.pi * 30000 * t), 96000, 48000)  # 30 kHz cannot exist at 48 kHz (Nyquist 24 kHz)
    assert np.abs(y[y.size // 10:-y.size // 10]).max() < 1e-3
    x = noise(1000, 0)
    assert np.array_equal(resample(x, 48000, 48000), x)
    assert resample(x[:3], 8000, 48000).shape == (18,)  # a clip shorter than the filter still resamples


@pytest.mark.parametrize("bad", [0, -8000, 44100.5, float("nan"), True, "48000", None, [48000]])
def test_a_sample_rate_that_cannot_be_resampled_is_an_error_naming_the_argument(bad, tiny_clap):
    with pytest.raises(ScorerError, match="sample_rate"):
        check_sample_rate(bad)
    scorer = load_clap_scorer(tiny_clap)
    with pytest.raises(ScorerError, match="sample_rate"):
        scorer.score([noise(800, 0)], "rain", sample_rate=bad)
    assert check_sample_rate(44100.0) == 44100 and check_sample_rate(torch.tensor(32000)) == 32000


def test_audio_inputs_are_mixed_to_mono_and_bad_clips_are_named():
    stereo = np.stack([np.ones(5), np.zeros(5)])[None].astype(np.float32)  # (1, 2, 5)
    assert np.array_equal(split_audio(stereo)[0], np.full(5, 0.5, np.float32))
    clips = split_audio([torch.ones(3), np.zeros((2, 4))])
    assert [c.shape for c in clips] == [(3,), (4,)] and all(c.dtype == np.float32 for c in clips)
    with pytest.raises(ScorerError, match=r"audio\[1\]: the clip has no samples"):
        split_audio([np.ones(3), np.zeros(0)])
    with pytest.raises(ScorerError, match=r"audio\[0\]: 1 samples are not finite"):
        split_audio([np.array([0.0, np.nan])])
    with pytest.raises(ScorerError, match="float"):
        split_audio(np.zeros((2, 10), dtype=np.int16))


# -- the CLAP score ---------------------------------------------------------------------------------------------------
def test_cosine_and_logit_scale_equal_transformers_logits_per_audio(tiny_clap):
    """The scorer's embeddings come from get_text_features / get_audio_features; the reference is ClapModel's own
    forward (the contrastive logits), on features computed by the extractor at the model's rate."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    scorer = load_clap_scorer(tiny_clap)
    assert scorer.sampling_rate == 48000 and scorer.modality == "audio"
    clips = [noise(30000, 1), tones(48000, 48000), noise(48000, 2, scale=0.05)]  # at most one window each
    with torch.inference_mode():
        cos = scorer.score(clips, PROMPTS, sample_rate=48000)
    model = ClapModel.from_pretrained(tiny_clap).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clap)(PROMPTS, padding=True, return_tensors="pt")
    feats = ClapFeatureExtractor.from_pretrained(tiny_clap)(clips, sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    input_features=feats["input_features"], is_longer=torch.zeros(3, 1, dtype=torch.bool))
        logits, scale = out.logits_per_audio.diagonal(), model.logit_scale_a.exp()
    # by hand from the forward's projected embeddings
    a = out.audio_embeds.numpy().astype(np.float64)
    t = out.text_embeds.numpy().astype(np.float64)
    hand = (a * t).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(cos.numpy(), hand, atol=1e-5)
    np.testing.assert_allclose(cos.numpy(), (logits / scale).numpy(), atol=1e-5)
    assert float(cos.std()) > 1e-3  # different clips, different scores
    scaled = ClapScorer(scorer.model, scorer.tokenizer, scorer.feature_extractor, scale="logit_scale")
    with torch.inference_mode():
        np.testing.assert_allclose(scaled.score(clips, PROMPTS, sample_rate=48000).numpy(), logits.numpy(),
                                   rtol=1e-5)


@pytest.mark.parametrize("rate", [16000, 32000, 44100])
def test_audio_at_another_rate_scores_as_the_same_sound_computed_at_48khz(tiny_clap, rate):
    scorer = load_clap_scorer(tiny_clap)
    with torch.inference_mode():
        there = scorer.score([tones(rate, rate * 3 // 4, envelope=True)], "piano", sample_rate=rate)
        here = scorer.score([tones(48000, 36000, envelope=True)], "piano", sample_rate=48000)
        other = scorer.score([noise(36000, 3)], "piano", sample_rate=48000)
    assert abs(float(there - here)) < 1e-4 < abs(float(other - here))


def test_long_clips_average_their_windows_or_keep_the_first(tiny_clap):
    scorer = load_clap_scorer(tiny_clap)  # windows of 1 s (48000 samples)
    clip = noise(120000, 4)  # 2.5 windows
    parts = [clip[:48000], clip[48000:96000], clip[96000:]]
    with torch.inference_mode():
        text = scorer.encode_text(["rain"])[0]
        emb = torch.stack([scorer.encode_audio([p])[0] for p in parts])
        pooled = (emb * torch.tensor([1.0, 1.0, 0.5])[:, None]).sum(0)
        expected = float(pooled @ text / pooled.norm())
        assert float(scorer.score([clip], "rain", sample_rate=48000)) == pytest.approx(expected, abs=1e-5)
        first = ClapScorer(scorer.model, scorer.tokenizer, scorer.feature_extractor, long_audio="first")
        assert float(first.score([clip], "rain", sample_rate=48000)) == pytest.approx(float(emb[0] @ text), abs=1e-5)
        assert abs(expected - float(emb[0] @ text)) > 1e-4


def test_scores_are_deterministic_and_batch_independent_with_a_fused_checkpoint(tiny_clap_fused):
    """The extractor marks a random clip of a batch without long clips as longer (fusion); the scorer never lets
    it, so a clip scores the same alone, in a batch and on every call."""
    scorer = load_clap_scorer(tiny_clap_fused)
    assert scorer.truncation == "fusion"
    clips = [noise(40000, 5), noise(20000, 6), tones(48000, 48000)]
    with torch.inference_mode():
        batch = [scorer.score(clips, PROMPTS, sample_rate=48000) for _ in range(3)]
        alone = torch.cat([scorer.score([c], p, sample_rate=48000) for c, p in zip(clips, PROMPTS)])
    assert all(torch.equal(batch[0], b) for b in batch[1:])
    torch.testing.assert_close(batch[0], alone, atol=1e-5, rtol=0)


def test_clap_scorer_errors(tiny_clap, tmp_path):
    scorer = load_clap_scorer(tiny_clap)
    with pytest.raises(ScorerError, match="sample_rate is required"):
        scorer.score([noise(100, 0)], "rain")
    with pytest.raises(ScorerError, match="2 clips but 3 prompts"):
        scorer.score([noise(100, 0), noise(100, 1)], PROMPTS, sample_rate=8000)
    with pytest.raises(ScorerError, match="scale must be one of"):
        ClapScorer(scorer.model, scorer.tokenizer, scorer.feature_extractor, scale="clip_score")
    with pytest.raises(ScorerError, match="long_audio must be one of"):
        ClapScorer(scorer.model, scorer.tokenizer, scorer.feature_extractor, long_audio="random")
    from mmalign.rewards.tiny import build_tiny_clip

    clip_folder = build_tiny_clip(tmp_path / "clip")
    with pytest.raises(ScorerError, match="'clip_text_model'|'clip'.*not a CLAP model"):
        load_scorer(f"clap={clip_folder}")
    assert scorer.score([], [], sample_rate=8000).shape == (0,)


def test_export_round_trip_registry_and_transformers(tiny_clap, tmp_path):
    from transformers import ClapModel, ClapProcessor

    assert scorer_kind("clap") == "audio" and scorer_kind(f"clap={tiny_clap}") == "audio"
    assert not is_differentiable("clap")
    plain = load_scorer(f"clap={tiny_clap}")  # a transformers folder without a scorer card
    assert isinstance(plain, ClapScorer) and plain.version.startswith("clap-") and plain.scale == "cosine"
    scaled = load_clap_scorer(tiny_clap, name="clap_logits", scale="logit_scale", long_audio="first")
    assert scaled.version != plain.version  # the settings are part of the version
    out = scaled.save_pretrained(tmp_path / "export")
    loaded = load_scorer(str(out))
    assert (loaded.name, loaded.scale, loaded.long_audio) == ("clap_logits", "logit_scale", "first")
    assert scorer_kind(str(out)) == "audio" and not is_differentiable(str(out))
    clips = [noise(20000, 7), noise(70000, 8)]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.score(clips, PROMPTS[:2], sample_rate=22050),
                                   scaled.score(clips, PROMPTS[:2], sample_rate=22050))
    # the export loads in transformers without mmalign
    assert isinstance(ClapModel.from_pretrained(out), ClapModel)
    processor = ClapProcessor.from_pretrained(out)
    assert processor.feature_extractor.sampling_rate == 48000


# -- the user audio hook ----------------------------------------------------------------------------------------------
def clip_rms(clips, prompts, sample_rate):
    """An audio-quality stand-in: RMS level per clip; records what it was given."""
    clip_rms.seen.append((len(clips), sample_rate, [c.shape for c in clips], [c.dtype for c in clips]))
    return [float(np.sqrt(np.mean(c.astype(np.float64) ** 2))) for c in clips]


clip_rms.modality = "audio"
clip_rms.seen = []


def rms_at_16k(clips, prompts, sample_rate):
    return [float(c.size) / sample_rate for c in clips]  # the duration in seconds, from what it received


rms_at_16k.modality = "audio"
rms_at_16k.sample_rate = 16000


def test_user_audio_functions_plug_in_as_audio_scorers():
    assert scorer_kind("test_rewards_clap:clip_rms") == "audio"
    scorer = load_scorer("test_rewards_clap:clip_rms")
    audio = torch.stack([torch.full((2, 800), 0.5), torch.zeros(2, 800)])  # (N, channels, samples)
    clip_rms.seen.clear()
    np.testing.assert_allclose(scorer.score(audio, "x", sample_rate=8000).numpy(), [0.5, 0.0], atol=1e-7)
    assert clip_rms.seen == [(2, 8000, [(800,), (800,)], [np.float32, np.float32])]
    with pytest.raises(ScorerError, match="sample_rate is required"):
        scorer.score(audio, "x")
    with pytest.raises(ScorerError, match="sample_rate"):
        scorer.score(audio, "x", sample_rate=-1)
    resampled = load_scorer("test_rewards_clap:rms_at_16k")
    np.testing.assert_allclose(resampled.score([np.zeros(8000)], "x", sample_rate=8000).numpy(), [1.0])


def test_user_function_modality_and_sample_rate_are_checked():
    from mmalign.rewards.toy import FunctionScorer

    def smell(x, p):
        return [0.0]

    smell.modality = "smell"
    with pytest.raises(ScorerError, match="modality must be 'image', 'video' or 'audio'"):
        FunctionScorer(smell, "smell")

    def image_fn(images, prompts):
        return [0.0] * len(images)

    image_fn.sample_rate = 16000
    with pytest.raises(ScorerError, match="fn.sample_rate is for audio scorers"):
        FunctionScorer(image_fn, "image_fn")
    del image_fn.sample_rate
    with pytest.raises(ScorerError, match="sample_rate is for audio scorers"):
        FunctionScorer(image_fn, "image_fn").score(torch.zeros(1, 3, 8, 8), "x", sample_rate=8000)
