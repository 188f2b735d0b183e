"""Reward-model training as a task of the generic loop: losses from mmalign.losses, export, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import torchrun2
import torch

from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(out: Path, *overrides: str):
    return load_train_config(ROOT / "configs/reward/toy_clip.yaml",
                             [f"run.output_dir={out}", f"data.shards={ROOT / 'assets/tiny/pairs'}",
                              "train.progress=false", "train.batch_size=4", "data.shuffle_buffer=16", *overrides])


def test_recipes_validate():
    for name in ("toy_clip", "pickscore", "hps", "video"):
        cfg = load_train_config(ROOT / f"configs/reward/{name}.yaml")
        assert cfg.task == "reward" and cfg.model.kind in ("clip", "hps", "video")


def test_image_pair_loss_is_the_loss_core_on_scorer_rewards():
    from mmalign.losses import soft_ce_loss
    from mmalign.rewards.task import image_pair_loss

    class Fixed(torch.nn.Module):
        def forward(self, images, prompts):
            return images.mean((1, 2, 3)) * 10

    x = torch.rand(6, 3, 8, 8) * 2 - 1
    batch = {"pixel_values": x, "captions": ["a", "b", "c"], "label": torch.tensor([1.0, 0.5, 1.0])}
    loss, metrics = image_pair_loss(Fixed(), batch, "soft_ce")
    r = ((x + 1) / 2).mean((1, 2, 3)) * 10
    expected, _ = soft_ce_loss(r[:3], r[3:], torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(loss, expected)
    bt, m = image_pair_loss(Fixed(), batch, "bt")
    assert m["rewards/num_ties"] == 1 and m["rewards/num_pairs"] == 2


def test_toy_recipe_trains_exports_and_resumes_exactly(tmp_path):
    from mmalign.rewards import load_scorer

    common = ["train.max_steps=4", "train.checkpoint_every=2"]
    straight = train(cfg_for(tmp_path / "a", *common))
    first = train(cfg_for(tmp_path / "b", *common, "train.max_steps=2"))
    resumed = train(cfg_for(tmp_path / "b", *common, "run.resume=latest"))
    assert first.keys_seen + resumed.keys_seen == straight.keys_seen
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    scorer = load_scorer(straight.outputs["reward_model"])
    assert scorer.name == "toy_reward" and scorer.scale == "logit_scale"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scorer.score(x, ["a red circle on the left"] * 2),
                                   straight.module(x, ["a red circle on the left"] * 2))
    assert straight.module.model.logit_scale.exp() <= 100 + 1e-4


def test_kind_must_match_the_shards(tmp_path):
    from mmalign.rewards.task import RewardTask

    cfg = cfg_for(tmp_path, "model.kind=video")
    with pytest.raises(ValueError, match="trains on 'video_pair' shards"):
        RewardTask(cfg).check_inputs()


def test_prompt_weights_and_their_config():
    from mmalign.config import ConfigError
    from mmalign.losses import soft_ce_loss
    from mmalign.rewards.task import dataset_prompt_weight, image_pair_loss, prompt_counts_weight

    torch.testing.assert_close(prompt_counts_weight(["a", "b", "a", "a"]), torch.tensor([1 / 3, 1.0, 1 / 3, 1 / 3]))
    torch.testing.assert_close(dataset_prompt_weight([{"ids": {"num_example_per_prompt": 4}}]), torch.tensor([0.25]))
    with pytest.raises(ValueError, match="pair 0 of the batch has no positive provenance"):
        dataset_prompt_weight([{"dataset": "mmalign-toy"}])

    class Fixed(torch.nn.Module):
        def forward(self, images, prompts):
            return images.mean((1, 2, 3)) * 10

    x = torch.rand(6, 3, 8, 8) * 2 - 1
    label = torch.tensor([1.0, 0.5, 1.0])
    batch = {"pixel_values": x, "captions": ["a", "b", "a"], "label": label}
    loss, _ = image_pair_loss(Fixed(), batch, "soft_ce", prompt_weight="batch")
    r = ((x + 1) / 2).mean((1, 2, 3)) * 10
    expected, _ = soft_ce_loss(r[:3], r[3:], label, torch.tensor([0.5, 1.0, 0.5]))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="btt takes no per-pair weights"):
        load_train_config(ROOT / "configs/reward/toy_clip.yaml", ["method.loss=btt", "method.prompt_weight=batch"])


GATHER_SCRIPT = r"""
import json, sys
import torch
from accelerate import Accelerator
from mmalign.rewards.task import image_pair_loss

acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
B = 4  # pairs per process


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(3 * 4 * 4, 1)
        self.prompt = torch.nn.Embedding(4, 1)

    def forward(self, images, prompts):
        ids = torch.tensor([int(p[1:]) for p in prompts])
        return 3 * self.image(images.flatten(1)).squeeze(1) + self.prompt(ids).squeeze(1)


