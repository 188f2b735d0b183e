"""The generic training loop on a task that is not text-to-image: linear regression on synthetic tensors.

The task is registered here, through the same registry and protocol a new modality uses, so the loop's training,
checkpoints, exact resume, stateful objects, CLI and config errors are tested without any diffusion model.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field

from mmalign.cli import main
from mmalign.config import ConfigError, StrictModel
from mmalign.train import checkpoint as ckpt
from mmalign.train import tasks
from mmalign.train.config import BaseTrainConfig
from mmalign.train.metrics import read_metrics
from mmalign.train.tasks import Built, Task, load_train_config
from mmalign.train.trainer import TrainingError, train

TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


class RegressionData(StrictModel):
    num_samples: int = Field(48, gt=0)
    input_noise: float = Field(0.05, ge=0, description="Gaussian noise added to inputs from the step generator.")


class RegressionConfig(BaseTrainConfig):
    task: Literal["toy_regression"] = "toy_regression"
    data: RegressionData = Field(default_factory=RegressionData)


class RunningMean:
    """A stateful object saved in checkpoints: the running mean of the weights (an EMA stand-in)."""

    def __init__(self, like: torch.Tensor):
        self.mean, self.count = torch.zeros_like(like), 0

    def update(self, w: torch.Tensor) -> None:
        self.count += 1
        self.mean += (w.detach() - self.mean) / self.count

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = state["mean"].clone(), state["count"]


class RegressionTask(Task):
    config_class = RegressionConfig

    def build(self, device) -> Built:
        module = torch.nn.Linear(4, 1).to(device)
        self.avg = RunningMean(module.weight)
        return Built(module=module, params=list(module.parameters()), stateful=[self.avg])

    def batches(self, rank, world_size, skip):
        g = torch.Generator().manual_seed(self.cfg.run.seed)
        x = torch.randn(self.cfg.data.num_samples, 4, generator=g)
        y = x @ TRUE_W.T + 0.25
        bs, produced, epoch = self.cfg.train.batch_size, 0, 0
        while True:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch)).tolist()
            mine = order[rank::world_size]
            for start in range(0, len(mine) - bs + 1, bs):
                produced += 1
                if produced <= skip:
                    continue
                idx = mine[start:start + bs]
                yield {"x": x[idx], "y": y[idx], "keys": [f"s{i:03d}" for i in idx]}
            epoch += 1

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch, generator):
        x = batch["x"] + cfg.data.input_noise * torch.randn(batch["x"].shape, generator=generator)
        loss = torch.nn.functional.mse_loss(module(x), batch["y"])
        return loss, {"mse": loss.detach()}

    def after_optimizer_step(self, unwrapped) -> None:
        self.avg.update(unwrapped.weight)

    def save_final(self, unwrapped, run_dir: Path) -> dict[str, str]:
        from safetensors.torch import save_file

        def write(d: Path) -> None:
            d.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in unwrapped.state_dict().items()}, str(d / "model.safetensors"))

        return {"linear": str(ckpt.atomic_dir(run_dir / "linear", write))}


@pytest.fixture
def registered(monkeypatch):
    # Registered by its lazy "module:attribute" path, as another package would.
    monkeypatch.setitem(tasks.TASKS, "toy_regression", f"{__name__}:RegressionTask")


def cfg_for(tmp_path, *overrides):
    return load_train_config(None, [f"run.output_dir={tmp_path / 'run'}", "train.progress=false", *overrides],
                             defaults={"task": "toy_regression", "optim": {"lr": 0.3, "weight_decay": 0.0, "max_grad_norm": 10.0,
                                                                          "lr_warmup_steps": 0},
                                       "train": {"max_steps": 60, "batch_size": 4}})


def test_the_generic_loop_trains_a_registered_task_and_saves_it(registered, tmp_path):
    cfg = cfg_for(tmp_path, "train.checkpoint_every=30")
    assert isinstance(cfg, RegressionConfig)
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert rows[-1]["loss"] < 0.05 * rows[0]["loss"]
    assert {"mse", "lr", "grad_norm", "samples_per_s", "skipped_samples", "nonfinite_steps"} <= set(rows[0])
    torch.testing.assert_close(result.module.weight.detach(), TRUE_W, atol=0.2, rtol=0)
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step-30", "step-60"]
    from safetensors.torch import load_file

    saved = load_file(Path(result.outputs["linear"]) / "model.safetensors")
    assert torch.equal(saved["weight"], result.module.weight.detach())
    assert yaml.safe_load((Path(result.run_dir) / "config.yaml").read_text())["task"] == "toy_regression"


def test_step_time_and_data_wait_are_logged(registered, tmp_path, monkeypatch):
    """time/data_wait is the time spent in the data iterator per optimizer step: a stream that sleeps 30 ms
    before each micro-batch makes it at least 2 x 30 ms with 2 micro-batches per step (a lower bound, which a
    loaded machine cannot break), within time/step; JSONL and TensorBoard both have it."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def slow(batches):
        def wrapped(self, rank, world_size, skip):
            for batch in batches(self, rank, world_size, skip):
                time.sleep(0.03)
                yield batch
        return wrapped

    monkeypatch.setattr(RegressionTask, "batches", slow(RegressionTask.batches))
    result = train(cfg_for(tmp_path, "train.max_steps=4", "train.gradient_accumulation_steps=2",
                           "train.log_every=2"))
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["time/data_wait"] >= 0.06
        assert r["time/step"] >= r["time/data_wait"]
        assert r["time/data_wait_fraction"] == pytest.approx(r["time/data_wait"] / r["time/step"], rel=1e-9)
        assert 0 < r["time/data_wait_fraction"] <= 1
    events = EventAccumulator(str(Path(result.run_dir) / "tb"))
    events.Reload()
    assert {"time/step", "time/data_wait", "time/data_wait_fraction"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("time/data_wait")] == [2, 4]


