"""The toy token-music world: the phrase contract and caption grammar, the ground-truth pattern / quality rewards
(checked against hand-computed values), the per-dimension annotator's calibration, and `music_pair` shards."""

from __future__ import annotations

import json
import math
import tarfile

import numpy as np
import pytest

from mmalign.toy.annotator import agreement, expected_agreement
from mmalign.toy.music import (
    CODEBOOK_SIZE,
    INSTRUMENTS,
    KEYS,
    MODES,
    NUM_CODEBOOKS,
    NUM_FRAMES,
    PATTERNS,
    SCALES,
    TIMBRE_BANDS,
    TONICS,
    Phrase,
    all_music_prompts,
    degree_code,
    music_prompt_seed_pairs,
    noisy_music_caption,
    parse_music_caption,
    render_phrases,
    sample_phrase,
    sample_phrases,
)
from mmalign.toy.music_annotator import label_music_pairs, write_music_pair_shards
from mmalign.toy.music_rewards import (
    music_quality,
    music_reward_components,
    music_rewards,
    note_sequence,
    pattern_adherence,
)

LABEL_VALUE = {"A": 1.0, "B": 0.0, "same": 0.5}


@pytest.fixture(scope="module")
def phrases() -> list[Phrase]:
    # Every prompt of the grammar, twice, with different steps / starts / timbres.
    return [sample_phrase(seed, caption=p) for seed in (0, 1) for p in all_music_prompts()]


@pytest.fixture(scope="module")
def codes(phrases) -> np.ndarray:
    return render_phrases(phrases)


def _hand_phrase() -> np.ndarray:
    """An ascending piano phrase in C major written out by hand: C D E F G A B C', codes 1 + semitones."""
    codes = np.full((NUM_CODEBOOKS, NUM_FRAMES), 5, dtype=np.int64)  # piano's timbre band is [4, 12)
    codes[0] = np.repeat([1, 3, 5, 6, 8, 10, 12, 13], 4)
    return codes


CAPTION = "a ascending piano melody in c major"


