"""One training loop on accelerate for every recipe: config -> task (model + loss + data) + optimizer.

The loop below is the only one. It drives a task (`mmalign.train.tasks.Task`, chosen by the config's `task:`
key) and owns what every task shares: gradient accumulation, mixed-precision autocast, clipping, the optimizer
and lr schedule, non-finite steps, metrics (JSONL + TensorBoard), the progress bar, atomic checkpoints and exact
resume. The task owns its models (what trains, LoRA, EMA, dtypes), its batches, its loss and its final outputs.

Exact resume: the checkpoint holds model, optimizer, scheduler, the task's stateful objects and RNG states
(`accelerator.save_state`) plus the data position (micro-batches consumed); a resumed run asks the task for the
same stream minus what was consumed, and every step's randomness comes from `step_generator(seed, step, micro,
rank)`, which depends only on where the run is.

Adding a task: see the module docstring of `mmalign.train.tasks` and docs/training.md.
"""

from __future__ import annotations

import inspect
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmalign.config import write_resolved_config
from mmalign.train import checkpoint as ckpt
from mmalign.train.config import BaseTrainConfig
from mmalign.train.distributed import gather_objects
from mmalign.train.metrics import MetricsLogger
from mmalign.train.tasks import SkipBatch, Task, get_task, task_for


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


class DataError(TrainingError, ValueError):
    """The training data cannot be used (e.g. no usable pairs); raised before any model loads."""


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator seeded from (seed, optimizer step, micro-batch, rank): timesteps, noise, latent draws and
    empty-prompt choices depend only on where the run is, which makes resume exact without replaying RNGs."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainState:
    global_step: int = 0
    micro_step: int = 0  # micro-batches consumed from the data stream (data position)
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    # train.batch_size x processes of the run that saved (None in checkpoints written before it was recorded)
    samples_per_micro_step: int | None = None
    # micro-batches a task skipped (`SkipBatch`), by reason, on this process
    skipped_batches: dict[str, int] = field(default_factory=dict)