def test_the_generic_loop_resumes_bit_exactly(registered, tmp_path):
    common = ["train.max_steps=8", "train.checkpoint_every=3", "train.gradient_accumulation_steps=2"]
    straight = train(cfg_for(tmp_path / "a", *common))
    first = train(cfg_for(tmp_path / "b", *common, "train.max_steps=3"))
    resumed = train(cfg_for(tmp_path / "b", *common, "run.resume=latest"))
    assert first.global_step == 3 and resumed.global_step == 8
    assert first.keys_seen + resumed.keys_seen == straight.keys_seen  # data position restored
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    assert straight.module.weight.ne(first.module.weight).any()  # the second half did train
    rows_a, rows_b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["step"] for r in rows_b] == list(range(1, 9))


def test_stateful_task_objects_are_checkpointed_and_restored(registered, tmp_path, monkeypatch):
    seen = {}
    real_build = RegressionTask.build

    def build(self, device):
        built = real_build(self, device)
        seen[len(seen)] = self
        return built

    monkeypatch.setattr(RegressionTask, "build", build)
    train(cfg_for(tmp_path / "a", "train.max_steps=6"))
    train(cfg_for(tmp_path / "b", "train.max_steps=6", "train.checkpoint_every=4"))
    state = ckpt.read_state(ckpt.list_checkpoints(tmp_path / "b" / "run")[0])
    assert state["global_step"] == 4
    train(cfg_for(tmp_path / "b", "train.max_steps=6", "run.resume=latest"))
    straight, resumed = seen[0].avg, seen[2].avg
    assert resumed.count == straight.count == 6
    assert torch.equal(resumed.mean, straight.mean)


