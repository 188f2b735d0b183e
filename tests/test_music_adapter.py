"""MusicGen adapter and task: the delay-pattern log-probability equals the probability `generate` gave the same codes
step by step; pads and delay positions are never scored; the surrogate is a sum with the right counts; ln 2 at policy
== reference; bad codes are errors naming the sample or are skipped and counted; the tiny recipe trains and its LoRA
loads back with peft."""

import math

import numpy as np
import pytest
import torch

from mmalign.methods import preference_loss
from mmalign.music.adapter import code_logps, delayed_sequence, load_music
from mmalign.music.codes import MusicCodesError

PROMPTS = ["an ascending piano melody", "drums", "a calm violin tune in c minor"]
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory):
    from mmalign.music.tiny import build_tiny_musicgen

    return str(build_tiny_musicgen(tmp_path_factory.mktemp("music") / "musicgen"))


@pytest.fixture(scope="module")
def musicgen_decoder(tmp_path_factory):
    from mmalign.music.tiny import build_tiny_musicgen_decoder

    return str(build_tiny_musicgen_decoder(tmp_path_factory.mktemp("music") / "decoder"))


class _Record:
    """Keeps the last input_ids generate shows its stopping criteria: every sampled token, delayed."""

    def __call__(self, input_ids, scores, **kwargs):
        self.ids = input_ids.clone()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _generate_with_logits(adapter, prompts, new_tokens, seed):
    """generate(do_sample, guidance 1, no top-k) with its per-step logits and scores; returns (codes (B, K, T) as
    generate's own code strips the delay pattern, the delayed ids (B*K, L), the pattern (B*K, L), the step logits
    (B*K, L - 1, V))."""
    from transformers import DynamicCache, EncoderDecoderCache, StoppingCriteriaList

    model, dec, pad = adapter.model, adapter.decoder, adapter.start_token_id
    text = adapter.encode_text(prompts)
    record = _Record()
    kwargs = dict(do_sample=True, guidance_scale=1.0, top_k=0, max_new_tokens=new_tokens, output_logits=True,
                  output_scores=True, return_dict_in_generate=True, num_return_sequences=1,
                  stopping_criteria=StoppingCriteriaList([record]))
    torch.manual_seed(seed)
    if adapter.kind == "musicgen":
        out = model.generate(input_ids=text["input_ids"], attention_mask=text["attention_mask"], **kwargs)
    else:  # the decoder alone, fed the text encoder's states (and the cache layout its cross-attention needs)
        start = torch.full((len(prompts) * adapter.num_codebooks, 1), pad)
        out = model.generate(input_ids=start, attention_mask=torch.ones(len(prompts), 1, dtype=torch.long),
                             encoder_hidden_states=adapter.encoder_states(text),
                             encoder_attention_mask=text["attention_mask"],
                             cache=EncoderDecoderCache(DynamicCache(config=model.config),
                                                       DynamicCache(config=model.config)), **kwargs)
    logits, scores = torch.stack(out.logits, 1), torch.stack(out.scores, 1)
    assert torch.equal(logits, scores)  # no logits processor: generate sampled from softmax(logits) itself
    ids = record.ids
    _, pattern = dec.build_delay_pattern_mask(ids[:, :1], pad_token_id=pad, max_length=ids.shape[1])
    delayed = dec.apply_delay_pattern_mask(ids, pattern)
    codes = delayed[delayed != pad].reshape(len(prompts), adapter.num_codebooks, -1)  # generate's own last step
    return codes, delayed, pattern, logits


@pytest.mark.parametrize("kind", ["musicgen", "musicgen_decoder"])
def test_logp_equals_the_probability_generate_gave_the_same_codes_step_by_step(musicgen, musicgen_decoder, kind):
    adapter = load_music(musicgen if kind == "musicgen" else musicgen_decoder)
    k = adapter.num_codebooks
    codes, delayed, pattern, logits = _generate_with_logits(adapter, PROMPTS, new_tokens=14, seed=0)
    assert codes.shape == (3, k, 14 + 1 - k)
    # step s produced position s + 1; only positions the delay pattern leaves open (-1) are sampled codes
    step_lp = logits.log_softmax(-1).gather(-1, delayed[:, 1:, None].clamp(max=logits.shape[-1] - 1))[..., 0]
    open_ = pattern[:, 1:] == -1
    by_generate = (step_lp * open_).view(3, k, -1).sum((1, 2))
    with torch.no_grad():
        lp = adapter.logps(adapter.model, adapter.encode(PROMPTS, codes))
    torch.testing.assert_close(lp.sum, by_generate, rtol=1e-5, atol=1e-4)
    assert lp.count.tolist() == [k * codes.shape[-1]] * 3 == open_.view(3, k, -1).sum((1, 2)).tolist()
    # the adapter's generate returns the same codes for the same seed
    assert torch.equal(adapter.generate(PROMPTS, frames=codes.shape[-1], top_k=0, guidance_scale=1.0, seed=0), codes)