def build_optimizer(cfg: BaseTrainConfig, params: list[Tensor], num_processes: int):
    """Optimizer and lr schedule from `optim`; returns (optimizer, scheduler, lr actually used)."""
    o = cfg.optim
    lr = o.lr
    if o.scale_lr:
        lr = lr * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * num_processes
    if o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise TrainingError("optim.name 'adamw8bit' needs bitsandbytes: pip install 'mmalign[gpu]'") from err
        opt = bnb.optim.AdamW8bit(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    else:
        from mmalign.train.optim import Adafactor  # transformers' update with a fixed lr, in fewer passes

        opt = Adafactor(params, lr=lr, weight_decay=o.weight_decay)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler(o.lr_scheduler, optimizer=opt, num_warmup_steps=o.lr_warmup_steps,
                          num_training_steps=cfg.train.max_steps)
    return opt, sched, lr


def compute_loss(cfg: BaseTrainConfig, model, module, unwrapped, batch: dict,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's (loss, metrics) for `cfg.task`: the registered task's `compute_loss`, result checked.

    The loop calls this module-level function, so a wrapper (or a test) replaces the step in one place.
    """
    loss, metrics = get_task(cfg.task).compute_loss(cfg, model, module, unwrapped, batch, generator)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise TrainingError(f"task {cfg.task!r}: compute_loss must return a scalar loss tensor, got "
                            f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
    return loss, metrics


def _check_run_dir(cfg: BaseTrainConfig, run_dir: Path) -> None:
    """Refuse a run folder or `run.resume` that cannot work, before the accelerator starts or any model loads
    (it only reads the file system, so every process can run it)."""
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        what = "is" if existing == run_dir else f"is inside {existing}, which is"
        raise TrainingError(f"run.output_dir {run_dir} {what} not a folder; choose another run.output_dir")
    resume = cfg.run.resume
    if resume is not None and resume != "latest" and not (Path(resume) / ckpt.STATE_FILE).is_file():
        raise TrainingError(f"run.resume {resume}: not a checkpoint folder (no {ckpt.STATE_FILE}); use 'latest' or "
                            f"a folder like {run_dir / 'checkpoints' / 'step-100'}")
    if cfg.run.resume is None and ckpt.list_checkpoints(run_dir) and not cfg.run.overwrite:
        raise TrainingError(f"run.output_dir {run_dir} already has checkpoints; resume with run.resume=latest, "
                            "choose another run.output_dir, or set run.overwrite=true")


@dataclass
class TrainResult:
    global_step: int
    metrics: dict[str, float]  # the last logged row
    run_dir: str
    outputs: dict[str, str]  # from the task's save_final and final validate, e.g. "unet" / "lora" / "grid"
    skipped_samples: int
    nonfinite_steps: int
    module: torch.nn.Module  # the trained (unwrapped) module of this process
    keys_seen: list[str]  # sample keys this process consumed, in order
    skipped_batches: dict[str, int]  # micro-batches the task skipped on this process, by reason (`SkipBatch`)


def train(cfg: BaseTrainConfig) -> TrainResult:
    """Run a recipe of any registered task (the library entry point behind `mmalign train`)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    task: Task = task_for(cfg)
    if cfg.run.push_to_hub and not task.uploads_to_hub:
        raise TrainingError(f"run.push_to_hub: task {cfg.task!r} writes no model card and does not upload yet; set "
                            "run.push_to_hub=false and upload the run's output folder with `hf upload`")
    task.check_inputs()  # bad data, paths, caches: before the accelerator starts or any model loads
    run_dir = Path(cfg.run.output_dir)
    _check_run_dir(cfg, run_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              mixed_precision=cfg.train.mixed_precision,
                              cpu=not torch.cuda.is_available())
    device = accelerator.device
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, run_dir)
    torch.manual_seed(cfg.run.seed)

    sharded = holds_sharded_weights(accelerator)
    if sharded:  # before any model loads: what sharded weights cannot do fails now, not hours later
        if "state_dict" not in inspect.signature(task.save_final).parameters:
            raise TrainingError(f"task {cfg.task!r} cannot save a model trained with sharded weights "
                                f"({accelerator.distributed_type}): its save_final takes no state_dict (see "
                                "Task.save_final); train it with DDP (configs/accelerate/multi_gpu.yaml)")
        task.check_sharded()
    check_optimizer_placement(cfg, accelerator)
    built = task.build(device)
    module, params = built.module, built.params
    if not params:
        raise TrainingError(f"task {cfg.task!r}: build() returned no trainable parameters")
    optimizer, lr_scheduler, _ = build_optimizer(cfg, params, accelerator.num_processes)
    if accelerator.state.deepspeed_plugin is not None:
        # The loop never hands a DataLoader to prepare(), where DeepSpeed would read its micro-batch size.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if sharded and task.validation_every and accelerator.is_main_process:
        accelerator.print("validation during training is skipped: the weights are sharded (FSDP / ZeRO-3); "
                          "validate the saved model instead")
    module, optimizer = accelerator.prepare(module, optimizer)
    # FSDP2 replaces the parameters with sharded ones (and the optimizer's with them): clip what is optimized now.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Saved and restored by the loop (checkpoint.commit_checkpoint / load_stateful), not registered with accelerate,
    # whose load_state unpickles them with weights_only=False.
    stateful = [lr_scheduler, *built.stateful]
    unwrapped = accelerator.unwrap_model(module)

    state = TrainState()
    checks_batches = type(task).skip_reason is not Task.skip_reason
    resume_from = None
    samples_per_micro_step = cfg.train.batch_size * accelerator.num_processes
    # The newest complete checkpoint that loads on every process; incomplete ones are skipped and damaged ones
    # fall back to the previous one, each said in one line; none usable is one error.
    candidates, unusable = ckpt.resume_candidates(run_dir, cfg.run.resume)
    for path, why in unusable:
        accelerator.print(f"warning: skipping checkpoint {path}: {why}")
    for i, candidate in enumerate(candidates):
        error = rng_problem = refused = None
        try:
            loaded, rng_problem = ckpt.load_training_checkpoint(accelerator, candidate, stateful)
            loaded = TrainState(**loaded)
        except ckpt.RefusedCheckpoint as err:
            refused = err  # a file that would run code when loaded: an error, never replaced by an older checkpoint
        except Exception as err:  # noqa: BLE001 - any damage: try the previous checkpoint
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        # [loaded, refused] summed over processes: every process takes the same checkpoint or stops
        flags = torch.tensor([float(error is None and refused is None), float(refused is not None)], device=device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        if refused is not None:
            raise refused
        if flags[1].item() > 0:
            raise TrainingError(f"{candidate}: refused on another process (see its error)")
        if flags[0].item() == accelerator.num_processes:
            resume_from, state = candidate, loaded
            break
        error = error or "it could not be loaded on another process"
        unusable.append((candidate, error))
        then = f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates) else "no older checkpoint"
        accelerator.print(f"warning: checkpoint {candidate} is damaged ({error}); {then}")
    if resume_from is None and unusable:
        raise TrainingError(f"run.resume={cfg.run.resume}: no usable checkpoint in {run_dir / 'checkpoints'}: "
                            + "; ".join(f"{p.name} ({why})" for p, why in unusable)
                            + "; restore one, or start afresh in another run.output_dir")
    if resume_from is not None:
        if rng_problem is not None:  # on the process whose RNG file it is
            print(f"warning: {rng_problem}: the random number generators were not restored, so this resume is not "
                  "bit-exact with an uninterrupted run", flush=True)
        accelerator.print(f"resumed from {resume_from} at step {state.global_step}")
        if accelerator.is_main_process:
            for moved in ckpt.set_aside_newer(run_dir, state.global_step):
                print(f"warning: {moved.name.removeprefix('.superseded-')} is newer than the checkpoint this run "
                      f"resumed from: kept as {moved} and no longer listed (latest and pruning follow this run)",
                      flush=True)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:  # the checkpoint holds every process's skip counts, summed
            state.skipped_batches = {}
        saved = state.samples_per_micro_step
        if saved is not None and saved != samples_per_micro_step:
            consumed = state.micro_step * saved
            state.micro_step = consumed // samples_per_micro_step
            accelerator.print(
                f"warning: {resume_from} was saved by a run reading {saved} samples per micro-step (train.batch_size "
                f"x processes), this one reads {samples_per_micro_step}: the weights, optimizer, schedule and RNG are "
                f"restored and the data continues after the {consumed} samples read so far, but not in the order "
                "of an uninterrupted run (an exact resume needs the same batch size and number of processes)")
    elif cfg.run.resume not in (None, "latest"):
        raise TrainingError(f"run.resume {cfg.run.resume}: no checkpoint found")
    state.samples_per_micro_step = samples_per_micro_step

    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, start_step=state.global_step)
    batches = task.batches(accelerator.process_index, accelerator.num_processes, state.micro_step)
    progress = tqdm(total=cfg.train.max_steps, initial=state.global_step, desc="train",
                    disable=not (cfg.train.progress and accelerator.is_local_main_process))
    last_metrics: dict[str, float] = {}
    window_samples, window_start = 0, time.perf_counter()
    # Time per optimizer step (data wait + forward/backward + update; checkpoints and validation excluded) and the
    # part of it spent waiting on the data iterator, summed over the logging window.
    window_steps, window_step_s, window_wait_s, step_start = 0, 0.0, 0.0, 0.0
    micro_in_step = 0
    keys_seen: list[str] = []
    while state.global_step < cfg.train.max_steps:
        wait_start = time.perf_counter()
        if micro_in_step == 0:
            step_start = wait_start
        batch = next(batches)
        window_wait_s += time.perf_counter() - wait_start
        keys_seen.extend(batch.get("keys", []))
        state.micro_step += 1
        state.skipped_samples += int(batch.get("skipped", 0))
        gen = step_generator(cfg.run.seed, state.global_step, micro_in_step, accelerator.process_index)
        micro_in_step += 1
        with accelerator.accumulate(module):
            skip = None
            if checks_batches:
                # Settled on every process before any forward: DDP's forward is itself collective (it broadcasts
                # buffers), so a process that skipped it alone would leave the others waiting.
                reason = task.skip_reason(batch)
                skip = None if reason is None else SkipBatch(*reason)
                skipped = accelerator.reduce(torch.tensor(float(skip is not None), device=device), reduction="sum")
                if skip is None and skipped.item() > 0:
                    skip = _SKIPPED_ELSEWHERE
            if skip is not None:
                loss, metrics = None, {}
            else:
                with accelerator.autocast():
                    try:
                        loss, metrics = compute_loss(cfg, built.model, module, unwrapped, batch, gen)
                    except SkipBatch as err:  # raised before the model ran (see Task.skip_reason)
                        skip, loss, metrics = err, None, {}
            if skip is not None and skip is not _SKIPPED_ELSEWHERE:
                state.skipped_batches[skip.reason] = state.skipped_batches.get(skip.reason, 0) + 1
                accelerator.print(f"skipping a micro-batch at step {state.global_step} ({skip.reason}): {skip}")
            # [finite loss, skipped] summed over processes: a micro-batch is dropped everywhere if any process
            # skipped it or got a non-finite loss (a backward on only some processes would hang DDP).
            flags = torch.tensor([float(skip is None and bool(torch.isfinite(loss).item())), float(skip is not None)],
                                 device=device)
            flags = accelerator.reduce(flags, reduction="sum")
            all_finite = bool(flags[0].item() == accelerator.num_processes)
            any_skipped = bool(flags[1].item() > 0)
            if all_finite:
                accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                if all_finite and cfg.optim.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                if all_finite:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        window_samples += task.num_samples(batch) * accelerator.num_processes
        if any_skipped:
            pass  # counted under skipped/<reason>; not a non-finite loss
        elif not all_finite:
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            if state.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise TrainingError(f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss "
                                    f"(last at step {state.global_step}); lower optim.lr, check the data, or "
                                    "use mixed_precision=bf16 instead of fp16")
        else:
            state.consecutive_nonfinite = 0
        if not accelerator.sync_gradients:
            continue
        micro_in_step = 0
        state.global_step += 1
        if all_finite:
            task.after_optimizer_step(unwrapped)
        window_steps += 1
        window_step_s += time.perf_counter() - step_start
        progress.update(1)
        if state.global_step % cfg.train.log_every == 0 or state.global_step == cfg.train.max_steps:
            elapsed = time.perf_counter() - window_start
            row = {} if any_skipped else {
                k: float(accelerator.reduce(v.detach().float().to(device), reduction="mean").item())
                for k, v in sorted(metrics.items())}
            row["loss"] = float(accelerator.reduce(loss.detach().float(), reduction="mean").item()) \
                if all_finite else float("nan")
            row["lr"] = lr_scheduler.get_last_lr()[0]
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row["samples_per_s"] = window_samples / max(elapsed, 1e-9)
            row["time/step"] = window_step_s / window_steps
            row["time/data_wait"] = window_wait_s / window_steps
            row["time/data_wait_fraction"] = window_wait_s / max(window_step_s, 1e-12)
            row["skipped_samples"] = int(accelerator.reduce(  # bad samples every process read, summed
                torch.tensor(float(state.skipped_samples), device=device), reduction="sum").item())
            row["nonfinite_steps"] = state.nonfinite_steps
            for reason, count in skipped_batch_counts(state, accelerator).items():
                row[f"skipped/{reason}"] = count
            logger.log(state.global_step, row)
            last_metrics = row
            progress.set_postfix({"loss": f"{row['loss']:.4f}",
                                  **{k: f"{row[k]:.3g}" for k in task.progress_metrics if k in row}})
            window_samples, window_start = 0, time.perf_counter()
            window_steps, window_step_s, window_wait_s = 0, 0.0, 0.0
        every = cfg.train.checkpoint_every
        if every and state.global_step % every == 0 and state.global_step < cfg.train.max_steps:
            save_training_checkpoint(cfg, accelerator, run_dir, state, stateful)
        vevery = task.validation_every
        if vevery and state.global_step % vevery == 0 and state.global_step < cfg.train.max_steps \
                and accelerator.is_main_process and not sharded:
            task.validate(unwrapped, run_dir, state.global_step, logger)
    progress.close()
    save_training_checkpoint(cfg, accelerator, run_dir, state, stateful)
    outputs: dict[str, str] = {}
    accelerator.wait_for_everyone()
    # Sharded weights (FSDP, ZeRO-3) are gathered by every process; the main process gets the full state dict.
    full = {"state_dict": accelerator.get_state_dict(module)} if sharded else {}
    if accelerator.is_main_process:
        outputs.update(task.save_final(unwrapped, run_dir, **full))
        if not sharded:  # a forward pass through sharded weights on one process would wait for the others
            outputs.update(task.validate(unwrapped, run_dir, state.global_step, logger) or {})
    logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(state.global_step, last_metrics, str(run_dir), outputs, state.skipped_samples,
                       state.nonfinite_steps, unwrapped, keys_seen, dict(state.skipped_batches))


