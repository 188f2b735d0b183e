"""Training configs: one typed schema per task, sharing the sections the loop owns (`mmalign train CONFIG k=v`).

Every config has a top-level `task:` (default `t2i`) naming a registered task (`mmalign.train.tasks`). The shared
sections are `run` (where and how reproducibly), `optim` and `train` (the loop), in `BaseTrainConfig`; each task
subclasses it and adds its own `model`, `method`, `data` and `validation` sections. Every field documents its
default and why. Unknown keys are errors.

Each task's own sections live next to its code, in its modality's folder (`mmalign/t2i/task.py`,
`mmalign/vlm/task.py`, `mmalign/rewards/task.py`).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from mmalign.config import StrictModel


class RunConfig(StrictModel):
    output_dir: str = Field("runs/train", description="Run folder: config.yaml, metrics.jsonl, TensorBoard, "
                                                      "checkpoints/, samples/, final model.")
    seed: int = Field(0, description="Seeds model init noise, data order, timesteps and noise; fixed for "
                                     "reproducibility and exact resume.")
    resume: Optional[str] = Field(None, description="null = fresh run (refuses a non-empty run folder that has "
                                                    "checkpoints); 'latest' = newest checkpoint in output_dir; "
                                                    "or a checkpoint folder path.")
    overwrite: bool = Field(False, description="Allow starting fresh in a run folder that already has "
                                               "checkpoints (they are kept until overwritten).")


class OptimConfig(StrictModel):
    name: Literal["adamw", "adamw8bit", "adafactor"] = Field("adamw", description="adamw8bit needs bitsandbytes "
                                                                                  "(the gpu extra).")
    lr: float = Field(1e-8, gt=0, description="Per-sample lr when scale_lr is true (Diffusion-DPO's 1e-8 x "
                                              "total batch 2048 = 2.048e-5), else the lr used as is.")
    scale_lr: bool = Field(False, description="Multiply lr by batch_size x grad accumulation x num processes.")
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: Optional[float] = Field(1.0, description="Gradient clipping; null = off.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)


class TrainLoopConfig(StrictModel):
    max_steps: int = Field(..., gt=0, description="Optimizer steps.")
    batch_size: int = Field(1, gt=0, description="Samples (T2I: pairs or ranked lists) per process per "
                                                      "micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Trainable LoRA params stay float32.")
    ema: bool = Field(False, description="Keep an EMA of the trained weights (full fine-tune) and save it.")
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    checkpoints_total_limit: Optional[int] = Field(None, ge=1, description="Keep at most this many.")
    log_every: int = Field(1, gt=0)
    max_consecutive_nonfinite: int = Field(5, gt=0, description="Stop the run after this many consecutive "
                                                                "steps with a non-finite loss (each skipped).")
    progress: bool = True


class BaseTrainConfig(StrictModel):
    """The sections every task shares; a task's config subclasses this and adds its own sections.

    A subclass narrows `task` to its name (`task: Literal["mytask"] = "mytask"`) so a resolved config.yaml
    always says which task it is for.
    """

    task: str = Field("t2i", description="Registered task (see mmalign.train.tasks): which model family and "
                                         "objective the loop drives. Default t2i, text-to-image diffusion.")
    run: RunConfig = Field(default_factory=RunConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig
