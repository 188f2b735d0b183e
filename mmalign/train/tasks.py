"""Tasks: what the one training loop drives, and the registry that names them (`task:` in a config).

A task is a model family with its objective and data (text-to-image diffusion preferences, reward models, VLM
preferences, ...). The loop in `mmalign.train.trainer` owns everything tasks share: the accelerator, optimizer and
lr schedule, gradient accumulation and clipping, mixed-precision autocast, non-finite steps, metrics, the progress
bar, atomic checkpoints and exact resume. The task owns what differs: which modules are built and which of their
parameters train (LoRA, frozen parts, EMA, dtypes), how batches are read, the loss, and what is saved at the end.

## Adding a task

1. A config: subclass `BaseTrainConfig` (`run`, `optim`, `train` come with it), narrow `task` to your name and add
   your sections, each a `StrictModel` (unknown keys are errors):

       class RewardTrainConfig(BaseTrainConfig):
           task: Literal["reward"] = "reward"
           model: RewardModelConfig
           data: RewardDataConfig

2. A task: subclass `Task`, set `config_class`, implement the four required hooks (see `Task`):

       class RewardTask(Task):
           config_class = RewardTrainConfig
           def build(self, device): ...            # -> Built(module, params, model, stateful)
           def batches(self, rank, world_size, skip): ...
           @staticmethod
           def compute_loss(cfg, model, module, unwrapped, batch, generator): ...   # -> (loss, metrics)
           def save_final(self, unwrapped, run_dir): ...                          # -> {"name": path}

3. Register it with one line in `TASKS` below (`"reward": "mmalign.rewards.task:RewardTask"`), or at run time
   with `register_task("reward", "mmalign.rewards.task:RewardTask")`. The module is imported only when a config
   asks for that task, so `mmalign.train` never imports your package eagerly.

Then `mmalign train CONFIG`, `--print-config`, `key=value` overrides, checkpoints and `run.resume=latest` work for
it. Exact resume holds when `batches(rank, world_size, skip)` yields the same stream for the same arguments and
`compute_loss` draws all its randomness from `generator`. `tests/test_train_generic.py` is a complete small task.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from mmalign.config import ConfigError, apply_overrides, load_yaml, validate_config
from mmalign.train.config import BaseTrainConfig

# task name -> "module:attribute" of its Task subclass, imported on first use.
TASKS: dict[str, str] = {
    "t2i": "mmalign.t2i.task:T2ITask",
    "vlm": "mmalign.vlm.task:VLMTask",
    "reward": "mmalign.rewards.task:RewardTask",
    "flow": "mmalign.flow.task:FlowTask",
    "music": "mmalign.music.task:MusicTask",
    "spo_online": "mmalign.selfgen.spo_online:SPOOnlineTask",
}


class SkipBatch(Exception):
    """Raised by `compute_loss` for a micro-batch that cannot be used (e.g. a prompt over the length limit, in
    non-strict mode). The loop drops it on every process (no backward, no optimizer step from it), counts it under
    the metric `skipped/<reason>` and goes on; it is never counted as a non-finite loss.

    reason: a short metric-safe name (`prompt_too_long`); the message says which sample and why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Built:
    """What `Task.build` returns.

    module: the trainable module; the loop wraps it with `accelerator.prepare` (DDP, FSDP, DeepSpeed) and passes
        the wrapped and unwrapped forms to `compute_loss`. It should already be on `device`.
    params: the parameters to optimize (and clip); usually `[p for p in module.parameters() if p.requires_grad]`.
    model: whatever else the step needs, passed to `compute_loss` as is (frozen encoders, a reference model, a
        noise scheduler...); None if nothing.
    stateful: extra objects with `state_dict()` / `load_state_dict()` saved in every checkpoint and restored on
        resume (an EMA of the weights, ...). Their state dicts must hold only tensors and plain containers: resume
        loads them with `torch.load(weights_only=True)`.
    """

    module: Any
    params: list
    model: Any = None
    stateful: list = field(default_factory=list)