class _Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_never_unpickles_the_stateful_objects(registered, tmp_path):
    """The lr scheduler's and the task's stateful objects are restored with torch.load(weights_only=True):
    a checkpoint whose `stateful_0.pt` holds a code-running pickle is refused, and the code never runs
    (accelerate's load_state unpickles the objects registered with it with weights_only=False)."""
    import pickle

    train(cfg_for(tmp_path, "train.max_steps=2"))
    checkpoint = ckpt.list_checkpoints(tmp_path / "run")[-1]
    saved = torch.load(checkpoint / "stateful_0.pt", weights_only=True)  # plain data
    assert saved["last_epoch"] == 2
    marker = tmp_path / "payload-ran"
    torch.save({"last_epoch": _Payload(str(marker))}, checkpoint / "stateful_0.pt")
    ckpt.write_completion_marker(checkpoint)  # the attacker makes the checkpoint look complete
    with pytest.raises(pickle.UnpicklingError, match="stateful_0.pt: refused"):
        train(cfg_for(tmp_path, "train.max_steps=3", "run.resume=latest"))
    assert not marker.exists()
    (checkpoint / "stateful_0.pt").rename(checkpoint / "custom_checkpoint_0.pkl")  # an older layout: refused too
    (checkpoint / ckpt.MARKER).unlink()  # (older checkpoints have no completion marker)
    with pytest.raises(pickle.UnpicklingError, match="earlier mmalign"):
        train(cfg_for(tmp_path, "train.max_steps=3", "run.resume=latest"))
    assert not marker.exists()


def test_nonfinite_losses_are_handled_by_the_loop_for_any_task(registered, tmp_path, monkeypatch):
    monkeypatch.setattr(RegressionTask, "compute_loss",
                        staticmethod(lambda *a: (torch.tensor(float("nan"), requires_grad=True), {})))
    with pytest.raises(TrainingError, match="2 consecutive steps had a non-finite loss"):
        train(cfg_for(tmp_path, "train.max_consecutive_nonfinite=2"))


def test_a_task_whose_loss_is_not_a_scalar_is_a_clear_error(registered, tmp_path, monkeypatch):
    monkeypatch.setattr(RegressionTask, "compute_loss", staticmethod(lambda *a: (torch.ones(3), {})))
    with pytest.raises(TrainingError, match="scalar loss tensor"):
        train(cfg_for(tmp_path))


def test_cli_trains_prints_and_validates_any_registered_task(registered, tmp_path, capsys):
    recipe = tmp_path / "reg.yaml"
    recipe.write_text(yaml.safe_dump({"task": "toy_regression", "train": {"max_steps": 3, "batch_size": 4},
                                      "run": {"output_dir": str(tmp_path / "cli")}}))
    assert main(["train", str(recipe), "--print-config", "data.num_samples=16"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["task"] == "toy_regression" and printed["data"]["num_samples"] == 16
    assert main(["train", str(recipe), "train.progress=false"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "cli")] == [1, 2, 3]
    assert main(["train", str(recipe), "data.num_sample=3"]) == 2
    assert "command line: unknown key 'data.num_sample'" in capsys.readouterr().err
    assert main(["train", str(recipe), "model.pretrained=x"]) == 2  # a t2i section is not a regression key
    assert "unknown key 'model'" in capsys.readouterr().err


def test_unknown_task_names_the_registered_ones(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"task": "t2v", "train": {"max_steps": 1}}))
    with pytest.raises(ConfigError, match=r"key 'task': unknown task 't2v'; registered tasks: .*t2i"):
        load_train_config(recipe)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "unknown task 't2v'" in err and "t2i" in err
    with pytest.raises(ConfigError, match="command line: key 'task': unknown task 'nope'"):
        load_train_config(recipe, ["task=nope"])


def test_registry_rejects_bad_targets(monkeypatch):
    with pytest.raises(ValueError, match="package.module:ClassName"):
        tasks.register_task("x", "no_colon_here")
    monkeypatch.setitem(tasks.TASKS, "ghost", "mmalign.not_a_module:GhostTask")
    with pytest.raises(ConfigError, match="task 'ghost': its module mmalign.not_a_module is not installed"):
        tasks.get_task("ghost")
    monkeypatch.setitem(tasks.TASKS, "notask", "mmalign.train.config:RunConfig")
    with pytest.raises(ConfigError, match="not a mmalign.train.tasks.Task subclass"):
        tasks.get_task("notask")


