"""RankDPO on music tokens: `music_ranked` shards (N code arrays of one prompt with their scores), written by
`selfgen music --ranked` with the same samples and rewards as its pairs, read back bit-exactly, validated, and
trained with `task: music` method rankdpo (first loss ln 2, the surrogates of every item of a list, a list with
codes the model cannot score skipped and counted)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmalign.data import ShardSetWriter
from mmalign.data.schemas import SampleError, check_sample, music_ranked_sample
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

RECIPE = "configs/tiny/music_dpo.yaml"
MUSICGEN = "assets/tiny/musicgen"  # 4 codebooks of 64 codes


def _write_lists(out, n_lists=6, items=3, bad_key=None):
    g = np.random.default_rng(0)
    with ShardSetWriter(out, "music_ranked") as w:
        for i in range(n_lists):
            key = f"r-{i:03d}"
            codes = [g.integers(0, 64, (4, 5 + (i + j) % 3)) for j in range(items)]
            if key == bad_key:
                codes[1][0, 2] = 64  # the start token, not a code
            w.write(music_ranked_sample(key, codes, prompt="an ascending piano melody",
                                        scores=[float((i + j) % items) for j in range(items)], scorers=["test"]))
    return str(out)


def test_schema_round_trip_and_refusals(tmp_path):
    from mmalign.data.collate import collate_music_ranked
    from mmalign.data.dataset import MusicRankedDataset
    from mmalign.data.validate import validate_shards

    _write_lists(tmp_path / "lists")
    samples = list(MusicRankedDataset(str(tmp_path / "lists"), shuffle=False, rank=0, world_size=1))
    assert len(samples) == 6 and len(samples[0]["codes"]) == 3 and samples[0]["codes"][0].dtype == torch.int64
    assert samples[1]["scores"].tolist() == [1.0, 2.0, 0.0]
    batch = collate_music_ranked(samples[:2], pad_value=64)
    assert batch["items"] == 3 and batch["codes"].shape == (6, 4, 7) and batch["scores"].shape == (2, 3)
    # item-major rows: row j*B + b is item j of list b, padded with the pad value past its frames
    t = samples[1]["codes"][2].shape[1]
    assert torch.equal(batch["codes"][2 * 2 + 1, :, :t], samples[1]["codes"][2])
    assert (batch["codes"][2 * 2 + 1, :, t:] == 64).all() and batch["codes_mask"][5].sum() == t
    assert validate_shards(tmp_path / "lists").ok

    good = music_ranked_sample("k", [np.zeros((4, 3), np.int64)] * 2, prompt="p", scores=[1.0, 0.0])
    files = {suffix: data for suffix, data in good.items() if suffix != "__key__"}
    check_sample("music_ranked", files)
    with pytest.raises(SampleError, match="2 code arrays but 3 scores"):
        music_ranked_sample("k", [np.zeros((4, 3), np.int64)] * 2, prompt="p", scores=[1.0, 0.0, 2.0])
    with pytest.raises(SampleError, match="same number of codebooks"):
        music_ranked_sample("k", [np.zeros((4, 3), np.int64), np.zeros((3, 3), np.int64)], prompt="p",
                            scores=[1.0, 0.0])
    one = {k: v for k, v in files.items() if k != "1.npy"}
    with pytest.raises(SampleError, match="N >= 2 code arrays"):
        check_sample("music_ranked", one)
    meta = json.loads(files["json"])
    meta["scores"] = [1.0, 0.0, 3.0]
    with pytest.raises(SampleError, match="scores has 3 entries but the sample has 2 code arrays"):
        check_sample("music_ranked", {**files, "json": json.dumps(meta).encode()})
    uneven = _write_lists(tmp_path / "uneven", n_lists=1, items=2)
    longer = list(MusicRankedDataset(str(tmp_path / "lists"), shuffle=False, rank=0, world_size=1))[:1]
    with pytest.raises(ValueError, match="same number of items N"):
        collate_music_ranked(longer + list(MusicRankedDataset(uneven, shuffle=False, rank=0, world_size=1)))


def test_rankdpo_trains_from_ln2_on_item_major_surrogates_and_skips_a_bad_list(tmp_path):
    from mmalign.train.metrics import read_metrics

    shards = _write_lists(tmp_path / "lists", n_lists=8, bad_key="r-004")
    cfg = load_train_config(RECIPE, [f"run.output_dir={tmp_path / 'run'}", "train.progress=false",
                                     "method.name=rankdpo", f"data.shards={shards}", "train.batch_size=2",
                                     "train.max_steps=4", "train.log_every=1", "data.shuffle_buffer=0"])
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the LoRA starts at zero: policy == reference
    assert rows[0]["ranked/num_pairs"] == 2 * 3  # 3 items with distinct scores: 3 ordered pairs per list
    assert rows[-1]["loss"] != rows[0]["loss"] and "logps/policy" in rows[0]
    assert result.skipped_samples == 1  # r-004 holds code 64 in its item 1: skipped and counted

    strict = load_train_config(RECIPE, [f"run.output_dir={tmp_path / 'strict'}", "train.progress=false",
                                        "method.name=rankdpo", f"data.shards={shards}", "train.batch_size=2",
                                        "train.max_steps=4", "data.shuffle_buffer=0", "data.strict=true"])
    with pytest.raises(Exception, match="r-004.*item 1 codes"):
        train(strict)


def test_rankdpo_surrogates_are_the_per_item_log_probs(tmp_path):
    from mmalign.data.collate import collate_music_ranked
    from mmalign.data.dataset import MusicRankedDataset
    from mmalign.music.adapter import load_music
    from mmalign.music.task import MusicMethodConfig, music_preference_loss

    shards = _write_lists(tmp_path / "lists", n_lists=2, items=3)
    samples = list(MusicRankedDataset(shards, shuffle=False, rank=0, world_size=1))
    adapter = load_music(MUSICGEN, reference="copy")
    batch = collate_music_ranked(samples, pad_value=adapter.start_token_id)
    s = adapter.surrogates(adapter.model, batch)
    assert s.policy.shape == (3, 2)
    for b, sample in enumerate(samples):
        for j, codes in enumerate(sample["codes"]):
            one = adapter.logps(adapter.model, adapter.encode([sample["prompt"]], codes[None])).sum[0]
            assert s.policy[j, b].item() == pytest.approx(one.item(), abs=1e-4)
    loss, metrics = music_preference_loss(adapter, batch, MusicMethodConfig(name="rankdpo"))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["ranked/num_pairs"] == 6


def test_rankdpo_config_refusals_name_the_key(tmp_path):
    from mmalign.config import ConfigError

    pairs = "assets/tiny/music_pairs"
    with pytest.raises((ConfigError, ValueError), match="loss_type sigmoid"):
        load_train_config(RECIPE, ["method.name=rankdpo", "method.loss_type=ipo"])
    with pytest.raises((ConfigError, ValueError), match="precomputed"):
        load_train_config(RECIPE, ["method.name=rankdpo", "model.reference=precomputed"])
    cfg = load_train_config(RECIPE, [f"run.output_dir={tmp_path / 'run'}", "method.name=rankdpo",
                                     f"data.shards={pairs}"])
    with pytest.raises(Exception, match="reads music_ranked shards"):
        train(cfg)
