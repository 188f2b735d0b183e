"""VLM training task: the loss (all DPO types, SFT term, rejected images), toy DPO runs through the one training
loop, references (disabled LoRA = frozen copy, precomputed = live), saved outputs load back."""

import math

import numpy as np
import pytest
import torch

from mmalign.toy.scenes import COLORS, sample_scenes
from mmalign.vlm.task import VLMMethodConfig, vlm_preference_loss


@pytest.fixture(scope="module")
def toy_vlm(tmp_path_factory):
    from mmalign.vlm.tiny import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava", "llava"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Toy pairs: chosen = the true caption, rejected = the caption with another colour; rejected image = the scene
    in that other colour."""
    from PIL import Image

    from mmalign.data import ShardSetWriter, vlm_pair_sample
    from mmalign.toy.scenes import Scene

    out = tmp_path_factory.mktemp("pairs") / "toy"
    rng = np.random.default_rng(0)
    with ShardSetWriter(out, "vlm_pair") as w:
        for i, s in enumerate(sample_scenes(32, seed=4)):
            wrong = [c for c in COLORS if c != s.color][rng.integers(3)]
            other = Scene(wrong, s.shape, s.position, s.size, s.cx, s.cy)
            w.write(vlm_pair_sample(f"t-{i:04d}", [Image.fromarray(s.render())], prompt="describe the image",
                                    chosen=s.caption, rejected=other.caption,
                                    rejected_images=[Image.fromarray(other.render())], provenance={"origin": "ai"}))
    return str(out)


def _batch(pairs, n=4):
    import torch.utils.data as tud

    from mmalign.data import VLMPairDataset, collate_vlm_pairs

    return next(iter(tud.DataLoader(VLMPairDataset(pairs), batch_size=n, collate_fn=collate_vlm_pairs)))


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair",
                                       "apo_zero", "apo_down"])
def test_every_dpo_loss_type_matches_the_core_on_adapter_logps(toy_vlm, pairs, loss_type):
    from mmalign.vlm.adapter import load_vlm
    from mmalign.vlm.processing import pair_rows
    from mmalign.losses import dpo_loss

    adapter = load_vlm(toy_vlm, reference="copy")
    with torch.no_grad():  # move the policy off the reference
        for p in adapter.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(pairs)
    method = VLMMethodConfig(loss_type=loss_type, beta=0.1)
    loss, metrics = vlm_preference_loss(adapter, batch, method)
    inputs = adapter.encode(*pair_rows(batch))
    with torch.no_grad():
        pol = adapter.policy_logps(inputs).split(4)
    ref = adapter.reference_logps(inputs).split(4)
    kind = "mean" if loss_type == "ipo" else "sum"  # IPO is defined on length-normalised log-ratios (as TRL)
    want, _ = dpo_loss(*(getattr(x, kind) for x in (pol[0], pol[1], ref[0], ref[1])), 0.1, loss_type)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    assert set(metrics) >= {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "sft/nll"}


def test_sft_term_rejected_images_and_mean_surrogate(toy_vlm, pairs):
    from mmalign.vlm.adapter import load_vlm
    from mmalign.vlm.processing import pair_rows
    from mmalign.losses import dpo_loss

    adapter = load_vlm(toy_vlm, reference="copy")
    batch = _batch(pairs)
    # At policy == reference the sigmoid DPO loss is exactly ln 2, per pair kind.
    loss, _ = vlm_preference_loss(adapter, batch, VLMMethodConfig())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss, m = vlm_preference_loss(adapter, batch, VLMMethodConfig(rejected_images=True, rejected_images_weight=0.5))
    assert loss.item() == pytest.approx(1.5 * math.log(2), abs=1e-5) and "image/rewards/margins" in m
    inputs = adapter.encode(*pair_rows(batch))
    with torch.no_grad():
        chosen = adapter.policy_logps(inputs).split(4)[0]
    for reduction, nll in (("sum", -chosen.sum.mean()), ("mean", -chosen.mean.mean())):
        loss, m = vlm_preference_loss(adapter, batch, VLMMethodConfig(sft_weight=0.3, sft_reduction=reduction))
        assert loss.item() == pytest.approx(math.log(2) + 0.3 * nll.item(), rel=1e-5)
        assert m["sft/nll"].item() == pytest.approx(nll.item(), rel=1e-5)
        loss, _ = vlm_preference_loss(adapter, batch, VLMMethodConfig(name="sft", sft_reduction=reduction))
        assert loss.item() == pytest.approx(nll.item(), rel=1e-5)
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        pol = adapter.policy_logps(inputs).split(4)
    ref = adapter.reference_logps(inputs).split(4)
    loss, _ = vlm_preference_loss(adapter, batch, VLMMethodConfig(surrogate="mean", beta=2.0))
    want, _ = dpo_loss(pol[0].mean, pol[1].mean, ref[0].mean, ref[1].mean, 2.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    with pytest.raises(ValueError, match="loss_type 'dpo'"):
        VLMMethodConfig(loss_type="dpo")


def _config(toy_vlm, pairs, tmp_path, **over):
    from mmalign.train.tasks import load_train_config

    data = {"task": "vlm", "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
            "model": {"pretrained": toy_vlm}, "method": {"beta": 0.5},
            "data": {"shards": pairs, "shuffle_buffer": 64},
            "optim": {"lr": 2e-3, "lr_scheduler": "constant", "weight_decay": 0.0},
            "train": {"max_steps": 30, "batch_size": 8, "progress": False}}
    overrides = [f"{k}={v}" for k, v in over.items()]
    return load_train_config(None, overrides, defaults=data)


def test_a_short_toy_dpo_run_lowers_the_loss_and_saves_a_loadable_model(toy_vlm, pairs, tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmalign.train.metrics import read_metrics
    from mmalign.train.trainer import train

    result = train(_config(toy_vlm, pairs, tmp_path))
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == frozen copy at step 1
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert rows[-1]["rewards/accuracies"] > 0.8
    model = AutoModelForImageTextToText.from_pretrained(result.outputs["model"])
    trained = dict(result.module.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name].detach()), name


def test_lora_run_reference_is_the_base_and_the_adapter_loads_with_peft(toy_vlm, pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmalign.vlm.adapter import load_vlm
    from mmalign.train.trainer import train

    cfg = _config(toy_vlm, pairs, tmp_path, **{"model.lora": "{rank: 4, alpha: 8, dropout: 0.0}",
                                               "train.max_steps": 4})
    result = train(cfg)
    from mmalign.vlm.processing import pair_rows

    batch = _batch(pairs)
    trained = load_vlm(toy_vlm, lora={"rank": 4, "alpha": 8, "dropout": 0.0}, reference="lora")
    trained.model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(toy_vlm),
                                              result.outputs["lora"])
    copy_ = load_vlm(toy_vlm, reference="copy")
    inputs = trained.encode(*pair_rows(batch))
    with torch.no_grad():
        policy = trained.logps(trained.model, inputs)
        live = trained.logps(result.module, inputs)
    torch.testing.assert_close(policy.sum, live.sum, atol=1e-4, rtol=0)
    torch.testing.assert_close(trained.reference_logps(inputs).sum, copy_.reference_logps(inputs).sum, atol=1e-4,
                               rtol=0)
    assert (policy.sum - copy_.reference_logps(inputs).sum).abs().max() > 1e-3


def test_precomputed_reference_trains_like_a_live_one(toy_vlm, pairs, tmp_path):
    from mmalign.train.metrics import read_metrics
    from mmalign.train.tasks import task_for
    from mmalign.train.trainer import train

    cfg = _config(toy_vlm, pairs, tmp_path, **{"model.reference": "precomputed", "train.max_steps": 3,
                                               "method.rejected_images": "true"})
    task_for(cfg).build_cache()
    rows = read_metrics(train(cfg).run_dir)
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-4)
    live = read_metrics(train(_config(toy_vlm, pairs, tmp_path / "live", **{
        "train.max_steps": 3, "method.rejected_images": "true"})).run_dir)
    for a, b in zip(rows, live):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_config_errors_name_the_key(toy_vlm, pairs, tmp_path):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="needs model.lora"):
        _config(toy_vlm, pairs, tmp_path, **{"model.reference": "lora"})
    with pytest.raises(ConfigError, match="live reference"):
        _config(toy_vlm, pairs, tmp_path, **{"model.reference": "precomputed", "method.online_weight": 0.5})
    with pytest.raises(ConfigError, match="method.loss_type|loss_type"):
        _config(toy_vlm, pairs, tmp_path, **{"method.loss_type": "nope"})


def test_online_bdhs_mixes_regenerated_rejected_answers(toy_vlm, pairs):
    from mmalign.vlm.adapter import load_vlm

    adapter = load_vlm(toy_vlm, reference="copy")
    batch = _batch(pairs, n=2)
    method = VLMMethodConfig(online_weight=0.5, online_max_new_tokens=4)
    loss, metrics = vlm_preference_loss(adapter, batch, method, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: each part is ln 2
    assert "online/rewards/margins" in metrics


@pytest.mark.parametrize("path", ["configs/vlm/llava16_stic_dpo.yaml", "configs/vlm/llava16_bdhs_dpo.yaml",
                                  "configs/vlm/qwen2vl_stic_dpo.yaml", "configs/vlm/qwen2vl_bdhs_dpo.yaml",
                                  "configs/vlm/toy_stic_dpo.yaml", "configs/vlm/toy_bdhs_dpo.yaml",
                                  "configs/vlm/toy_sft.yaml"])
def test_recipes_validate(path):
    from pathlib import Path

    from mmalign.train.tasks import load_train_config

    cfg = load_train_config(Path(__file__).parents[1] / path)
    assert cfg.task == "vlm"
    if "toy" not in path:
        assert cfg.method.beta == 0.1 and cfg.model.lora.rank == 128 and cfg.model.lora.alpha == 256


def test_over_long_prompts_are_skipped_and_counted_not_taken_for_non_finite_losses(toy_vlm, pairs, tmp_path):
    """Every prompt is longer than max_prompt_length: each micro-batch is dropped and counted under
    skipped/prompt_too_long; the run completes (more than max_consecutive_nonfinite steps), nothing trains, no
    non-finite step is counted. strict: the error itself."""
    from transformers import AutoModelForImageTextToText

    from mmalign.train.metrics import read_metrics
    from mmalign.train.trainer import DataError, train

    result = train(_config(toy_vlm, pairs, tmp_path, **{"model.max_prompt_length": 10, "train.max_steps": 6,
                                                         "train.max_consecutive_nonfinite": 2}))
    rows = read_metrics(result.run_dir)
    assert [r["skipped/prompt_too_long"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert result.skipped_batches == {"prompt_too_long": 6}
    assert result.nonfinite_steps == 0 and all(r["nonfinite_steps"] == 0 for r in rows)
    base = dict(AutoModelForImageTextToText.from_pretrained(toy_vlm).named_parameters())
    for name, p in result.module.named_parameters():
        assert torch.equal(p.detach(), base[name].detach()), name
    with pytest.raises(DataError, match="data.strict: sample .* max_prompt_length=10"):
        train(_config(toy_vlm, pairs, tmp_path / "strict", **{"model.max_prompt_length": 10,
                                                               "data.strict": "true"}))


SKIP_SCRIPT = """
import json, sys
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train
folder, shards, out = sys.argv[1:4]
cfg = load_train_config(None, [], defaults={
    "task": "vlm", "run": {"output_dir": out, "seed": 0}, "model": {"pretrained": folder, "max_prompt_length": 120},
    "data": {"shards": shards, "shuffle_buffer": 0}, "optim": {"lr": 1e-3},
    "train": {"max_steps": 2, "batch_size": 1, "progress": False}})