def test_the_delay_pattern_layout(musicgen):
    """Frame t of codebook k sits at position t + k + 1; every other position holds the start token and is not
    scored; a padded frame is never scored."""
    adapter = load_music(musicgen)
    k, t, start = 4, 5, adapter.start_token_id
    codes = torch.arange(2 * k * t).view(2, k, t) % 60
    frames = torch.ones(2, t, dtype=torch.bool)
    frames[1, 3:] = False
    seq, scored = delayed_sequence(adapter.decoder, codes, frames, start)
    seq, scored = seq.view(2, k, t + k), scored.view(2, k, t + k)
    for cb in range(k):
        assert torch.equal(seq[0, cb, cb + 1: cb + 1 + t], codes[0, cb])
        assert (seq[0, cb, : cb + 1] == start).all() and (seq[0, cb, cb + 1 + t:] == start).all()
        assert torch.equal(seq[1, cb, cb + 1: cb + 4], codes[1, cb, :3]) and (seq[1, cb, cb + 4:] == start).all()
    assert scored[0].sum() == k * t and scored[1].sum() == k * 3
    assert torch.equal(scored, seq != start)


def test_pads_are_never_scored_and_a_short_sequence_scores_as_alone(musicgen):
    adapter = load_music(musicgen)
    g = torch.Generator().manual_seed(0)
    long = torch.randint(0, 64, (1, 4, 10), generator=g)
    short = torch.randint(0, 64, (1, 4, 6), generator=g)
    padded = torch.full((1, 4, 10), 999)  # pad values outside the vocabulary: never read
    padded[..., :6] = short
    batch = torch.cat([long, padded])
    frames = torch.ones(2, 10, dtype=torch.bool)
    frames[1, 6:] = False
    with torch.no_grad():
        both = adapter.logps(adapter.model, adapter.encode(PROMPTS[:2], batch, frames))
        alone = adapter.logps(adapter.model, adapter.encode(PROMPTS[1:2], short))
        other_pad = batch.clone()
        other_pad[1, :, 6:] = 7
        again = adapter.logps(adapter.model, adapter.encode(PROMPTS[:2], other_pad, frames))
    assert both.count.tolist() == [40, 24] and alone.count.tolist() == [24]
    torch.testing.assert_close(both.sum[1:], alone.sum, rtol=1e-6, atol=1e-5)
    assert torch.equal(both.sum, again.sum)


def test_the_surrogate_is_the_sum_over_codebooks_and_frames_not_the_mean(musicgen):
    """MusicGen's own `outputs.loss` (labels = the delayed codes, -100 on delay positions) is the mean of the
    per-codebook mean cross-entropies; the adapter's log-prob is the sum: -loss x K x T for one sequence."""
    adapter = load_music(musicgen)
    codes = torch.randint(0, 64, (1, 4, 9), generator=torch.Generator().manual_seed(1))
    inputs = adapter.encode(PROMPTS[:1], codes)
    with torch.no_grad():
        lp = adapter.logps(adapter.model, inputs)
        labels = inputs.seq[:, 1:].masked_fill(~inputs.scored[:, 1:], -100)  # (K, L - 1)
        out = adapter.model(**inputs.text, decoder_input_ids=inputs.seq[:, :-1], labels=labels.T[None])
    assert lp.count.item() == 36
    torch.testing.assert_close(lp.sum, -out.loss[None] * 36, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lp.mean, -out.loss[None], rtol=1e-5, atol=1e-5)
    assert lp.sum.item() < 30 * lp.mean.item()  # a sum of 36 negative terms, not their mean


