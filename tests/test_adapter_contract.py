"""The adapter contract (`mmalign.models.contract`), one row per adapter. A new modality adds a row.

For every adapter: it implements `PreferenceAdapter` and gives (K, B) surrogates; at policy == reference the DPO
loss of the method table is exactly ln 2; two identical items of a group get the same surrogate (a winner and its
loser share t and noise where the modality has them); and the `lora` reference (adapters disabled) gives the same
surrogates as the `copy` reference, also once the LoRA weights have moved the policy away from both.
"""

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from PIL import Image

from mmalign.config import validate_config
from mmalign.methods import preference_loss
from mmalign.models.contract import PreferenceAdapter, Surrogates


@dataclass
class Row:
    build: Callable[[str], tuple]  # reference mode -> (adapter, policy module)
    batch: Callable[[bool], dict]  # identical -> a batch of 2 groups (identical: every loser equals its winner)
    kind: str
    beta: float


# -- text-to-image -------------------------------------------------------------------------------------------------
def _t2i_row(pretrained: str) -> Row:
    from mmalign.t2i.task import T2ITrainConfig, build_adapter

    def build(reference):
        cfg = validate_config(T2ITrainConfig, {
            "model": {"pretrained": pretrained, "reference": reference,
                      "lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}},
            "data": {"shards": "unused", "resolution": 32}, "train": {"max_steps": 1}})
        torch.manual_seed(0)  # the same LoRA init for both references
        adapter = build_adapter(cfg, torch.device("cpu"))
        return adapter, adapter.c.unet

    def batch(identical):
        """A cached batch (VAE posteriors with a near-zero variance, so the images' latents are what is given):
        with `identical`, every loser's latent equals its winner's."""
        adapter, _ = build("lora")
        g = torch.Generator().manual_seed(1)
        mean = torch.randn(2, 2, 4, 16, 16, generator=g)  # (B, K, C, h, w)
        if identical:
            mean[:, 1] = mean[:, 0]
        posterior = torch.cat([mean, torch.full_like(mean, -30.0)], dim=2)  # log-variance -30: std 3e-7
        cond = adapter.encode_text(["a red circle on the left", "a blue square"])
        entry = {"latents": posterior, "prompt_embeds": cond.prompt_embeds,
                 "original_size": torch.tensor([[32, 32]] * 2), "crop_top_left": torch.zeros(2, 2, dtype=torch.long)}
        if cond.pooled is not None:
            entry["pooled"] = cond.pooled
        return {"cache": {"t2i": entry}, "winner_index": torch.zeros(2, dtype=torch.long), "keys": ["a", "b"]}

    return Row(build, batch, "error", 5000.0)


# -- flow matching -------------------------------------------------------------------------------------------------
def _flow_row(pretrained: str, video: bool) -> Row:
    from mmalign.flow.task import FlowTrainConfig, build_adapter

    def build(reference):
        cfg = validate_config(FlowTrainConfig, {
            "task": "flow", "model": {"pretrained": pretrained, "reference": reference,
                                      "lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v",
                                                                                         "to_out.0"]}},
            "method": {"name": "flow_dpo", "beta": 1000.0},
            "data": {"shards": "unused", "resolution": 32}, "train": {"max_steps": 1}})
        torch.manual_seed(0)
        adapter = build_adapter(cfg, torch.device("cpu"))
        return adapter, adapter.c.transformer

    def batch(identical):
        g = torch.Generator().manual_seed(1)
        shape = (2, 3, 9, 32, 32) if video else (2, 3, 32, 32)
        winners = torch.rand(shape, generator=g) * 2 - 1
        losers = winners.clone() if identical else torch.rand(shape, generator=g) * 2 - 1
        key = "videos" if video else "pixel_values"
        return {key: torch.cat([winners, losers]), "captions": ["a red circle on the left", "a blue square"],
                "keys": ["a", "b"]}

    return Row(build, batch, "error", 1000.0)


# -- vision-language models ----------------------------------------------------------------------------------------
def _vlm_row(folder: str) -> Row:
    from mmalign.toy.scenes import sample_scenes
    from mmalign.vlm.adapter import load_vlm

    def build(reference):
        torch.manual_seed(0)
        adapter = load_vlm(folder, reference=reference,
                           lora={"rank": 4, "alpha": 8.0, "dropout": 0.0})
        adapter.model.train()
        return adapter, adapter.model

    def batch(identical):
        scenes = sample_scenes(2, seed=3)
        chosen = [s.caption for s in scenes]
        rejected = chosen if identical else ["a green square on the right", "a yellow circle on the left"]
        return {"keys": ["a", "b"], "prompts": ["describe the image"] * 2,
                "images": [[Image.fromarray(s.render())] for s in scenes], "chosen": chosen, "rejected": rejected}

    return Row(build, batch, "logp", 0.1)