res = train(cfg)
import torch.distributed as dist
json.dump({"skipped": res.skipped_batches, "nonfinite": res.nonfinite_steps,
           "logged": res.metrics.get("skipped/prompt_too_long")}, open(f"{out}/rank{dist.get_rank()}.json", "w"))
"""


def test_a_micro_batch_skipped_on_one_process_is_dropped_on_all_without_hanging(toy_vlm, tmp_path):
    """2 processes: rank 1 reads only over-long prompts, rank 0 none. Every micro-batch is dropped on both (their
    forward passes are collective under DDP, so a process skipping alone would hang the other), counted once."""
    import json

    from PIL import Image
    from dist_helpers import torchrun2

    from mmalign.data import ShardSetWriter, vlm_pair_sample
    from mmalign.toy.scenes import sample_scenes

    shards = tmp_path / "pairs"
    with ShardSetWriter(shards, "vlm_pair") as w:
        for i, scene in enumerate(sample_scenes(8, seed=2)):
            prompt = "describe the image" + (" in great detail" * 40 if i % 2 else "")
            w.write(vlm_pair_sample(f"p-{i:04d}", [Image.fromarray(scene.render())], prompt=prompt,
                                    chosen=scene.caption, rejected="a picture", provenance={"origin": "ai"}))
    script = tmp_path / "skip.py"
    script.write_text(SKIP_SCRIPT)
    out = tmp_path / "run"
    torchrun2(script, toy_vlm, shards, out, timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["skipped"] == {} and ranks[1]["skipped"] == {"prompt_too_long": 2}
    assert all(r["nonfinite"] == 0 and r["logged"] == 2 for r in ranks)