_SKIPPED_ELSEWHERE = SkipBatch("elsewhere", "another process skipped this micro-batch")


def skipped_batch_counts(state: TrainState, accelerator) -> dict[str, int]:
    """Micro-batches skipped so far by reason, summed over processes (every process calls this)."""
    if accelerator.num_processes == 1:
        return dict(sorted(state.skipped_batches.items()))
    counts: Counter = Counter()
    for part in gather_objects([state.skipped_batches]):
        counts.update(part)
    return dict(sorted(counts.items()))


def check_optimizer_placement(cfg: BaseTrainConfig, accelerator) -> None:
    """Adafactor factors each weight matrix's second moments over its rows and columns. mmalign's runs on FSDP2's
    row shards (`mmalign.train.optim`); DeepSpeed ZeRO hands the optimizer flat partitions, on which it would
    silently stop factoring."""
    from accelerate.utils import DistributedType

    if cfg.optim.name == "adafactor" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError("optim.name 'adafactor' does not run under DeepSpeed: ZeRO hands the optimizer flat "
                            "partitions of the weights, whose statistics it cannot factor; train with DDP or FSDP "
                            "(configs/accelerate/multi_gpu.yaml, fsdp.yaml), or set optim.name=adamw or adamw8bit")


def holds_sharded_weights(accelerator) -> bool:
    """True when no process holds the whole model (FSDP, DeepSpeed ZeRO-3): saving it takes every process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None \
        and plugin.zero_stage == 3


def save_training_checkpoint(cfg: BaseTrainConfig, accelerator, run_dir: Path, state: TrainState,
                             stateful: list) -> None:
    """Every process calls `accelerator.save_state` into one temporary folder (FSDP and DeepSpeed save
    collectively, each process writing its shard; each process writes its own RNG state); the main process then
    completes it and renames it (`checkpoint.commit_checkpoint`), so a crash mid-save never leaves a checkpoint
    that looks whole."""
    tmp = ckpt.temporary_dir(run_dir, state.global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    # the skip counts of every process, summed (a resumed run gives them back to the main process)
    saved_state = {**state.__dict__, "skipped_batches": skipped_batch_counts(state, accelerator)}
    if accelerator.is_main_process:
        ckpt.commit_checkpoint(run_dir, state.global_step, tmp, saved_state, cfg.train.checkpoints_total_limit,
                               stateful)
    accelerator.wait_for_everyone()

