"""BDHS: image-token masks, reference-guided plans, yes/no flips, the semantic filter's retries and fallback."""

import numpy as np
import pytest
import torch

from mmalign.vlm.bdhs import BDHSConfig, bdhs_pairs, bdhs_rejected, plan_guided, split_sentences, toy_rows


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from mmalign.vlm.adapter import load_vlm
    from mmalign.vlm.tiny import build_tiny_vlm

    return load_vlm(str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava", "llava")))


def test_guided_plan_keeps_a_prefix_of_each_sentence_and_leaves_words_to_generate():
    chosen = "A red circle sits left. It is small! Nothing else is there."
    sentences = split_sentences(chosen)
    assert sentences == ["A red circle sits left.", "It is small!", "Nothing else is there."]
    for seed in range(20):
        plan, flipped = plan_guided(chosen, np.random.default_rng(seed), flip_prob=0.5)
        assert not flipped and len(plan) == 3
        for i, (context, prefix) in enumerate(plan):
            assert sentences[i].startswith(prefix) and len(prefix.split()) < len(sentences[i].split())
            assert context == " ".join(sentences[:i] + ([prefix] if prefix else []))


def test_yes_no_answers_are_flipped_with_the_configured_probability():
    flips = [plan_guided("Yes, the circle is red.", np.random.default_rng(s), 0.5) for s in range(400)]
    share = np.mean([f for _, f in flips])
    assert 0.42 < share < 0.58
    for plan, flipped in flips:
        if flipped:
            assert plan[0][1] == "No,"
    assert not any(plan_guided("Yes.", np.random.default_rng(s), 0.0)[1] for s in range(50))
    plan, flipped = plan_guided("no. It is blue.", np.random.default_rng(0), 1.0)
    assert flipped and plan[0][1] == "yes." and plan[1][0].startswith("no.")


class _FixedSimilarity:
    """An embedder whose similarity to the chosen answers follows a script per call: sims[k] for the k-th call
    after the first (the first call embeds the chosen answers)."""

    def __init__(self, sims):
        self.sims, self.calls = list(sims), 0

    def __call__(self, texts):
        self.calls += 1
        if self.calls == 1:
            return torch.nn.functional.normalize(torch.ones(len(texts), 2), dim=-1)
        s = self.sims[min(self.calls - 2, len(self.sims) - 1)]
        other = torch.tensor([s, (1 - s * s) ** 0.5])
        chosen = torch.nn.functional.normalize(torch.ones(2), dim=0)
        # Rotate `other` so that its cosine with `chosen` is s.
        basis = torch.stack([chosen, torch.tensor([-chosen[1], chosen[0]])])
        return (other @ basis).repeat(len(texts), 1)


def test_filter_retries_then_falls_back_to_an_unguided_answer(tiny_llava):
    rows = toy_rows(3, seed=0)
    cfg = BDHSConfig(max_resamples=5, batch_size=8, max_new_tokens=4)
    always_similar = _FixedSimilarity([0.99])
    results = bdhs_rejected(tiny_llava, rows, cfg, always_similar)
    assert always_similar.calls == 1 + 6
    for r in results:
        assert r["attempts"] == 6 and not r["guided"] and not r["filter_passed"]
        assert r["similarity"] == pytest.approx(0.99, abs=1e-5)
    third_passes = _FixedSimilarity([0.99, 0.98, 0.5])
    results = bdhs_rejected(tiny_llava, rows, BDHSConfig(max_resamples=5, max_new_tokens=4), third_passes)
    for r in results:
        assert r["attempts"] == 3 and r["guided"] and r["filter_passed"]
    # Each attempt draws a new mask.
    assert len({r["mask_seed"] for r in bdhs_rejected(tiny_llava, rows[:1], cfg, _FixedSimilarity([0.99]))}) == 1


def test_each_attempt_uses_a_new_mask_keeping_the_configured_share(tiny_llava, monkeypatch):
    seen = []
    real = tiny_llava.model.generate

    def spy(**kw):
        seen.append((kw["input_ids"].clone(), kw["attention_mask"].clone()))
        return real(**kw)

    monkeypatch.setattr(tiny_llava.model, "generate", spy)
    rows = toy_rows(8, seed=1)
    for rho in (0.5, 1.0):
        seen.clear()
        bdhs_rejected(tiny_llava, rows, BDHSConfig(rho=rho, max_resamples=1, batch_size=64, max_new_tokens=2),
                      _FixedSimilarity([0.99]))
        assert len(seen) == 2  # one generate call per attempt
        masks = []
        for ids, attn in seen:
            image = ids == tiny_llava.image_token_id
            kept = attn[image].float().mean().item()
            assert kept == pytest.approx(1 - rho, abs=0.06)
            assert attn[~image & (ids != tiny_llava.tokenizer.pad_token_id)].all()
            masks.append(attn[image])
        if rho < 1:
            assert not torch.equal(masks[0][: len(masks[1])], masks[1][: len(masks[0])])


def test_bdhs_pairs_round_trip_through_shards(tmp_path, tiny_llava):
    from mmalign.data import VLMPairDataset
    from mmalign.selfgen.embed import load_embedder
    from mmalign.vlm.stic import write_pairs

    rows = toy_rows(5, seed=2)
    cfg = BDHSConfig(max_new_tokens=6, batch_size=16)
    write_pairs(str(tmp_path / "bdhs"), bdhs_pairs(tiny_llava, rows, cfg, load_embedder("vlm", tiny_llava)),
                {"from": "test"})
    samples = list(VLMPairDataset(str(tmp_path / "bdhs"), strict=True))
    assert len(samples) + cfg.counts["skipped_identical_answers"] + cfg.counts["skipped_empty_rejected"] == 5
    assert len(samples) >= 1
    by_key = {r["key"]: r for r in rows}
    for s in samples:
        row = by_key[s["__key__"]]
        assert s["chosen"] == row["chosen"] and s["rejected"] != row["chosen"]
        assert np.array_equal(np.asarray(s["images"][0]), np.asarray(row["images"][0]))
        b = s["provenance"]["bdhs"]
        assert b["rho"] == 0.99 and b["attempts"] >= 1 and s["provenance"]["corruption"] == "bdhs"
        assert -1 <= s["provenance"]["similarity"] <= 1


def test_identical_rejected_answers_are_skipped_and_counted(tiny_llava, monkeypatch):
    rows = toy_rows(2, seed=3)
    monkeypatch.setattr(tiny_llava, "generate", lambda prompts, images, **kw: ["" for _ in prompts])
    cfg = BDHSConfig(max_resamples=0)
    # An empty continuation of an empty prefix gives an empty answer.
    assert list(bdhs_pairs(tiny_llava, rows, cfg, _FixedSimilarity([0.0]))) == []
    assert cfg.counts["skipped_empty_rejected"] == 2


def test_text_encoder_embedder_loads_offline_from_a_folder(tmp_path, tiny_llava):
    from transformers import BertConfig, BertModel

    from mmalign.selfgen.embed import load_embedder

    BertModel(BertConfig(vocab_size=len(tiny_llava.tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "enc")
    tiny_llava.tokenizer.save_pretrained(tmp_path / "enc")
    embed = load_embedder(str(tmp_path / "enc"))
    e = embed(["a red circle on the left", "a red circle on the left", "no"])
    assert e.shape == (3, 32)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (e[0] @ e[1]).item() == pytest.approx(1.0, abs=1e-5) and (e[0] @ e[2]).item() < 0.999
    with pytest.raises(ValueError, match="embedder .*not 'vlm'"):
        load_embedder(str(tmp_path / "missing"))
