"""Training `task: music` end to end on the tiny MusicGen (assets/tiny/musicgen): a run stopped and resumed logs the
same losses and ends with the same LoRA as one that ran straight through; RWR trains on both sides of each pair
weighted by the rewards stored in the shards (and names the field when they are missing); one sample with codes
outside the vocabulary and one with the wrong number of codebooks in a long run are skipped and counted, or named in
strict mode; the RWR LoRA loads back with peft."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import DataError, train

RECIPE = "configs/tiny/music_dpo.yaml"
MUSICGEN = "assets/tiny/musicgen"  # 4 codebooks of 64 codes
BAD_VOCAB, BAD_K = "m-003", "m-008"


def _cfg(tmp_path, folder, *overrides):
    return load_train_config(RECIPE, [f"run.output_dir={tmp_path / folder}", "train.progress=false", *overrides])


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _write_pairs(out, n=12, bad=(), reward=True):
    """n toy pairs (4 codebooks, 5..8 frames); the chosen side ascending codes with reward 1, the rejected random
    codes with reward 0 (json `reward`, as selfgen music writes it). `BAD_VOCAB`'s rejected codes hold 64 (the
    start token, not a code); `BAD_K`'s codes have 3 codebooks."""
    from mmalign.data import ShardSetWriter
    from mmalign.data.schemas import music_pair_sample

    g = np.random.default_rng(0)
    with ShardSetWriter(out, "music_pair") as w:
        for i in range(n):
            key, t = f"m-{i:03d}", 5 + i % 4
            chosen = np.tile(np.arange(t) * 3 % 64, (4, 1))
            rejected = g.integers(0, 64, (4, t))
            if key == BAD_VOCAB and key in bad:
                rejected[2, 1] = 64
            if key == BAD_K and key in bad:
                chosen, rejected = chosen[:3], rejected[:3]
            extra = {"reward": {"chosen": 1.0, "rejected": 0.0}} if reward else {}
            w.write(music_pair_sample(key, chosen, rejected, prompt="an ascending piano melody", **extra))
    return str(out)


def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one_bit_exactly(tmp_path):
    """The music step draws no randomness (teacher-forced, dropout off) and the reader's position is in the
    checkpoint: 2 steps, a checkpoint, 2 more from it == 4 straight, bit for bit (losses and LoRA weights)."""
    common = ["train.checkpoint_every=2", "train.batch_size=4"]
    straight = train(_cfg(tmp_path, "a", *common, "train.max_steps=4"))
    first = train(_cfg(tmp_path, "b", *common, "train.max_steps=2"))
    assert first.global_step == 2 and (tmp_path / "b" / "checkpoints").is_dir()
    resumed = train(_cfg(tmp_path, "b", *common, "train.max_steps=4", "run.resume=latest"))
    assert resumed.global_step == 4
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 4 and b == a  # float equality of every logged loss
    assert a[0] == pytest.approx(math.log(2), abs=1e-6) and a[-1] != a[0]  # it trained
    trained = 0
    for (name, x), y in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(x, y), name
        trained += "lora_B" in name and bool(x.abs().sum() > 0)
    assert trained > 0  # the LoRA moved from zero, identically in both runs


def test_stored_rewards_reads_selfgen_and_toy_world_fields_and_names_what_is_missing():
    from mmalign.data.schemas import MusicPairMeta
    from mmalign.music.task import stored_rewards

    selfgen = MusicPairMeta(prompt="p", reward={"chosen": 0.8, "rejected": -0.2},
                            scores={"chosen": {"clap": 0.5, "q/x": 2.0}, "rejected": {"clap": 0.1, "q/x": 4.0}})
    assert stored_rewards(selfgen) == (0.8, -0.2)
    assert stored_rewards(selfgen, {"clap": 2.0, "q/x": 0.5}) == pytest.approx((2.0, 2.2))
    toy = MusicPairMeta(prompt="p", scores_chosen={"pattern": 1.0, "quality": 0.5},
                        scores_rejected={"pattern": 0.25, "quality": 1.0})
    assert stored_rewards(toy, {"pattern": 1.0, "quality": 0.5}) == pytest.approx((1.25, 0.75))
    with pytest.raises(ValueError, match=r"no field `reward` .*holds \['scores_chosen', 'scores_rejected'\]"):
        stored_rewards(toy)
    with pytest.raises(ValueError, match=r"scores_chosen has no column 'clap' of method.reward_weights"):
        stored_rewards(toy, {"clap": 1.0})
    with pytest.raises(ValueError, match=r"reward.rejected must be a finite number, got nan"):
        stored_rewards(MusicPairMeta(prompt="p", reward={"chosen": 1.0, "rejected": float("nan")}))