def _pair_batch(chosen, rejected, prompts, keys=None):
    """What `collate_music_pairs` gives: codes (2B, K, T) [chosen; rejected] right-padded, codes_mask (2B, T)."""
    rows = list(chosen) + list(rejected)
    t = max(c.shape[1] for c in rows)
    codes = torch.zeros(len(rows), rows[0].shape[0], t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, c in enumerate(rows):
        codes[i, :, : c.shape[1]], mask[i, : c.shape[1]] = c, True
    return {"keys": keys or [f"k{i}" for i in range(len(prompts))], "prompts": list(prompts), "codes": codes,
            "codes_mask": mask, "lengths": mask.sum(1)}


def _toy_pairs(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    chosen = [torch.randint(0, 64, (4, 5 + i), generator=g) for i in range(n)]
    rejected = [torch.randint(0, 64, (4, 8 - i), generator=g) for i in range(n)]
    return chosen, rejected


@pytest.mark.parametrize("reference", ["lora", "copy"])
def test_ln2_at_policy_equals_reference_and_counts_per_pair(musicgen, reference):
    adapter = load_music(musicgen, reference=reference, lora=LORA)
    adapter.model.train()
    chosen, rejected = _toy_pairs()
    s = adapter.surrogates(adapter.model, _pair_batch(chosen, rejected, PROMPTS))
    assert s.kind == "logp" and s.policy.shape == s.reference.shape == (2, 3)
    assert s.counts.tolist() == [[20, 24, 28], [32, 28, 24]]
    torch.testing.assert_close(s.policy.detach(), s.reference)
    loss, metrics = preference_loss("dpo", s, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["rewards/accuracies"] == 0.5
    ipo, _ = preference_loss("dpo", s.per_token(), beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # (0 - 1/(2β))² at policy == reference


def test_max_frames_keeps_the_first_frames_and_counts_them(musicgen):
    adapter = load_music(musicgen, max_frames=4)
    codes = torch.randint(0, 64, (1, 4, 9), generator=torch.Generator().manual_seed(3))
    full = load_music(musicgen)
    with torch.no_grad():
        cut = adapter.logps(adapter.model, adapter.encode(PROMPTS[:1], codes))
        first = full.logps(full.model, full.encode(PROMPTS[:1], codes[..., :4]))
    assert cut.count.tolist() == [16]
    torch.testing.assert_close(cut.sum, first.sum)


def test_code_logps_reads_only_scored_targets():
    """Unscored targets (the start token, one past the heads' vocabulary) are never gathered into the sum."""
    logits = torch.randn(4, 5, 8)
    seq = torch.tensor([[8, 1, 2, 8, 8, 8]] * 4)
    scored = seq != 8
    lp = code_logps(logits, seq, scored, num_codebooks=2)
    ref = logits.log_softmax(-1)[:, :2].gather(-1, seq[:, 1:3, None])[..., 0].view(2, -1).sum(-1)
    torch.testing.assert_close(lp.sum, ref)
    assert lp.count.tolist() == [4, 4]


def test_bad_codes_are_errors_naming_the_sample_before_any_forward(musicgen):
    adapter = load_music(musicgen)
    calls = []
    adapter.model.register_forward_pre_hook(lambda *a: calls.append(1))
    chosen, rejected = _toy_pairs(2)
    bad_vocab = [c.clone() for c in chosen]
    bad_vocab[1][2, 3] = 64  # the pad/start token is not a code
    with pytest.raises(MusicCodesError, match=r"sample k1 \(chosen\): codebook 2 frame 3 holds code 64, outside "
                                              r"the codebook vocabulary 0\.\.63"):
        adapter.surrogates(adapter.model, _pair_batch(bad_vocab, rejected, PROMPTS[:2]))
    three = [r[:3] for r in rejected]  # a batch shares K (collate_music_pairs refuses mixed K)
    with pytest.raises(MusicCodesError, match=r"sample k0 \(chosen\): codes have 3 codebooks, the model "
                                              r"generates 4"):
        adapter.surrogates(adapter.model, _pair_batch([c[:3] for c in chosen], three, PROMPTS[:2]))
    with pytest.raises(MusicCodesError, match="sample x: .*code -1"):
        adapter.encode(["a"], -torch.ones(1, 4, 3, dtype=torch.long), keys=["x"])
    assert not calls


def _write_pairs(out, pairs):
    from mmalign.data import ShardSetWriter
    from mmalign.data.schemas import music_pair_sample

    with ShardSetWriter(out, "music_pair") as w:
        for key, prompt, c, r in pairs:
            w.write(music_pair_sample(key, c.numpy(), r.numpy(), prompt=prompt))
    return str(out)


def test_the_reader_skips_and_counts_bad_codes_or_names_them_in_strict_mode(musicgen, tmp_path):
    from mmalign.data.collate import collate_music_pairs
    from mmalign.data.dataset import CorruptSampleError
    from mmalign.music.codes import CheckedMusicPairDataset

    chosen, rejected = _toy_pairs(4)
    pairs = [(f"m-{i}", PROMPTS[i % 3], c, r) for i, (c, r) in enumerate(zip(chosen, rejected))]
    pairs[1] = ("m-1", "drums", chosen[1][:3], rejected[1][:3])  # 3 codebooks for a 4-codebook model
    bad = rejected[2].clone()
    bad[0, 0] = 100
    pairs[2] = ("m-2", "drums", chosen[2], bad)
    shards = _write_pairs(tmp_path / "pairs", pairs)
    ds = CheckedMusicPairDataset(shards, num_codebooks=4, vocab_size=64)
    batch = collate_music_pairs(list(ds))
    assert batch["keys"] == ["m-0", "m-3"] and batch["skipped"] == 2 and ds.stats.skipped == 2
    with pytest.raises(CorruptSampleError, match=r"sample 'm-1': chosen codes: codes have 3 codebooks"):
        list(CheckedMusicPairDataset(shards, num_codebooks=4, vocab_size=64, strict=True))


def _config(pretrained, shards, tmp_path, **over):
    from mmalign.train.tasks import load_train_config

    data = {"task": "music", "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
            "model": {"pretrained": pretrained, "lora": LORA}, "method": {"beta": 0.1},
            "data": {"shards": shards, "shuffle_buffer": 16},
            "optim": {"lr": 1e-2, "lr_scheduler": "constant", "weight_decay": 0.0},
            "train": {"max_steps": 4, "batch_size": 4, "progress": False}}
    return load_train_config(None, [f"{k}={v}" for k, v in over.items()], defaults=data)


def test_the_tiny_recipe_starts_at_ln2_and_its_lora_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    from mmalign.train.metrics import read_metrics
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import train

    cfg = load_train_config("configs/tiny/music_dpo.yaml", [f"run.output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(rows) == 10
    assert rows[0]["tokens/chosen"] > 0 and rows[0]["skipped_samples"] == 0
    base = MusicgenForConditionalGeneration.from_pretrained("assets/tiny/musicgen")
    loaded = PeftModel.from_pretrained(base, result.outputs["lora"]).eval()
    adapter = load_music("assets/tiny/musicgen")
    chosen, rejected = _toy_pairs()
    inputs = adapter.encode(PROMPTS, torch.stack([c[:, :5] for c in chosen]))
    with torch.no_grad():
        trained = adapter.logps(result.module.eval(), inputs).sum
        torch.testing.assert_close(adapter.logps(loaded, inputs).sum, trained, rtol=0, atol=1e-4)
        assert (adapter.logps(adapter.model, inputs).sum - trained).abs().max() > 1e-4  # the LoRA moved


def test_dpo_learns_the_toy_preference_and_bad_pairs_are_skipped_and_counted(musicgen, tmp_path):
    from mmalign.data.dataset import CorruptSampleError
    from mmalign.train.metrics import read_metrics
    from mmalign.train.trainer import train

    g = torch.Generator().manual_seed(4)
    up = [torch.arange(t).repeat(4, 1) % 64 for t in (6, 7, 8, 9)]  # chosen: ascending codes
    pairs = [(f"p-{i:02d}", "an ascending piano melody", up[i % 4], torch.randint(0, 64, (4, 7), generator=g))
             for i in range(16)]
    pairs[5] = ("p-05", "drums", up[1], torch.full((4, 7), 70))
    shards = _write_pairs(tmp_path / "pairs", pairs)
    result = train(_config(musicgen, shards, tmp_path, **{"train.max_steps": 30, "method.beta": 0.5}))
    rows = read_metrics(result.run_dir)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.5 * math.log(2)
    assert rows[-1]["rewards/accuracies"] == 1.0
    # 15 good pairs: 3 micro-batches of 4 per epoch, 10 epochs, the bad pair skipped once in each (a running count)
    assert result.skipped_samples == rows[-1]["skipped_samples"] == 10 and "p-05" not in result.keys_seen
    with pytest.raises(CorruptSampleError, match=r"sample 'p-05': rejected codes: codebook 0 frame 0 holds code 70"):
        train(_config(musicgen, shards, tmp_path / "strict", **{"data.strict": "true"}))


def test_precomputed_reference_trains_like_a_live_one_and_sft_is_the_chosen_nll(musicgen, tmp_path):
    from mmalign.music.task import MusicMethodConfig, music_preference_loss
    from mmalign.train.metrics import read_metrics
    from mmalign.train.tasks import task_for
    from mmalign.train.trainer import train

    chosen, rejected = _toy_pairs(8, seed=5)
    shards = _write_pairs(tmp_path / "pairs", [(f"c-{i}", PROMPTS[i % 3], c, r)
                                               for i, (c, r) in enumerate(zip(chosen, rejected))])
    cfg = _config(musicgen, shards, tmp_path / "pre", **{"model.reference": "precomputed"})
    task_for(cfg).build_cache()
    pre = read_metrics(train(cfg).run_dir)
    live = read_metrics(train(_config(musicgen, shards, tmp_path / "live")).run_dir)
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(pre, live):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)

    adapter = load_music(musicgen)
    batch = _pair_batch(chosen[:3], rejected[:3], PROMPTS)
    nll, metrics = music_preference_loss(adapter, batch, MusicMethodConfig(name="sft"))
    with torch.no_grad():
        lp = adapter.logps(adapter.model, adapter.encode(PROMPTS, batch["codes"][:3], batch["codes_mask"][:3]))
    assert nll.item() == pytest.approx(-(lp.sum / lp.count).mean().item(), rel=1e-5)
    assert metrics["tokens/chosen"].item() == pytest.approx(lp.count.float().mean().item())


def test_config_errors_name_the_key(musicgen, tmp_path):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="needs model.lora"):
        _config(musicgen, "x", tmp_path, **{"model.lora": "null", "model.reference": "lora"})
    with pytest.raises(ConfigError, match="surrogate 'sum' with method.loss_type 'ipo'"):
        _config(musicgen, "x", tmp_path, **{"method.loss_type": "ipo", "method.surrogate": "sum"})
    with pytest.raises(ConfigError, match="label_smoothing"):
        _config(musicgen, "x", tmp_path, **{"method.loss_type": "hinge", "method.label_smoothing": 0.1})


def test_the_task_skips_a_batch_with_bad_codes_before_any_forward_or_names_it_in_strict_mode(musicgen, tmp_path):
    from mmalign.music.task import MusicTask
    from mmalign.train.tasks import SkipBatch
    from mmalign.train.trainer import DataError

    cfg = _config(musicgen, "unused", tmp_path)
    task = MusicTask(cfg)
    built = task.build("cpu")
    calls = []
    built.module.register_forward_pre_hook(lambda *a: calls.append(1))
    chosen, rejected = _toy_pairs(2)
    assert task.skip_reason(_pair_batch(chosen, rejected, PROMPTS[:2])) is None
    rejected[0][1, 2] = 99
    batch = _pair_batch(chosen, rejected, PROMPTS[:2])
    reason, message = task.skip_reason(batch)
    assert reason == "bad_codes" and message.startswith("sample k0 (rejected): codebook 1 frame 2 holds code 99")
    with pytest.raises(SkipBatch, match=r"sample k0 \(rejected\)"):
        MusicTask.compute_loss(cfg, built.model, built.module, built.module, batch, None)
    strict = MusicTask(_config(musicgen, "unused", tmp_path, **{"data.strict": "true"}))
    strict.adapter = task.adapter
    with pytest.raises(DataError, match=r"data.strict: sample k0 \(rejected\)"):
        strict.skip_reason(batch)
    assert not calls


def test_generated_codes_round_trip_through_shards(musicgen, tmp_path):
    from mmalign.data.collate import collate_music_pairs
    from mmalign.music.codes import CheckedMusicPairDataset

    adapter = load_music(musicgen)
    chosen = adapter.generate(PROMPTS, frames=8, seed=1)
    rejected = adapter.generate(PROMPTS, frames=6, seed=2)
    shards = _write_pairs(tmp_path / "gen", [(f"g-{i}", p, c, r)
                                             for i, (p, c, r) in enumerate(zip(PROMPTS, chosen, rejected))])
    batch = collate_music_pairs(list(CheckedMusicPairDataset(shards, num_codebooks=4, vocab_size=64)))
    assert torch.equal(batch["codes"][:3], chosen) and torch.equal(batch["codes"][3:, :, :6], rejected)
    with torch.no_grad():
        s = adapter.surrogates(adapter.model, batch, with_reference=False)
        direct = adapter.logps(adapter.model, adapter.encode(PROMPTS, rejected))
    torch.testing.assert_close(s.policy[1], direct.sum)
    assert s.counts.tolist() == [[32] * 3, [24] * 3]