def corrupt(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomly damaged copies, each at its own severity: notes replaced by random codes (some silent), stray
    frames in codebook 0, and timbre tokens replaced by random codes."""
    out = codes.copy()
    n, k, t = out.shape
    severity = rng.random((n, 1))
    notes = rng.random((n, t // 4)) < 0.5 * severity
    out[:, 0] = np.where(np.repeat(notes, 4, 1), np.repeat(rng.integers(0, CODEBOOK_SIZE, (n, t // 4)), 4, 1),
                         out[:, 0])
    stray = rng.random((n, t)) < 0.2 * severity
    out[:, 0] = np.where(stray, rng.integers(1, CODEBOOK_SIZE, (n, t)), out[:, 0])
    timbre = rng.random((n, k - 1, t)) < 0.3 * severity[..., None]
    out[:, 1:] = np.where(timbre, rng.integers(0, CODEBOOK_SIZE, (n, k - 1, t)), out[:, 1:])
    return out


# ------------------------------------------------------------------------------------------------ phrases, captions


def test_caption_words_are_tiny_musicgen_tokens_and_parse_back(phrases):
    from mmalign.music.tiny import MUSIC_WORDS

    prompts = all_music_prompts()
    assert len(prompts) == len(set(prompts)) == len(PATTERNS) * len(INSTRUMENTS) * len(KEYS) * len(MODES) == 160
    assert {w for p in prompts for w in p.split()} <= set(MUSIC_WORDS)
    assert set(prompts[:4]) == {f"a {p} piano melody in c major" for p in PATTERNS}
    for p in phrases:
        assert parse_music_caption(p.caption) == (p.pattern, p.instrument, p.key, p.mode)
    for bad in ("a rising piano melody in c major", "a ascending piano melody in c", "an ascending piano melody "
                "in c major"):
        with pytest.raises(ValueError, match="outside the toy music grammar"):
            parse_music_caption(bad)


def test_rendered_phrases_follow_the_contract(phrases, codes):
    assert codes.shape == (len(phrases), NUM_CODEBOOKS, NUM_FRAMES) and codes.dtype == np.int64
    for p, c in zip(phrases[::37], codes[::37]):
        notes = c[0].reshape(8, 4)
        assert (notes == notes[:, :1]).all()  # each note held for its 4 frames
        pcs = (notes[:, 0] - 1) % 12
        assert set(pcs) <= {(TONICS[p.key] + s) % 12 for s in SCALES[p.mode]}
        d = np.diff(notes[:, 0])
        assert {"ascending": (d > 0).all(), "descending": (d < 0).all(), "repeating": (d == 0).all(),
                "alternating": (d != 0).all() and (d[1:] == -d[:-1]).all()}[p.pattern]
        lo, hi = TIMBRE_BANDS[p.instrument]
        assert ((c[1:] >= lo) & (c[1:] < hi)).all()
    assert codes[:, 0].min() >= 1 and codes.max() < CODEBOOK_SIZE
    # A C major scale from degree 0: C D E F G A B C' are semitones 0 2 4 5 7 9 11 12.
    np.testing.assert_array_equal(degree_code("c", "major", np.arange(8)), [1, 3, 5, 6, 8, 10, 12, 13])
    assert degree_code("g", "minor", 7) == 1 + 7 + 12
    # Deterministic from the seed.
    assert sample_phrases(20, seed=3) == sample_phrases(20, seed=3) != sample_phrases(20, seed=4)
    np.testing.assert_array_equal(render_phrases(sample_phrases(5, 3)), render_phrases(sample_phrases(5, 3)))
    with pytest.raises(ValueError, match="valid steps"):
        Phrase("ascending", "piano", "c", "major", start=0, step=-1, timbre_seed=0)
    with pytest.raises(ValueError, match="outside codes 1..63"):
        Phrase("ascending", "piano", "c", "major", start=30, step=2, timbre_seed=0)
    with pytest.raises(ValueError, match="Phrase.instrument='drums'"):
        Phrase("ascending", "drums", "c", "major", start=0, step=1, timbre_seed=0)


def test_noisy_caption_is_wrong_about_the_pattern_at_rate_p(phrases):
    rng = np.random.default_rng(0)
    picks = [phrases[i] for i in rng.integers(len(phrases), size=4000)]
    captions = [noisy_music_caption(p, rng, p_wrong=0.3) for p in picks]
    wrong = np.array([parse_music_caption(c)[0] != p.pattern for c, p in zip(captions, picks)])
    assert abs(wrong.mean() - 0.3) < 3 * math.sqrt(0.3 * 0.7 / 4000)
    assert all(parse_music_caption(c)[1:] == (p.instrument, p.key, p.mode) for c, p in zip(captions, picks))
    assert noisy_music_caption(phrases[0], 1, p_wrong=0.0) == phrases[0].caption
    assert parse_music_caption(noisy_music_caption(phrases[0], 1, p_wrong=1.0))[0] != phrases[0].pattern
    # Two draws whatever the outcome: the stream continues identically.
    r0, r1 = np.random.default_rng(5), np.random.default_rng(5)
    noisy_music_caption(phrases[0], r0, 0.0), noisy_music_caption(phrases[0], r1, 1.0)
    assert r0.random() == r1.random()


def test_prompt_seed_splits_cycle_prompts_and_never_share_seeds():
    train, held = music_prompt_seed_pairs("train", 320), music_prompt_seed_pairs("heldout", 320)
    assert [p for p, _ in train] == [p for p, _ in held] == all_music_prompts() * 2
    assert not {s for _, s in train} & {s for _, s in held}
    with pytest.raises(ValueError, match="split"):
        music_prompt_seed_pairs("test", 3)


# ---------------------------------------------------------------------------------------------------------- rewards


def test_rendered_phrases_score_one_on_their_caption_and_low_on_a_wrong_pattern(phrases, codes):
    captions = [p.caption for p in phrases]
    parts = music_reward_components(codes, captions)
    for name in ("pattern", "quality", "in_key", "sounding", "timbre"):
        np.testing.assert_array_equal(parts[name], 1.0, err_msg=name)
    for wrong in PATTERNS:
        keep = [i for i, p in enumerate(phrases) if p.pattern != wrong]
        wrong_captions = [captions[i].replace(phrases[i].pattern, wrong) for i in keep]
        # At most one step of 7 fits another pattern (a monotone line's first step "alternates").
        assert pattern_adherence(codes[keep], wrong_captions).max() <= 1 / 7 + 1e-12
        np.testing.assert_array_equal(music_quality(codes[keep], wrong_captions), 1.0)  # pattern is not quality


def test_rewards_match_hand_computed_values():
    c = _hand_phrase()
    assert music_rewards(c, CAPTION) == {"pattern": 1.0, "quality": 1.0}
    scores = {p: pattern_adherence(c, CAPTION.replace("ascending", p)) for p in PATTERNS}
    assert scores == {"ascending": 1.0, "descending": 0.0, "repeating": 0.0, "alternating": 1 / 7}
    assert music_quality(c, "a ascending violin melody in c major") == 0.0  # every timbre token off the band
    # In D major (D E F# G A B C#) the notes C, F and C' are out of key: 5 of 8 notes, 20 of 32 frames.
    assert music_reward_components(c, "a ascending piano melody in d major")["in_key"] == 20 / 32

    gap = c.copy()
    gap[:, 12:16] = 0  # note 3 silent in every codebook: steps 2 and 3 touch it
    assert music_reward_components(gap, CAPTION) == pytest.approx(
        {"pattern": 5 / 7, "quality": 28 / 32, "in_key": 1.0, "sounding": 28 / 32, "timbre": 1.0})
    stray = c.copy()
    stray[0, 20] = 11  # A# inside the held A: out of C major; the note's majority is still A
    assert music_reward_components(stray, CAPTION) == pytest.approx(
        {"pattern": 1.0, "quality": 31 / 32, "in_key": 31 / 32, "sounding": 1.0, "timbre": 1.0})
    both = gap.copy()
    both[0, 20] = 11
    both[2, 0] = 36  # one timbre token in the violin band
    assert music_reward_components(both, CAPTION) == pytest.approx(
        {"pattern": 5 / 7, "quality": 27 / 28 * 28 / 32 * 83 / 84, "in_key": 27 / 28, "sounding": 28 / 32,
         "timbre": 83 / 84})

    alt = c.copy()
    alt[0] = np.repeat([20, 24, 20, 24, 22, 24, 20, 24], 4)  # steps +4 -4 +4 -2 +2 -4 +4: steps 3 and 5 break
    assert pattern_adherence(alt, "a alternating piano melody in c major") == 5 / 7
    tie = c.copy()
    tie[0, :4] = [8, 8, 5, 5]  # a 2-2 window: the lower code is the note
    assert note_sequence(tie)[0] == 5


def test_gaps_out_of_key_tokens_and_foreign_timbre_lower_quality(phrases, codes):
    captions = [p.caption for p in phrases]
    n = len(phrases)
    rng = np.random.default_rng(0)
    gap = codes.copy()
    note = rng.integers(1, 7, size=n)  # an inner note, so that two of the 7 steps touch it
    for i, w in enumerate(note):
        gap[i, :, 4 * w : 4 * w + 4] = 0
    parts = music_reward_components(gap, captions)
    np.testing.assert_allclose(parts["quality"], 28 / 32)
    # Steps w - 1 and w touch the silent note w; an alternating line also loses step w + 1 (when there is one):
    # the swing after the gap has no step before it to mirror.
    lost = [3 if p.pattern == "alternating" and w < 6 else 2 for p, w in zip(phrases, note)]
    np.testing.assert_allclose(parts["pattern"], 1 - np.array(lost) / 7)
    stray = codes.copy()
    for i, p in enumerate(phrases):
        outside = [pc for pc in range(12) if (pc - TONICS[p.key]) % 12 not in SCALES[p.mode]]
        stray[i, 0, 4 * note[i] + 1] = 1 + 24 + outside[0]  # one out-of-key frame inside a held note
    parts = music_reward_components(stray, captions)
    np.testing.assert_allclose(parts["quality"], 31 / 32)
    np.testing.assert_array_equal(parts["pattern"], 1.0)  # the note's majority hides it from the pattern
    foreign = codes.copy()
    neighbour = [TIMBRE_BANDS[INSTRUMENTS[(INSTRUMENTS.index(p.instrument) + 1) % 4]][0] for p in phrases]
    foreign[:, 1:, :8] = np.array(neighbour)[:, None, None]  # the first 2 notes sound like another instrument
    np.testing.assert_allclose(music_quality(foreign, captions), 1 - 8 / 32)
    damaged = corrupt(codes, rng)
    q = music_quality(damaged, captions)
    assert (q <= 1).all() and q.mean() < 0.8 and (q < 1).mean() > 0.9
    batch = music_reward_components(damaged[:5], captions[:5])
    for i in range(5):
        single = music_reward_components(damaged[i], captions[i])
        assert all(isinstance(v, float) and v == batch[k][i] for k, v in single.items())


def test_bad_codes_and_captions_are_clear_errors(codes):
    caps = [CAPTION] * 2
    with pytest.raises(TypeError, match="codes must be an integer array"):
        music_rewards(codes[:2].astype(np.float32), caps)
    with pytest.raises(ValueError, match=r"\(N, 4, T\) or \(4, T\) \(K = 4 codebooks\), got shape \(2, 3, 32\)"):
        music_rewards(codes[:2, :3], caps)
    with pytest.raises(ValueError, match="multiple of 4"):
        music_rewards(codes[:2, :, :30], caps)
    bad = codes[:2].copy()
    bad[1, 2, 7] = 64
    with pytest.raises(ValueError, match="sample 1 codebook 2 frame 7 holds code 64, outside the codebook 0..63"):
        music_rewards(bad, caps)
    with pytest.raises(ValueError, match="got 2 phrases in codes but 1 captions"):
        music_rewards(codes[:2], caps[:1])
    with pytest.raises(ValueError, match=r"captions\[1\]: caption 'a blue melody'"):
        music_rewards(codes[:2], [CAPTION, "a blue melody"])
    with pytest.raises(TypeError, match="one \\(K, T\\) phrase takes one caption string"):
        music_rewards(codes[0], caps)


# ----------------------------------------------------------------------------------------------- annotator, shards


def test_annotator_agrees_with_the_ground_truth_at_the_rate_its_temperature_implies(phrases, codes):
    rng = np.random.default_rng(1)
    idx = rng.integers(len(phrases), size=4000)
    captions = [phrases[i].caption for i in idx]
    a, b = corrupt(codes[idx], rng), corrupt(codes[idx], rng)
    ra, rb = music_rewards(a, captions), music_rewards(b, captions)
    temperature, margin = {"pattern": 0.05, "quality": 0.1}, 0.02
    labels = label_music_pairs(ra, rb, rng=2, temperature=temperature, tie_margin=margin)
    for d in ("pattern", "quality"):
        lab = np.array([LABEL_VALUE[x[d]] for x in labels])
        gap = np.abs(ra[d] - rb[d])
        np.testing.assert_array_equal(lab == 0.5, gap <= margin)  # ties exactly inside the margin
        scored = gap > margin
        measured = agreement(lab, ra[d], rb[d], tie_margin=margin)
        expected = expected_agreement(ra[d], rb[d], temperature=temperature[d], tie_margin=margin)
        p = 0.5 * (1 + np.tanh(0.5 * gap[scored] / temperature[d]))
        se = math.sqrt((p * (1 - p)).sum()) / scored.sum()
        assert scored.sum() > 1000 and 0.8 < expected < 0.995, (d, scored.sum(), expected)
        assert abs(measured - expected) < 3 * se, (d, measured, expected, se)
    assert labels == label_music_pairs(ra, rb, rng=2, temperature=temperature, tie_margin=margin)
    with pytest.raises(ValueError, match="missing"):
        label_music_pairs({"pattern": [1.0]}, {"pattern": [0.0]}, rng=0)


def test_music_pair_shards_round_trip_codes_bit_exact(tmp_path, phrases, codes):
    from mmalign.data import MusicPairDataset, validate_shards

    n = 6
    prompts = [p.caption for p in phrases[:n]]
    a = codes[:n]
    b = corrupt(a, np.random.default_rng(3))
    b[2], b[4], b[5] = a[2], a[4], a[5]  # pair 2: identical sides, a tie on both dimensions, dropped
    b[4, 0] = a[4, 0][::-1]  # an ascending melody reversed: same quality, wrong pattern
    b[5, 0, :4] = 0  # a silent first note: A wins pattern and quality
    ra, rb = music_rewards(a, prompts), music_rewards(b, prompts)
    labels = label_music_pairs(ra, rb, rng=0, temperature=0.0)
    assert labels[2] == {"pattern": "same", "quality": "same"} and labels[4]["quality"] == "same"
    manifest = write_music_pair_shards(tmp_path / "mp", a, b, prompts, labels, rewards_a=ra, rewards_b=rb)
    ties = sum(lab["pattern"] == "same" for lab in labels)
    assert manifest.num_samples == n - ties and manifest.conversion["ties_dropped"] == ties >= 1
    assert validate_shards(tmp_path / "mp").ok
    kept = [i for i in range(n) if labels[i]["pattern"] != "same"]
    samples = list(MusicPairDataset(tmp_path / "mp"))
    assert [s["prompt"] for s in samples] == [prompts[i] for i in kept]
    for i, s in zip(kept, samples):
        win, lose = (a[i], b[i]) if labels[i]["pattern"] == "A" else (b[i], a[i])
        np.testing.assert_array_equal(s["chosen_codes"].numpy(), win)
        np.testing.assert_array_equal(s["rejected_codes"].numpy(), lose)
        assert s["chosen_codes"].numpy().dtype == s["rejected_codes"].numpy().dtype == np.int64
    with tarfile.open(next((tmp_path / "mp").glob("*.tar"))) as tar:
        metas = {m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
                 for m in tar.getmembers() if m.name.endswith(".json")}
    assert sorted(metas) == [f"toymusic-{i:09d}" for i in kept]
    meta = metas["toymusic-000000004"]
    assert meta["labels"] == {"pattern": "chosen", "quality": "same"} and meta["decided_by"] == "pattern"
    assert meta["frame_rate"] == 50.0
    assert meta["scores_chosen"] == {"pattern": 1.0, "quality": 1.0}
    assert meta["scores_rejected"]["pattern"] == pytest.approx(float(rb["pattern"][4]))
    with pytest.raises(ValueError, match="codes_b: sample 0 codebook 0 frame 0 holds code -1"):
        write_music_pair_shards(tmp_path / "bad", a, np.full_like(a, -1), prompts, labels)
    with pytest.raises(ValueError, match="decide_by"):
        write_music_pair_shards(tmp_path / "bad", a, b, prompts, labels, decide_by="timbre")