class Task:
    """The protocol between the loop and a task. One instance per run; `self.cfg` is the validated config.

    Call order: `check_inputs()` (every process, before any model loads), `check_sharded()` if the weights will
    be sharded, `build(device)`, then the loop pulls
    micro-batches from `batches(...)` and calls `compute_loss` on each, `after_optimizer_step` after each
    optimizer step, `validate` every `validation_every` steps, and at the end `save_final` and `validate` once
    more. `save_final` and `validate` run on the main process only.
    """

    config_class: ClassVar[type[BaseTrainConfig]]
    # metrics shown beside the loss on the progress bar, when the step logs them
    progress_metrics: ClassVar[tuple[str, ...]] = ()
    # whether save_final writes a model card and honours run.push_to_hub (refused before training otherwise)
    uploads_to_hub: ClassVar[bool] = False

    def __init__(self, cfg: BaseTrainConfig):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    # -- required ------------------------------------------------------------------------------------------------
    def build(self, device) -> Built:
        """Load the models, choose what trains (LoRA, frozen parts, EMA), set dtypes; the module on `device`."""
        raise NotImplementedError

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        """An endless iterator of micro-batches (dicts) of `train.batch_size` samples for this rank, after
        silently consuming the first `skip` (the data position a resumed run restarts from). It must depend
        only on (config, rank, world_size) so that resume is exact. Optional keys the loop reads: `keys`
        (sample ids, returned in `TrainResult.keys_seen`) and `skipped` (bad samples skipped, logged)."""
        raise NotImplementedError

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch: dict, generator) -> tuple[Any, dict]:
        """One micro-batch -> (scalar loss tensor, {metric name: scalar tensor}). A pure function of its inputs:
        `model` is `Built.model`, `module` the (possibly wrapped) trainable module to run forward through,
        `unwrapped` the bare module (to toggle adapters, read config), `generator` the only randomness (a CPU
        torch.Generator seeded from the run position). Metric names must be the same on every process. A
        micro-batch that cannot be used raises `SkipBatch` (counted, never a NaN loss)."""
        raise NotImplementedError

    def save_final(self, unwrapped, run_dir: Path) -> dict[str, str]:
        """Write the trained model in its ecosystem's format, atomically (`checkpoint.atomic_dir`); return
        {output name: path}. Main process only.

        Sharded training (FSDP, DeepSpeed ZeRO-3): no process holds the whole model, so `unwrapped` cannot be
        saved as it is. The loop gathers the full weights on every process and calls `save_final(unwrapped,
        run_dir, state_dict=full)` on the main process; a task that supports sharded training declares a
        `state_dict: dict | None = None` parameter and saves those weights (under the module's parameter names).
        A task without it is refused before training starts when the weights are sharded."""
        raise NotImplementedError

    # -- optional --------------------------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Fail fast on bad input that needs no model (data counts from the manifest, caches, paths)."""

    def skip_reason(self, batch: dict) -> tuple[str, str] | None:
        """A micro-batch this task cannot use, found before any model runs: `(reason, message)` (reason a short
        metric-safe name, counted as `skipped/<reason>`), else None. The loop asks every process and drops the
        micro-batch on all of them when any says so. Under DDP a skip must be settled here, not by raising
        `SkipBatch` from `compute_loss` on one process: the other processes' forward (which broadcasts buffers)
        would wait for it."""
        return None

    def check_sharded(self) -> None:
        """Called before `build` when the weights will be sharded (FSDP, DeepSpeed ZeRO-3): raise
        `TrainingError` for settings that cannot run sharded, naming the setting and what to use instead."""

    def after_optimizer_step(self, unwrapped) -> None:
        """Called after every successful optimizer step (e.g. an EMA update)."""

    @property
    def validation_every(self) -> int:
        """Steps between `validate` calls during training; 0 = only at the end."""
        return 0

    def validate(self, unwrapped, run_dir: Path, step: int, logger) -> dict[str, str]:
        """Write validation outputs (an image grid with `logger.image(...)`, a score, ...); return {output name:
        path} ({} if none). Main process only."""
        return {}

    def num_samples(self, batch: dict) -> int:
        """Samples in a micro-batch, for `samples_per_s`."""
        return len(batch["keys"])

    def build_cache(self) -> Path:
        """`mmalign train CONFIG --cache-only`: precompute what training can read instead of encoding."""
        raise NotImplementedError(f"task {self.cfg.task!r} has no cache to build (--cache-only)")


def register_task(name: str, target: str | type[Task]) -> None:
    """Register `name` -> a Task subclass or its lazy "module:attribute" path (replaces an earlier entry)."""
    if isinstance(target, str) and target.count(":") != 1:
        raise ValueError(f"task {name!r}: target {target!r} is not of the form 'package.module:ClassName'")
    TASKS[name] = target


def get_task(name: str) -> type[Task]:
    """The Task subclass registered as `name` (imports its module on first use)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    target = TASKS[name]
    if isinstance(target, str):
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise ConfigError(f"task {name!r}: its module {module_name} is not installed or not built "
                                  f"yet ({err})") from err
            raise
        target = getattr(module, attr, None)
        if target is None:
            raise ConfigError(f"task {name!r}: {module_name} has no attribute {attr!r}")
    if not (isinstance(target, type) and issubclass(target, Task)):
        raise ConfigError(f"task {name!r}: {target!r} is not a mmalign.train.tasks.Task subclass")
    return target


def task_for(cfg: BaseTrainConfig) -> Task:
    """A task instance for a validated config."""
    return get_task(cfg.task)(cfg)


def load_train_config(path: str | os.PathLike | None, overrides=(), defaults: dict | None = None,
                      source: str | None = None) -> BaseTrainConfig:
    """Load a recipe for whichever task its `task:` key names (default t2i) and validate it with that task's
    config class. `defaults` (a dict) is used instead of a file when `path` is None; `source` names it in errors."""
    data = load_yaml(path) if path is not None else dict(defaults or {})
    source = str(path) if path is not None else (source or "<defaults>")
    data, touched = apply_overrides(data, overrides)
    name = data.get("task", "t2i")
    where = "command line" if "task" in touched else source
    if not isinstance(name, str):
        raise ConfigError(f"{where}: key 'task' must be a task name, got {name!r}; registered tasks: "
                          f"{', '.join(sorted(TASKS))}")
    try:
        task = get_task(name)
    except ConfigError as err:
        raise ConfigError(f"{where}: key 'task': {err}") from None
    return validate_config(task.config_class, data, source, touched)