# -- music tokens ---------------------------------------------------------------------------------------------------
def _music_row(folder: str) -> Row:
    from mmalign.music.adapter import load_music

    def build(reference):
        torch.manual_seed(0)
        adapter = load_music(folder, reference=reference, lora={"rank": 4, "alpha": 8.0, "dropout": 0.0})
        adapter.model.train()
        return adapter, adapter.model

    def batch(identical):
        """A `collate_music_pairs` batch of 2 pairs (K=4 codebooks, chosen 7 frames, rejected 5 + 2 pad frames)."""
        g = torch.Generator().manual_seed(1)
        chosen = torch.randint(0, 64, (2, 4, 7), generator=g)
        rejected = chosen.clone() if identical else torch.randint(0, 64, (2, 4, 7), generator=g)
        mask = torch.ones(4, 7, dtype=torch.bool)
        if not identical:
            mask[2:, 5:] = False
        return {"keys": ["a", "b"], "prompts": ["an ascending piano melody", "drums"],
                "codes": torch.cat([chosen, rejected]), "codes_mask": mask, "lengths": mask.sum(1)}

    return Row(build, batch, "logp", 0.1)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, tiny_sd15, tiny_sdxl):
    from mmalign.music.tiny import build_tiny_musicgen
    from mmalign.toy.video_pipeline import build_toy_video
    from mmalign.vlm.tiny import build_tiny_vlm

    vlm = tmp_path_factory.mktemp("contract_vlm")
    toy_video = tmp_path_factory.mktemp("contract_toy_video") / "toy_video"
    build_toy_video(seed=0).save_pretrained(toy_video)  # assets/toy/video is not shipped in git
    return {
        "t2i-sd15": _t2i_row(tiny_sd15),
        "t2i-sdxl": _t2i_row(tiny_sdxl),
        "vlm-llava": _vlm_row(str(build_tiny_vlm(vlm / "llava", "llava"))),
        "vlm-qwen2_vl": _vlm_row(str(build_tiny_vlm(vlm / "qwen2_vl", "qwen2_vl"))),
        "flow-sd3": _flow_row("assets/tiny/sd3", video=False),
        "flow-wan": _flow_row("assets/tiny/wan", video=True),
        "flow-toy_video": _flow_row(str(toy_video), video=True),
        "flow-ltx": _flow_row("assets/tiny/ltx", video=True),
        "music-musicgen": _music_row(str(build_tiny_musicgen(tmp_path_factory.mktemp("contract_music") / "mg"))),
    }


ROWS = ["t2i-sd15", "t2i-sdxl", "vlm-llava", "vlm-qwen2_vl", "flow-sd3", "flow-wan", "flow-toy_video",
        "flow-ltx", "music-musicgen"]


def _surrogates(adapter, policy, batch, seed=0) -> Surrogates:
    return adapter.surrogates(policy, batch, torch.Generator().manual_seed(seed), with_reference=True,
                              unwrapped=policy)


@pytest.mark.parametrize("name", ROWS)
def test_dpo_loss_is_ln2_at_policy_equals_reference(rows, name):
    row = rows[name]
    for reference in ("lora", "copy"):
        adapter, policy = row.build(reference)
        assert isinstance(adapter, PreferenceAdapter) and adapter.reference == reference
        s = _surrogates(adapter, policy, row.batch(False))
        assert s.kind == row.kind and s.policy.shape == s.reference.shape == (2, 2)
        assert s.policy.requires_grad and not s.reference.requires_grad
        loss, metrics = preference_loss("dpo", s, beta=row.beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6), reference
        assert metrics["rewards/accuracies"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("name", ROWS)
def test_identical_items_of_a_group_get_the_same_surrogate(rows, name):
    """Diffusion: a winner and its loser share t and noise, so identical latents give identical errors (unshared
    noise or timesteps would make them differ by about the error itself)."""
    row = rows[name]
    adapter, policy = row.build("lora")
    s = _surrogates(adapter, policy, row.batch(True))
    torch.testing.assert_close(s.policy[0], s.policy[1], rtol=0, atol=1e-5 * float(s.policy.detach().abs().max()))
    if s.t is not None:
        assert s.t.shape == (2,)  # one timestep per group
    different = _surrogates(adapter, policy, row.batch(False))
    assert (different.policy[0] - different.policy[1]).abs().max() > 1e-3 * float(different.policy.detach().abs().max())


@pytest.mark.parametrize("name", ROWS)
def test_lora_and_copy_references_agree_once_the_policy_moved(rows, name):
    row = rows[name]
    refs = {}
    for reference in ("lora", "copy"):
        adapter, policy = row.build(reference)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # move the policy off the reference: the LoRA up-projections start at zero
            moved = 0
            for pname, p in policy.named_parameters():
                if "lora_B" in pname:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                    moved += 1
        assert moved
        s = _surrogates(adapter, policy, row.batch(False), seed=2)
        assert (s.policy - s.reference).abs().max() > 1e-4  # the policy did move
        refs[reference] = s.reference
    torch.testing.assert_close(refs["lora"], refs["copy"], rtol=1e-5, atol=1e-5)