def test_existing_t2i_configs_default_to_the_t2i_task():
    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "t2i_dpo.yaml")
    from mmalign.t2i.task import T2ITrainConfig
    from mmalign.t2i.task import T2ITask

    assert isinstance(cfg, T2ITrainConfig) and cfg.task == "t2i" and tasks.get_task("t2i") is T2ITask


# -- optim.name adafactor --------------------------------------------------------------------------------------------
ADAFACTOR_SHAPES = [(7,), (5, 6), (4, 3, 3, 3), (2, 3, 1, 1), (3, 20, 7), (8, 4, 5), (6, 2, 3)]


def _adafactor_params(seed: int, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in ADAFACTOR_SHAPES]


def _set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:  # gradients of very different sizes, so update clipping acts on some parameters, not others
        scale = 10.0 ** torch.randint(-4, 1, (), generator=gen).item()
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
    params[1].grad[0] = 0.0  # an all-zero row: eps keeps its factor finite


@pytest.mark.parametrize("beta1,weight_decay,dtype", [(None, 0.0, torch.float32), (None, 0.01, torch.float32),
                                                      (0.9, 0.01, torch.float32), (None, 0.01, torch.bfloat16)])
def test_adafactor_matches_transformers(beta1, weight_decay, dtype):
    """mmalign's Adafactor is transformers' `Adafactor(scale_parameter=False, relative_step=False)` (the published
    SDXL recipes' optimizer) to float32 rounding, for vectors, matrices, 3-D tensors and conv kernels (whose
    factored statistics take the strided path), with and without weight decay and first moment, float32 and
    bfloat16 weights; its state has transformers' keys, and a state saved by one continues identically in the
    other."""
    from transformers.optimization import Adafactor as Reference

    from mmalign.train.optim import Adafactor

    ours, ref = _adafactor_params(0, dtype), _adafactor_params(0, dtype)
    kw = dict(lr=1e-2, weight_decay=weight_decay, beta1=beta1)
    opt = Adafactor(ours, **kw)
    ref_opt = Reference(ref, scale_parameter=False, relative_step=False, warmup_init=False, **kw)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for step in range(6):
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, **tol)
    assert not all(torch.equal(a, b) for a, b in zip(ours, _adafactor_params(0, dtype)))  # it moved
    for p, q in zip(ours, ref):
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, ref_opt.state[q][key], rtol=1e-4, atol=1e-12)

    # transformers' state into ours (a checkpoint from before the switch) continues like transformers
    resumed = Adafactor(ours, **kw)
    saved = io.BytesIO()
    torch.save(ref_opt.state_dict(), saved)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for p, q in zip(ours, ref):
        p.data.copy_(q.data)
    _set_grads(ours, 6)
    _set_grads(ref, 6)
    resumed.step()
    ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)


def test_optim_name_adafactor_trains_with_mmalign_adafactor(registered, tmp_path):
    from mmalign.train.optim import Adafactor
    from mmalign.train.trainer import build_optimizer

    cfg = cfg_for(tmp_path, "optim.name=adafactor", "optim.lr=0.1", "optim.weight_decay=0.001")
    opt, _, lr = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3, 4))], 1)
    assert isinstance(opt, Adafactor)
    assert lr == opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.001
    rows = read_metrics(train(cfg).run_dir)
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"]
    with pytest.raises(ValueError, match="lr must be > 0"):
        Adafactor([torch.nn.Parameter(torch.zeros(2))], lr=0.0)


def test_adafactor_is_refused_under_deepspeed(registered, tmp_path):
    """ZeRO hands the optimizer flat partitions: Adafactor would silently stop factoring, so it is refused (before
    any model loads); DDP and FSDP pass."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mmalign.train.trainer import check_optimizer_placement

    cfg = cfg_for(tmp_path, "optim.name=adafactor")
    with pytest.raises(TrainingError, match="does not run under DeepSpeed"):
        check_optimizer_placement(cfg, SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.NO):
        check_optimizer_placement(cfg, SimpleNamespace(distributed_type=kind))
    check_optimizer_placement(cfg_for(tmp_path, "optim.name=adamw"),
                              SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
