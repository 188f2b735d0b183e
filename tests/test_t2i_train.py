"""The text-to-image trainer end to end on the tiny recipes (CPU, seconds each)."""

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import torchrun2
import torch

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.train import checkpoint as ckpt
from mmalign.t2i.task import T2ITrainConfig
from mmalign.train.metrics import read_metrics
from mmalign.train.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tiny"


def cfg_for(name, tmp_path, *overrides):
    return load_config(T2ITrainConfig, CONFIGS / name, [f"run.output_dir={tmp_path / 'run'}", "train.progress=false",
                                                     *overrides])


@pytest.mark.parametrize("recipe", ["t2i_dpo.yaml", "t2i_dpo_lora.yaml", "t2i_mapo.yaml", "t2i_rankdpo.yaml",
                                    "t2i_sft.yaml", "t2i_dpo_sdxl.yaml"])
def test_tiny_recipes_run_through_the_cli(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    code = main(["train", str(CONFIGS / recipe), f"run.output_dir={run}", "train.max_steps=4",
                 "train.checkpoint_every=2", "train.progress=false", "validation.num_inference_steps=2"])
    assert code == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (run / "config.yaml").is_file() and list((run / "tb").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2", "step-4"]
    if "dpo" in recipe:
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
        # one metric scheme (mmalign.methods): pairs log chosen/rejected errors, ranked lists their means only
        mse = {"mse/policy", "mse/ref"} if "rankdpo" in recipe else {"mse/ref_chosen", "mse/policy_chosen"}
        assert {"rewards/accuracies", "rewards/margins", *mse, "grad_norm", "lr",
                "samples_per_s", "skipped_samples"} <= set(rows[0])
        assert not ({"mse/policy_chosen", "mse/ref_chosen"} & set(rows[0]) if "rankdpo" in recipe else
                    {"mse/policy", "mse/ref"} & set(rows[0]))
    assert (run / ("lora" if "lora" in recipe else "unet")).is_dir()
    if recipe == "t2i_dpo.yaml":  # the validation grid: 2 prompts x 2 images of 32 px (x4), each with its caption
        from PIL import Image

        grid = np.asarray(Image.open(run / "samples" / "step-000004.png").convert("RGB"))
        assert grid.shape[0] > 2 * 128 and grid.shape[1] >= 2 * 128  # caption bands under the upscaled images
        assert (grid[-4:] == 255).all()  # ending in a white caption band, not an image row


def test_saved_unet_and_lora_load_into_diffusers_pipelines(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    full = train(cfg_for("t2i_dpo.yaml", tmp_path / "full", "train.max_steps=3", "validation.prompts=[]"))
    unet = UNet2DConditionModel.from_pretrained(full.outputs["unet"])
    for (name, a), b in zip(unet.state_dict().items(), full.module.state_dict().values()):
        assert torch.equal(a, b), name
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "assets/tiny/sd15"), unet=unet)
    img = pipe("a red circle on the left", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and math.isfinite(float(img.sum()))

    lora = train(cfg_for("t2i_dpo_lora.yaml", tmp_path / "lora", "train.max_steps=3", "optim.lr=1e-2"))
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "assets/tiny/sd15"))
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(lora.outputs["lora"])
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-4  # the trained LoRA changes the samples
    # ...and reproduces the trained UNet exactly: the loaded pipeline UNet predicts what the trainer's does
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, c).sample, lora.module(x, t, c).sample, rtol=1e-5, atol=1e-5)


def test_resume_matches_an_uninterrupted_run_bit_exactly(tmp_path):
    common = ["train.max_steps=6", "train.checkpoint_every=3", "validation.prompts=[]", "train.batch_size=2"]
    straight = train(cfg_for("t2i_dpo.yaml", tmp_path / "a", *common))
    first = train(cfg_for("t2i_dpo.yaml", tmp_path / "b", *common[1:], "train.max_steps=3"))
    assert first.global_step == 3
    resumed = train(cfg_for("t2i_dpo.yaml", tmp_path / "b", *common, "run.resume=latest"))
    assert resumed.global_step == 6
    assert first.keys_seen + resumed.keys_seen == straight.keys_seen
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    rows = read_metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(tmp_path / "a" / "run")]