g = torch.Generator().manual_seed(1)
n = B * world
x_w, x_l = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
captions = ["p0", "p1", "p1", "p2", "p0", "p0", "p3", "p1"][:n]
label = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5])[:n]  # rank 0 holds 3 ties, rank 1 one
prov = [{"ids": {"num_example_per_prompt": c}} for c in (1, 2, 3, 4, 5, 6, 7, 8)][:n]


def batch(rows):
    return {"pixel_values": torch.cat([x_w[rows], x_l[rows]]), "captions": captions[rows], "label": label[rows],
            "provenance": prov[rows]}


out = {}
for loss, weight in (("soft_ce", "batch"), ("soft_ce", "dataset"), ("bt", "none"), ("btt", "none")):
    for gather in (True, False):
        model = acc.prepare(Model())
        value, metrics = image_pair_loss(model, batch(slice(rank * B, rank * B + B)), loss, 5.0, weight, gather)
        acc.backward(value)
        out[f"{loss}-{weight}-{gather}"] = {
            "loss": value.item(), "accuracy": metrics["rewards/accuracy"].item(),
            "grads": [p.grad.flatten().tolist() for p in acc.unwrap_model(model).parameters()]}
        if rank == 0 and gather:
            ref = Model()
            value, metrics = image_pair_loss(ref, batch(slice(0, n)), loss, 5.0, weight, gather=False)
            value.backward()
            out[f"{loss}-{weight}-reference"] = {
                "loss": value.item(), "accuracy": metrics["rewards/accuracy"].item(),
                "grads": [p.grad.flatten().tolist() for p in ref.parameters()]}
json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # a clean shutdown: gloo's threads must not outlive the interpreter
"""


@pytest.mark.distributed
def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    import json

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    torchrun2(script, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for case in ("soft_ce-batch", "soft_ce-dataset", "bt-none", "btt-none"):
        ref = r0[f"{case}-reference"]
        for r in (r0, r1):
            got = r[f"{case}-True"]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), case
            assert got["accuracy"] == pytest.approx(ref["accuracy"]), case
            for a, b in zip(got["grads"], ref["grads"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-7)
    # Without gathering, each process normalises over its own pairs: with uneven ties (bt) or prompt counts that
    # straddle the processes (batch weights) the averaged gradient is not the global batch's.
    for case in ("soft_ce-batch", "bt-none"):
        ungathered = torch.tensor(r0[f"{case}-False"]["grads"][0])
        assert not torch.allclose(ungathered, torch.tensor(r0[f"{case}-reference"]["grads"][0]), rtol=1e-3), case


TRAIN_SCRIPT = r"""
import hashlib, json, sys
import torch
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

cfg = load_train_config(sys.argv[1], sys.argv[2:])
res = train(cfg)
rank = torch.distributed.get_rank()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in res.module.parameters())).hexdigest()
x = torch.linspace(0, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
with torch.no_grad():
    scores = res.module(x, ["a red circle on the left", "a blue square on the right"]).tolist()
json.dump({"keys": res.keys_seen, "digest": digest, "scores": scores, "loss": res.metrics["loss"]},
          open(f"{cfg.run.output_dir}/rank{rank}.json", "w"))
"""


@pytest.mark.distributed
def test_two_process_reward_training_disjoint_data_identical_parameters_and_export(tmp_path):
    import json

    from mmalign.rewards import load_scorer
    from mmalign.rewards.clip import load_clip_scorer

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run = tmp_path / "run"
    torchrun2(script, ROOT / "configs/reward/toy_clip.yaml", f"run.output_dir={run}",
              f"data.shards={ROOT / 'assets/tiny/pairs'}", "train.progress=false", "train.batch_size=4",
              "train.max_steps=3", "train.checkpoint_every=0", "data.shuffle_buffer=16", "method.prompt_weight=batch")
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["keys"]) == len(r1["keys"]) == 12
    assert not set(r0["keys"]) & set(r1["keys"])  # each rank its own pairs
    assert r0["digest"] == r1["digest"]  # gradients were synchronised
    assert r0["loss"] == pytest.approx(r1["loss"])  # the gathered loss is the global batch's on both ranks
    scorer = load_scorer(str(run / "reward_model"))
    x = torch.linspace(0, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        exported = scorer.score(x, ["a red circle on the left", "a blue square on the right"])
    torch.testing.assert_close(exported, torch.tensor(r0["scores"]))
    init = load_clip_scorer(str(run / "tiny_clip_seed0"), name="init", scale="logit_scale")
    with torch.no_grad():
        assert not torch.allclose(init.score(x, ["a red circle on the left"] * 2)[:1], exported[:1])
