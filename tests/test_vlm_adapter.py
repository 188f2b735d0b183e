"""VLM adapter: log-prob parity, prompt handling, references, generation, cached reference log-probs."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.models.loading import ModelLoadError
from mmalign.vlm.adapter import PromptTooLongError, image_token_mask, load_vlm
from mmalign.vlm.processing import ImageTokenMismatchError, pair_rows
from mmalign.vlm.reference_cache import cached_reference, precompute_reference_logps


def _images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_vl"])
def tiny_vlm(request, tmp_path_factory):
    from mmalign.vlm.tiny import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / request.param, request.param)), request.param


PROMPTS = ["describe the image", "what is in the image", [{"role": "user", "content": "describe it step by step"}]]
RESPONSES = ["a red circle on the left", "a blue square", "a green triangle on the right, then more words"]


def _manual_sum(adapter, prompt, image, response):
    """Independent computation: one unpadded row, full log-softmax, gather on the response positions."""
    from mmalign.vlm.processing import normalize_turns

    text = adapter.processor.apply_chat_template(normalize_turns(prompt, 1), add_generation_prompt=True,
                                                 tokenize=False)
    enc = adapter.processor(text=[text], images=[image], return_tensors="pt")
    resp = adapter.tokenizer(adapter._response_sep + response, add_special_tokens=False)["input_ids"]
    resp = resp + [adapter.tokenizer.eos_token_id]
    if adapter.max_length is not None:
        resp = resp[: adapter.max_length]
    ids = torch.cat([enc["input_ids"][0], torch.tensor(resp)])[None]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in enc:
        extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros(len(resp), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    p = enc["input_ids"].shape[1]
    return sum(logp[p + j - 1, tok].item() for j, tok in enumerate(resp)), len(resp)


def test_logps_match_a_manual_gather_per_unpadded_sample(tiny_vlm):
    path, family = tiny_vlm
    adapter = load_vlm(path)
    images = _images(3)
    inputs = adapter.encode(PROMPTS, [[im] for im in images], RESPONSES)
    with torch.no_grad():
        lp = adapter.policy_logps(inputs)
    for i in range(3):
        want, count = _manual_sum(adapter, PROMPTS[i], images[i], RESPONSES[i])
        assert lp.sum[i].item() == pytest.approx(want, abs=2e-4)
        assert lp.count[i].item() == count
        assert lp.mean[i].item() == pytest.approx(want / count, abs=1e-4)
    # Prompt tokens and pads are not scored: the batch is padded, the counts are the responses' lengths.
    assert inputs.labels_mask.sum().item() == sum(lp.count.tolist())
    assert (inputs.model_inputs["attention_mask"] == 0).any()


def test_max_length_cuts_the_response_never_the_prompt(tiny_vlm):
    path, _ = tiny_vlm
    full = load_vlm(path)
    cut = load_vlm(path, max_length=3)
    images = [[im] for im in _images(3)]
    a = full.encode(PROMPTS, images, RESPONSES)
    b = cut.encode(PROMPTS, images, RESPONSES)
    assert a.prompt_lengths == b.prompt_lengths
    assert b.labels_mask.sum(1).tolist() == [3, 3, 3]
    assert a.labels_mask.sum(1).min() > 3
    with torch.no_grad():
        lp = cut.policy_logps(b)
    want, _ = _manual_sum(cut, PROMPTS[2], images[2][0], RESPONSES[2])
    assert lp.sum[2].item() == pytest.approx(want, abs=2e-4)


def test_image_token_in_prompt_text_is_an_error_before_the_forward(tiny_vlm, monkeypatch):
    path, _ = tiny_vlm
    adapter = load_vlm(path)
    token = adapter.tokenizer.convert_ids_to_tokens(adapter.image_token_id)
    monkeypatch.setattr(adapter.model, "forward", lambda *a, **k: pytest.fail("forward ran"))
    with pytest.raises(ImageTokenMismatchError, match=r"sample bad-1: the prompt holds 2 image placeholder"):
        adapter.encode(["describe", f"describe {token} this"], [[im] for im in _images(2)], ["a", "b"],
                       keys=["ok-0", "bad-1"])
    with pytest.raises(ImageTokenMismatchError, match="2 image part"):
        adapter.encode([[{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "x"}]}]], [_images(1)], ["a"])


def test_a_prompt_over_max_prompt_length_raises_naming_the_sample(tiny_vlm):
    path, _ = tiny_vlm
    adapter = load_vlm(path, max_prompt_length=20)
    with pytest.raises(PromptTooLongError, match="sample k7: the prompt has .* never truncated"):
        adapter.encode(["describe the image"], [_images(1)], ["a"], keys=["k7"])


def test_vision_tower_frozen_by_default_and_configurable(tiny_vlm):
    path, family = tiny_vlm
    tower = "model.visual.blocks" if family == "qwen2_vl" else "model.vision_tower"
    projector = "model.visual.merger" if family == "qwen2_vl" else "model.multi_modal_projector"

    def flags(adapter, prefix):
        return {p.requires_grad for n, p in adapter.model.named_parameters() if n.startswith(prefix)}

    default = load_vlm(path)
    assert flags(default, tower) == {False}
    assert flags(default, projector) == {True}
    assert flags(default, "model.language_model") == {True}
    custom = load_vlm(path, train_vision=True, train_projector=False, train_llm=False)
    assert flags(custom, tower) == {True}
    assert flags(custom, projector) == {False}
    assert flags(custom, "model.language_model") == {False}
    lora = load_vlm(path, lora={"rank": 4, "alpha": 8}, reference="lora")
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n or "visual.blocks" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)


def test_reference_by_disabled_lora_equals_a_frozen_copy(tiny_vlm):
    path, _ = tiny_vlm
    lora = load_vlm(path, lora={"rank": 4, "alpha": 8, "dropout": 0.0}, reference="lora")
    copy_ = load_vlm(path, reference="copy")
    # Move the policy away from the base: LoRA B matrices and the projector's trainable copy.
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    inputs = lora.encode(PROMPTS, [[im] for im in _images(3)], RESPONSES)
    with torch.no_grad():
        policy = lora.policy_logps(inputs)
    ref_lora = lora.reference_logps(inputs)
    ref_copy = copy_.reference_logps(inputs)
    torch.testing.assert_close(ref_lora.sum, ref_copy.sum, atol=1e-4, rtol=0)
    assert (policy.sum - ref_lora.sum).abs().max() > 1e-2


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_vlm):
    path, _ = tiny_vlm
    adapter = load_vlm(path)
    images = [[im] for im in _images(3, seed=3)]
    batched = adapter.generate(PROMPTS, images, max_new_tokens=6)
    single = [adapter.generate([p], [im], max_new_tokens=6)[0] for p, im in zip(PROMPTS, images)]
    assert batched == single
    prefixed = adapter.generate(PROMPTS, images, max_new_tokens=4, prefixes=["a", "a red", ""])
    single = [adapter.generate([p], [im], max_new_tokens=4, prefixes=[x])[0]
              for p, im, x in zip(PROMPTS, images, ["a", "a red", ""])]
    assert prefixed == single


def test_generation_prefix_is_never_cut_by_max_length(tiny_vlm):
    # max_length cuts scored responses; an answer start to continue (a BDHS context) must reach the model whole.
    path, _ = tiny_vlm
    images = [[im] for im in _images(2, seed=4)]
    prefixes = ["a red circle on the left. a blue", "a green square on the"]
    full = load_vlm(path).generate(PROMPTS[:2], images, max_new_tokens=4, prefixes=prefixes)
    cut = load_vlm(path, max_length=2)
    assert len(cut.response_ids(prefixes[1], eos=False)) == 2
    assert cut.generate(PROMPTS[:2], images, max_new_tokens=4, prefixes=prefixes) == full
    short = [cut.tokenizer.decode(cut.response_ids(p, eos=False)) for p in prefixes]
    assert load_vlm(path).generate(PROMPTS[:2], images, max_new_tokens=4, prefixes=short) != full


def test_fully_hidden_image_makes_generation_blind(tiny_vlm):
    path, _ = tiny_vlm
    adapter = load_vlm(path)
    a, b = _images(2, seed=5)
    kw = dict(max_new_tokens=5, do_sample=True, seed=1)
    blind_a = adapter.generate(["describe"], [[a]], image_keep_prob=0.0, **kw)
    blind_b = adapter.generate(["describe"], [[b]], image_keep_prob=0.0, **kw)
    assert blind_a == blind_b
    # The same through a forward: with every image token hidden the text's logits no longer depend on the image.
    inputs = adapter.encode(["describe"] * 2, [[a], [b]], ["a red", "a red"])
    mi = dict(inputs.model_inputs)
    hidden = {**mi, "position_ids": adapter._positions(adapter.model, mi),
              "attention_mask": image_token_mask(mi["input_ids"], mi["attention_mask"], adapter.image_token_id,
                                                 0.0, seeds=[0, 1])}
    last = inputs.prompt_lengths[0] + 1
    with torch.no_grad():
        blind = adapter.model(**hidden).logits[:, last]
        seeing = adapter.model(**mi).logits[:, last]
    torch.testing.assert_close(blind[0], blind[1], atol=1e-5, rtol=0)
    assert (seeing[0] - seeing[1]).abs().max() > 1e-4


def test_image_token_mask_keeps_the_configured_fraction():
    ids = torch.full((4, 2000), 5)
    ids[:, :100] = 1
    attn = torch.ones_like(ids)
    for keep in (0.0, 0.01, 0.3, 1.0):
        mask = image_token_mask(ids, attn, 5, keep, seeds=[0, 1, 2, 3])
        kept = mask[:, 100:].float().mean().item()
        assert kept == pytest.approx(keep, abs=0.02)
        assert mask[:, :100].all()
    same = image_token_mask(ids, attn, 5, 0.5, seeds=[7, 7, 8, 8])
    assert torch.equal(same[0], same[1]) and not torch.equal(same[1], same[2])
    with pytest.raises(ValueError, match="keep_prob"):
        image_token_mask(ids, attn, 5, 1.5, seeds=[0] * 4)


def test_unsupported_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="'bert' is not a supported VLM"):
        load_vlm(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_vlm(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(str(tmp_path / "empty"))


def _write_pairs(out, n=3, rejected_images=False):
    from mmalign.data import ShardSetWriter, vlm_pair_sample

    images = _images(2 * n, seed=11)
    with ShardSetWriter(out, "vlm_pair", max_count=2) as w:
        for i in range(n):
            w.write(vlm_pair_sample(f"s-{i:03d}", [images[i]], prompt="describe the image",
                                    chosen="a red circle on the left", rejected=f"a blue square on the right {i}",
                                    rejected_images=[images[n + i]] if rejected_images else None,
                                    provenance={"origin": "self"}))


def test_precomputed_reference_logps_round_trip_and_are_keyed(tiny_vlm, tmp_path):
    import torch.utils.data as tud

    from mmalign.vlm.reference_cache import REF_CACHE_NAME, reference_cache_producer
    from mmalign.data import StaleCacheError, VLMPairDataset, collate_vlm_pairs

    path, _ = tiny_vlm
    shards = tmp_path / "pairs"
    _write_pairs(shards, rejected_images=True)
    adapter = load_vlm(path, reference="copy")
    precompute_reference_logps(adapter, str(shards), batch_size=2, rejected_images=True, progress=False)
    producer = reference_cache_producer(adapter, True)
    ds = VLMPairDataset(str(shards), caches={REF_CACHE_NAME: producer})
    batch = next(iter(tud.DataLoader(ds, batch_size=3, collate_fn=collate_vlm_pairs)))
    cached = cached_reference(batch, rejected_images=True)
    live = adapter.reference_logps(adapter.encode(*pair_rows(batch, True))).split(3)
    for c, l in zip(cached, live):
        torch.testing.assert_close(c.sum, l.sum.double(), atol=1e-5, rtol=0)
        assert torch.equal(c.count, l.count)
    # Another processor setting (max_length) is another cache: asking for it is an error, not a silent reuse.
    other = reference_cache_producer(load_vlm(path, max_length=2), True)
    with pytest.raises(StaleCacheError, match="max_length"):
        VLMPairDataset(str(shards), caches={REF_CACHE_NAME: other})
    # Images that differ from the ones scored are refused.
    batch["images"][0] = _images(1, seed=99)
    with pytest.raises(ValueError, match="sample s-000: its images differ"):
        cached_reference(batch, rejected_images=True)