def test_resume_with_another_batch_size_or_process_count_continues_after_the_samples_read(tmp_path, capsys):
    """A checkpoint resumed with other train.batch_size x processes (fewer GPUs, say) continues the data after the
    samples already read, with a warning that the order is not an uninterrupted run's (here: 3 steps x 2 samples,
    then batches of 3 skip the first 6 samples)."""
    common = ["validation.prompts=[]", "train.checkpoint_every=0"]
    train(cfg_for("t2i_sft.yaml", tmp_path / "a", *common, "train.max_steps=3", "train.batch_size=2"))
    capsys.readouterr()
    resumed = train(cfg_for("t2i_sft.yaml", tmp_path / "a", *common, "train.max_steps=5", "train.batch_size=3",
                            "run.resume=latest"))
    assert "continues after the 6 samples read so far" in " ".join(capsys.readouterr().out.split())
    fresh = train(cfg_for("t2i_sft.yaml", tmp_path / "b", *common, "train.max_steps=4", "train.batch_size=3"))
    assert resumed.keys_seen == fresh.keys_seen[6:12]
    state = ckpt.read_state(ckpt.list_checkpoints(tmp_path / "a" / "run")[-1])
    assert state["samples_per_micro_step"] == 3 and state["micro_step"] == 4


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    train(cfg_for("t2i_sft.yaml", tmp_path, "train.max_steps=1"))
    with pytest.raises(TrainingError, match="already has checkpoints"):
        train(cfg_for("t2i_sft.yaml", tmp_path, "train.max_steps=1"))


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    import mmalign.train.trainer as trainer

    real = trainer.compute_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(trainer, "compute_loss", flaky)
    result = train(cfg_for("t2i_sft.yaml", tmp_path / "one", "train.max_steps=3"))
    assert result.nonfinite_steps == 1 and result.global_step == 3

    monkeypatch.setattr(trainer, "compute_loss", lambda *a, **k: (torch.tensor(float("inf"), requires_grad=True), {}))
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        train(cfg_for("t2i_sft.yaml", tmp_path / "all", "train.max_steps=10", "train.max_consecutive_nonfinite=3"))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg_for("t2i_sft.yaml", tmp_path, "train.max_steps=2", "train.checkpoint_every=1",
                  "train.checkpoints_total_limit=1"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2"]
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-2").iterdir()}

    def full_disk(tmp):
        Path(tmp).mkdir(parents=True)
        (Path(tmp) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(run, 3, full_disk, {"global_step": 3}, total_limit=1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2"]
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-2").iterdir()} == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(Exception, match="no such model folder"):
        train(cfg_for("t2i_dpo.yaml", tmp_path / "a", f"model.pretrained={tmp_path}/missing/model"))
    with pytest.raises(Exception, match="multiple of 16"):
        train(cfg_for("t2i_dpo_sdxl.yaml", tmp_path / "b", "data.resolution=40"))
    from mmalign.data.schemas import pair_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.scenes import sample_scene

    img = sample_scene(0).render()
    with ShardSetWriter(tmp_path / "ties", "pair") as w:
        for i in range(4):
            w.write(pair_sample(f"k{i}", img, img, caption="a red circle on the left", label_0=0.5))
    with pytest.raises(ValueError, match="no usable"):
        train(cfg_for("t2i_dpo.yaml", tmp_path / "c", f"data.shards={tmp_path / 'ties'}"))


DIST_SCRIPT = """
import json, sys, hashlib, torch
from mmalign.config import load_config
from mmalign.t2i.task import T2ITrainConfig
from mmalign.train.trainer import train
cfg = load_config(T2ITrainConfig, sys.argv[1], sys.argv[2:])
res = train(cfg)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in res.module.parameters())).hexdigest()
rank = torch.distributed.get_rank()
json.dump({"keys": res.keys_seen, "digest": digest}, open(f"{cfg.run.output_dir}/rank{rank}.json", "w"))
"""


@pytest.mark.distributed
def test_two_process_run_sees_disjoint_data_and_ends_with_identical_parameters(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    run = tmp_path / "run"
    torchrun2(script, CONFIGS / "t2i_dpo.yaml", f"run.output_dir={run}", "train.max_steps=4", "train.batch_size=2",
              "train.progress=false", "validation.prompts=[]", "train.checkpoint_every=0")
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["keys"]) == len(r1["keys"]) == 8
    assert not set(r0["keys"]) & set(r1["keys"])  # disjoint data
    assert r0["digest"] == r1["digest"]  # gradients were synchronised
    base = load_config(T2ITrainConfig, CONFIGS / "t2i_dpo.yaml", []).model.pretrained
    from diffusers import UNet2DConditionModel
    import hashlib
    init = UNet2DConditionModel.from_pretrained(str(ROOT / base), subfolder="unet")
    init_digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in init.parameters())).hexdigest()
    assert r0["digest"] != init_digest  # and training changed them


FSDP_SCRIPT = """
import sys
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from mmalign.config import load_config
from mmalign.t2i.task import T2ITrainConfig
from mmalign.train.trainer import train

mode, accelerate_config, recipe, *overrides = sys.argv[1:]
if mode == "fsdp":
    # accelerate turns FSDP on only on accelerators; on CPU (gloo) the state is switched to FSDP after start-up,
    # with the settings of the shipped configs/accelerate/fsdp.yaml.
    f = yaml.safe_load(open(accelerate_config))["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=f["fsdp_version"], auto_wrap_policy=f["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=f["fsdp_transformer_layer_cls_to_wrap"].split(","),
        reshard_after_forward=f["fsdp_reshard_after_forward"], state_dict_type=f["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=f["fsdp_cpu_ram_efficient_loading"], cpu_offload=f["fsdp_offload_params"])
    init = Accelerator.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin

    Accelerator.__init__ = fsdp_init
elif mode == "ddp_in_fsdp_order":
    # DDP, with every block fsdp.yaml shards taking its inputs through one pass-through autograd node, as
    # fully_shard does (RegisterPostBackwardFunction). The node changes no value, only the order in which a tensor
    # read by several consumers adds up their gradients: the output of the tiny UNet's down_blocks.1 feeds
    # mid_block.resnets.0 twice (norm1 and the residual) and up_blocks.0 (skip connection); FSDP2 sums
    # (norm1 + residual) + skip, plain DDP (skip + residual) + norm1, one rounding apart. In FSDP2's order the
    # DDP run is the bitwise reference for the FSDP one.
    import torch

    wrapped = yaml.safe_load(open(accelerate_config))["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")

    class PassThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            return tensors

        @staticmethod
        def backward(ctx, *grads):
            return grads

    def through_one_node(module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        args = list(args)
        slots = [(args, i) for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
        slots += [(kwargs, k) for k, v in kwargs.items() if torch.is_tensor(v) and v.requires_grad]
        if slots:
            for (box, key), t in zip(slots, PassThrough.apply(*(box[key] for box, key in slots))):
                box[key] = t
        return tuple(args), kwargs

    prepare = Accelerator.prepare

    def prepare_in_fsdp_order(self, *objs, **kwargs):
        for obj in objs:
            for module in obj.modules() if isinstance(obj, torch.nn.Module) else ():
                if type(module).__name__ in wrapped:
                    module.register_forward_pre_hook(through_one_node, with_kwargs=True)
        return prepare(self, *objs, **kwargs)

    Accelerator.prepare = prepare_in_fsdp_order
train(load_config(T2ITrainConfig, recipe, overrides))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("optim", ["adamw", "adafactor"])
def test_fsdp2_checkpoints_and_saves_the_full_unet(tmp_path, optim):
    """FSDP2 (configs/accelerate/fsdp.yaml) on 2 CPU processes: every process writes its shard of each checkpoint,
    and the final unet/ holds the full weights (a rank-0 `save_pretrained` of the sharded UNet fails), equal to a
    DDP run on the same data; a run resumed from the sharded step-2 checkpoint ends bit-identical to the
    uninterrupted one. Adafactor (mmalign's, on FSDP's row shards: its statistics add up across the ranks)
    included."""
    from diffusers import UNet2DConditionModel

    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    common = [str(CONFIGS / "t2i_dpo.yaml"), "train.max_steps=3", "train.batch_size=2", "train.progress=false",
              "validation.prompts=[]", "train.checkpoint_every=2", f"optim.name={optim}",
              f"optim.lr={1e-3 if optim == 'adafactor' else 1e-4}"]
    for mode in ("fsdp", "ddp"):
        torchrun2(script, mode, ROOT / "configs" / "accelerate" / "fsdp.yaml", *common,
                  f"run.output_dir={tmp_path / mode}", timeout=600)
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-2").rglob("*"))
    assert "pytorch_model_fsdp_0" in shards and "optimizer_0" in shards
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(shards)  # both processes saved
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "fsdp")] == ["step-2", "step-3"]
    fsdp = UNet2DConditionModel.from_pretrained(tmp_path / "fsdp" / "unet")
    ddp = UNet2DConditionModel.from_pretrained(tmp_path / "ddp" / "unet")
    init = UNet2DConditionModel.from_pretrained(ROOT / "assets" / "tiny" / "sd15", subfolder="unet")
    moved = 0
    for (name, a), b, c in zip(fsdp.state_dict().items(), ddp.state_dict().values(), init.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(a, c)
    assert moved > len(init.state_dict()) // 2  # trained: most tensors changed

    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    proc = torchrun2(script, "fsdp", ROOT / "configs" / "accelerate" / "fsdp.yaml", *common, "run.resume=latest",
                     f"run.output_dir={tmp_path / 'resumed'}", timeout=600)
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "unet")
    for (name, a), b in zip(fsdp.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.distributed
def test_fsdp2_lora_matches_ddp_and_ema_is_refused_before_training(tmp_path):
    """LoRA under FSDP2 (the reference = the sharded UNet with its adapters disabled) saves bitwise the adapters
    of DDP run with FSDP2's order of summing gradients (FSDP_SCRIPT's ddp_in_fsdp_order); train.ema, which FSDP
    cannot run, fails before any model loads with a message naming the setting.

    Not plain DDP within a tolerance: there the one rounding of a different summation order (step 1, 8 lora_B
    gradients, relative 2e-7) grows to about 3e-5 in lora_A by step 2 and then stays, as large as a real error
    would make it. Diffusion-DPO's beta 5000 turns one-ulp changes of the errors into 5e-5 relative changes of
    the gradients, and AdamW's first update of lora_A (gradients near zero while lora_B is still ~1e-3) divides
    the few gradients below eps = 1e-8 by eps (update ~ lr * g / eps)."""
    from safetensors.torch import load_file

    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    accel = ROOT / "configs" / "accelerate" / "fsdp.yaml"
    common = ["train.max_steps=3", "train.batch_size=2", "train.progress=false", "validation.prompts=[]"]
    modes = ("fsdp", "ddp_in_fsdp_order")
    for mode in modes:
        torchrun2(script, mode, accel, CONFIGS / "t2i_dpo_lora.yaml", *common, f"run.output_dir={tmp_path / mode}",
                  timeout=600)
    fsdp, ddp = (load_file(tmp_path / mode / "lora" / "pytorch_lora_weights.safetensors") for mode in modes)
    assert sorted(fsdp) == sorted(ddp) and any("lora_B" in k for k in fsdp)
    for name, a in fsdp.items():
        torch.testing.assert_close(a, ddp[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert all(fsdp[k].abs().max() > 0 for k in fsdp if "lora_B" in k)  # trained: B starts at zero

    proc = torchrun2(script, "fsdp", accel, CONFIGS / "t2i_dpo.yaml", *common, "train.ema=true",
                     f"run.output_dir={tmp_path / 'ema'}", timeout=600, check=False)
    assert proc.returncode != 0
    assert "train.ema is not supported with sharded weights" in proc.stderr
    assert "Loading" not in proc.stderr  # refused before any model loaded