def test_rwr_weights_both_sides_by_their_stored_rewards_and_its_lora_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    from mmalign.music.adapter import load_music

    shards = _write_pairs(tmp_path / "pairs", n=8)
    over = [f"data.shards={shards}", "data.shuffle_buffer=0", "method.name=rwr", "method.temperature=0.5",
            "train.max_steps=6", "train.checkpoint_every=0", "optim.lr=1e-2"]
    result = train(_cfg(tmp_path, "rwr", *over))
    rows = [json.loads(line) for line in (tmp_path / "rwr" / "metrics.jsonl").read_text().splitlines()]

    # step 1 by hand: the LoRA starts at zero, so the policy is the base model; items = [4 chosen; 4 rejected]
    base = load_music(MUSICGEN)
    from mmalign.data.collate import collate_music_pairs
    from mmalign.music.codes import CheckedMusicPairDataset

    batch = collate_music_pairs(list(CheckedMusicPairDataset(shards, num_codebooks=4, vocab_size=64,
                                                             shuffle=False))[:4], pad_value=base.start_token_id)
    with torch.no_grad():
        lp = base.logps(base.model, base.encode(batch["prompts"] * 2, batch["codes"], batch["codes_mask"]))
    nll = (-lp.sum / lp.count).double()  # sft_reduction mean: per-token NLL of each of the 8 items
    rewards = torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64)
    w = torch.softmax(rewards / 0.5, 0) * 8
    assert rows[0]["loss"] == pytest.approx(float((w * nll).mean()), rel=1e-5)
    assert rows[0]["nll/policy"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert rows[0]["rewards/mean"] == pytest.approx(0.5)
    assert rows[0]["rwr/weight_max"] == pytest.approx(float(w.max()), rel=1e-6)
    assert rows[0]["tokens/chosen"] == pytest.approx(float(lp.count[:4].float().mean()))

    # the LoRA reloads with peft and scores as the trained module; the high-reward (chosen) codes gained more
    # log-probability per code than the low-reward ones
    loaded = PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained(MUSICGEN),
                                       result.outputs["lora"]).eval()
    inputs = base.encode(batch["prompts"] * 2, batch["codes"], batch["codes_mask"])
    with torch.no_grad():
        trained = base.logps(result.module.eval(), inputs)
        torch.testing.assert_close(base.logps(loaded, inputs).sum, trained.sum, rtol=0, atol=1e-4)
    gain = (trained.sum - lp.sum) / lp.count
    # measured: chosen +0.10..+0.12 nats per code, rejected -0.02..-0.01
    assert (gain[:4] > 0.05).all() and gain[:4].min() > gain[4:].max() + 0.05


def test_rwr_on_shards_without_rewards_names_the_field_and_the_sample(tmp_path):
    with pytest.raises(DataError, match=r"method rwr: data.shards: sample 'toy-0000\d\d': no field `reward` "
                                        r"\{\"chosen\": R, \"rejected\": R\}"):
        train(_cfg(tmp_path, "norw", "method.name=rwr", "train.max_steps=1", "train.checkpoint_every=0"))
    with pytest.raises(DataError, match=r"sample 'toy-0000\d\d': no per-column scores for the chosen side"):
        train(_cfg(tmp_path, "norw2", "method.name=rwr", "method.reward_weights.pattern=1.0", "train.max_steps=1",
                   "train.checkpoint_every=0"))
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="method.reward_weights is read by method 'rwr' only"):
        _cfg(tmp_path, "dpo", "method.reward_weights.pattern=1.0")


def test_one_bad_sample_of_each_kind_in_a_long_run_is_skipped_and_counted_or_named_in_strict_mode(tmp_path, caplog):
    from mmalign.data.dataset import CorruptSampleError

    shards = _write_pairs(tmp_path / "pairs", bad=(BAD_VOCAB, BAD_K))
    over = [f"data.shards={shards}", "data.shuffle_buffer=0", "train.batch_size=2", "train.max_steps=10",
            "train.checkpoint_every=0"]
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        result = train(_cfg(tmp_path, "run", *over))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 10 good pairs = 5 micro-batches of 2 per pass; 10 steps = 2 passes, each bad sample read (and skipped) twice
    assert result.global_step == 10 and all(np.isfinite(r["loss"]) for r in rows) and result.nonfinite_steps == 0
    assert result.skipped_samples == rows[-1]["skipped_samples"] == 4
    assert [r["skipped_samples"] for r in rows[:5]] == [0, 1, 1, 2, 2]  # counted at the micro-batch that passed them
    assert BAD_VOCAB not in result.keys_seen and BAD_K not in result.keys_seen and len(set(result.keys_seen)) == 10
    assert not any(k.startswith("skipped/") for k in rows[-1])  # the reader dropped them: no batch was dropped
    reasons = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert sum(f"'{BAD_VOCAB}'" in m and "(decode): rejected codes: codebook 2 frame 1 holds code 64" in m
               for m in reasons) == 2
    assert sum(f"'{BAD_K}'" in m and "(decode): chosen codes: codes have 3 codebooks, the model generates 4" in m
               for m in reasons) == 2

    with pytest.raises(CorruptSampleError, match=f"sample '{BAD_VOCAB}': rejected codes: codebook 2 frame 1 holds "
                                                 "code 64, outside the codebook vocabulary 0..63"):
        train(_cfg(tmp_path, "strict", *over, "data.strict=true"))
    only_k = _write_pairs(tmp_path / "only_k", bad=(BAD_K,))
    with pytest.raises(CorruptSampleError, match=f"sample '{BAD_K}': chosen codes: codes have 3 codebooks"):
        train(_cfg(tmp_path, "strict_k", *over[1:], f"data.shards={only_k}", "data.strict=true"))
