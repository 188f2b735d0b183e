"""`selfgen music`: N MusicGen samples per prompt, decoded and scored by weighted audio rewards (a tiny CLAP and user
functions), best vs worst written as `music_pair` shards; codes round-trip bit-exactly, resume gives the same
shards, the pair is chosen by the weighted reward."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.data.dataset import MusicPairDataset
from mmalign.music.adapter import load_music
from mmalign.rewards import load_scorer
from mmalign.selfgen.common import sample_seed
from mmalign.selfgen.music import build_music_pairs

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "musicgen"
PROMPTS = ["an ascending piano melody", "loud drums", "a calm violin tune"]
FRAMES, N, SEED = 10, 3, 5


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory):
    """The shipped tiny MusicGen with random EnCodec codebook vectors: its codebooks are all zeros (the quantizer's
    buffers are never initialised), so every code would decode to the same audio and no reward could tell samples
    apart."""
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(ASSET)
    gen = torch.Generator().manual_seed(0)
    for layer in model.audio_encoder.quantizer.layers:
        layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=gen))
    out = tmp_path_factory.mktemp("music") / "musicgen"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ASSET).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    from mmalign.rewards.tiny import build_tiny_clap

    return str(build_tiny_clap(tmp_path_factory.mktemp("clap") / "clap"))


def loudness(clips, prompts, sample_rate):
    """RMS level of each clip; fails on call number `loudness.fail_at` (1-based) to interrupt a run."""
    loudness.calls += 1
    if loudness.calls == loudness.fail_at:
        raise RuntimeError("interrupted")
    return [float(np.sqrt(np.mean(np.square(c, dtype=np.float64)))) for c in clips]


loudness.modality = "audio"
loudness.calls, loudness.fail_at = 0, None


def flat(clips, prompts, sample_rate):
    return [0.25] * len(clips)


flat.modality = "audio"


def _shard_members(folder) -> dict[str, bytes]:
    out = {}
    for tar in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar) as t:
            out.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    return out


def _rewards(clap):
    return [{"scorer": "test_selfgen_music:loudness", "weight": 1.0}, {"scorer": f"clap={clap}", "weight": 0.5}]


def test_pairs_are_best_and_worst_by_weighted_reward_and_codes_round_trip_bit_exactly(musicgen, tiny_clap, tmp_path):
    adapter = load_music(musicgen)
    loudness.calls, loudness.fail_at = 0, None
    manifest = build_music_pairs(adapter, PROMPTS, _rewards(tiny_clap), tmp_path / "out", n=N, frames=FRAMES,
                                 seed=SEED, progress=False)
    assert manifest.schema_name == "music_pair" and manifest.num_samples == len(PROMPTS)
    assert not (tmp_path / "out" / ".staging").exists()
    conv = manifest.conversion
    assert conv["counts"] == {"pairs": 3, "no_gap": 0} and conv["sample_rate"] == 8000
    assert conv["rewards"]["clap"]["weight"] == 0.5

    members = _shard_members(tmp_path / "out")
    samples = list(MusicPairDataset(tmp_path / "out"))
    assert [s["prompt"] for s in samples] == PROMPTS
    rms, clap = load_scorer("test_selfgen_music:loudness"), load_scorer(f"clap={tiny_clap}")
    for i, s in enumerate(samples):
        meta = json.loads(members[f"{i:09d}.json"])
        seeds = [sample_seed(SEED, i, j) for j in range(N)]
        # the N candidates, regenerated one by one from their seeds, decoded and scored independently
        codes = torch.cat([adapter.generate([PROMPTS[i]], frames=FRAMES, seed=sd) for sd in seeds])
        with torch.inference_mode():
            audio = adapter.decode_audio(codes)
            raw = {"loudness": rms.score(audio, "", sample_rate=8000).double(),
                   "clap": clap.score(audio, PROMPTS[i], sample_rate=8000).double()}
        reward = raw["loudness"] + 0.5 * raw["clap"]
        best, worst = int(reward.argmax()), int(reward.argmin())
        assert best != worst and meta["candidates"] == {"n": N, "chosen": best, "rejected": worst}
        # the stored codes are the generated ones, bit for bit, as int64 (K, T)
        assert s["chosen_codes"].dtype == torch.int64 and s["chosen_codes"].shape == (4, FRAMES)
        assert torch.equal(s["chosen_codes"], codes[best]) and torch.equal(s["rejected_codes"], codes[worst])
        assert np.load(io.BytesIO(members[f"{i:09d}.chosen.npy"])).dtype == np.int64
        assert meta["seeds"] == {"chosen": seeds[best], "rejected": seeds[worst]}
        for side, j in (("chosen", best), ("rejected", worst)):
            assert meta["scores"][side]["test_selfgen_music:loudness"] == pytest.approx(float(raw["loudness"][j]),
                                                                                        abs=1e-6)
            assert meta["scores"][side]["clap"] == pytest.approx(float(raw["clap"][j]), abs=1e-6)
            assert meta["reward"][side] == pytest.approx(float(reward[j]), abs=1e-6)
        assert meta["reward"]["chosen"] > meta["reward"]["rejected"]
        assert meta["provenance"] == {"origin": "self", "generator": musicgen}
        assert (meta["codec"], meta["frame_rate"], meta["sample_rate"]) == ("encodec", 50.0, 8000)


def test_resume_gives_the_same_shards_and_is_keyed_on_the_inputs(musicgen, tiny_clap, tmp_path):
    adapter = load_music(musicgen)
    rewards = _rewards(tiny_clap)
    loudness.calls, loudness.fail_at = 0, None
    build_music_pairs(adapter, PROMPTS, rewards, tmp_path / "whole", n=N, frames=FRAMES, seed=SEED, progress=False)
    out = tmp_path / "resumed"
    loudness.calls, loudness.fail_at = 0, 2  # dies while scoring the second prompt
    with pytest.raises(RuntimeError, match="interrupted"):
        build_music_pairs(adapter, PROMPTS, rewards, out, n=N, frames=FRAMES, seed=SEED, progress=False)
    staged = sorted(p.name for p in (out / ".staging").iterdir())
    assert staged == ["000000000.json", "000000000.npy", "run.json"] and not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"other seed \(5 -> 6\)"):
        build_music_pairs(adapter, PROMPTS, rewards, out, n=N, frames=FRAMES, seed=6, progress=False)
    with pytest.raises(ValueError, match="other sampling settings"):
        build_music_pairs(adapter, PROMPTS, rewards, out, n=N, frames=FRAMES, temperature=0.5, seed=SEED,
                          progress=False)
    loudness.calls, loudness.fail_at = 0, None
    build_music_pairs(adapter, PROMPTS, rewards, out, n=N, frames=FRAMES, seed=SEED, progress=False)
    assert loudness.calls == len(PROMPTS) - 1  # the staged prompt was not generated nor scored again
    whole, resumed = _shard_members(tmp_path / "whole"), _shard_members(out)
    assert whole.keys() == resumed.keys() and all(whole[k] == resumed[k] for k in whole)


def test_z_normalised_rewards_and_ties(musicgen, tiny_clap, tmp_path):
    adapter = load_music(musicgen)
    loudness.calls, loudness.fail_at = 0, None
    # with z-normalisation per prompt, clap weighted 1 and loudness 1 count equally whatever their scales
    build_music_pairs(adapter, PROMPTS[:2], [f"clap={tiny_clap}", "test_selfgen_music:loudness"], tmp_path / "z",
                      n=N, frames=FRAMES, seed=SEED, normalize="z", progress=False)
    members = _shard_members(tmp_path / "z")
    clap, rms = load_scorer(f"clap={tiny_clap}"), load_scorer("test_selfgen_music:loudness")
    for i in range(2):
        codes = torch.cat([adapter.generate([PROMPTS[i]], frames=FRAMES, seed=sample_seed(SEED, i, j))
                           for j in range(N)])
        with torch.inference_mode():
            audio = adapter.decode_audio(codes)
            cols = [clap.score(audio, PROMPTS[i], sample_rate=8000).double(),
                    rms.score(audio, "", sample_rate=8000).double()]
        z = sum((c - c.mean()) / c.std(unbiased=False) for c in cols)
        meta = json.loads(members[f"{i:09d}.json"])
        assert meta["candidates"]["chosen"] == int(z.argmax()) and meta["candidates"]["rejected"] == int(z.argmin())
        assert meta["reward"]["chosen"] == pytest.approx(float(z.max()), abs=1e-6)
    # a reward that cannot tell the samples apart gives no pairs: dropped and counted
    manifest = build_music_pairs(adapter, PROMPTS[:2], ["test_selfgen_music:flat"], tmp_path / "ties", n=N,
                                 frames=FRAMES, seed=SEED, progress=False)
    assert manifest.num_samples == 0 and manifest.conversion["counts"] == {"pairs": 0, "no_gap": 2}


def test_bad_inputs_are_refused_before_generating(musicgen, tmp_path):
    adapter = load_music(musicgen)
    with pytest.raises(ValueError, match="scores images; music samples are scored as audio"):
        build_music_pairs(adapter, PROMPTS, ["toy_color"], tmp_path / "a", n=N, frames=FRAMES, progress=False)
    with pytest.raises(ValueError, match="n must be >= 2"):
        build_music_pairs(adapter, PROMPTS, ["test_selfgen_music:flat"], tmp_path / "b", n=1, frames=FRAMES,
                          progress=False)
    with pytest.raises(ValueError, match="normalize"):
        build_music_pairs(adapter, PROMPTS, ["test_selfgen_music:flat"], tmp_path / "c", n=N, frames=FRAMES,
                          normalize="rank", progress=False)


def test_cli(musicgen, tiny_clap, tmp_path, capsys):
    from mmalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    loudness.calls, loudness.fail_at = 0, None
    rc = main(["selfgen", "music", "--model", musicgen, "--prompts", str(prompts), "--out", str(tmp_path / "out"),
               "--rewards", f"clap={tiny_clap}:0.5,test_selfgen_music:loudness", "--n", "2", "--duration", "0.2",
               "--seed", "3", "--limit", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "2 pairs (best vs worst of 2) from 2 prompts" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["conversion"]["sampling"]["frames"] == 10  # 0.2 s at 50 frames per second
    assert manifest["conversion"]["rewards"]["clap"]["weight"] == 0.5
    rc = main(["selfgen", "music", "--model", musicgen, "--prompts", str(prompts), "--out", str(tmp_path / "bad"),
               "--rewards", "toy_color", "--no-progress"])
    assert rc == 2 and "music samples are scored as audio" in capsys.readouterr().err


def test_ranked_lists_hold_every_sample_with_the_rewards_the_pairs_are_chosen_by(musicgen, tiny_clap, tmp_path):
    from mmalign.data.dataset import MusicRankedDataset

    adapter = load_music(musicgen)
    loudness.calls, loudness.fail_at = 0, None
    build_music_pairs(adapter, PROMPTS[:2], _rewards(tiny_clap), tmp_path / "pairs", n=N, frames=FRAMES, seed=SEED,
                      progress=False)
    ranked = build_music_pairs(adapter, PROMPTS[:2], _rewards(tiny_clap), tmp_path / "ranked", n=N, frames=FRAMES,
                               seed=SEED, progress=False, ranked=True)
    assert ranked.schema_name == "music_ranked" and ranked.conversion["counts"] == {"lists": 2, "no_gap": 0}
    members = _shard_members(tmp_path / "pairs")
    for i, (lst, pair) in enumerate(zip(MusicRankedDataset(tmp_path / "ranked"), MusicPairDataset(tmp_path / "pairs"))):
        meta = json.loads(members[f"{i:09d}.json"])
        assert len(lst["codes"]) == N
        for j, sd in enumerate(sample_seed(SEED, i, j) for j in range(N)):
            assert torch.equal(lst["codes"][j], adapter.generate([PROMPTS[i]], frames=FRAMES, seed=sd)[0])
        best, worst = int(lst["scores"].argmax()), int(lst["scores"].argmin())
        assert (best, worst) == (meta["candidates"]["chosen"], meta["candidates"]["rejected"])
        assert lst["scores"][best].item() == pytest.approx(meta["reward"]["chosen"], abs=1e-6)
        assert torch.equal(lst["codes"][best], pair["chosen_codes"])
