"""Training configs: one typed schema per task, sharing the sections the loop owns (`mmalign train CONFIG k=v`).

Every config has a top-level `task:` (default `t2i`) naming a registered task (`mmalign.train.tasks`). The shared
sections are `run` (where and how reproducibly), `optim` and `train` (the loop), in `BaseTrainConfig`; each task
subclasses it and adds its own `model`, `method`, `data` and `validation` sections. Every field documents its
default and why. Unknown keys are errors.

Each task's own sections live next to its code, in its modality's folder (`mmalign/t2i/task.py`,
`mmalign/vlm/task.py`, `mmalign/rewards/task.py`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from mmalign.config import StrictModel


class RunConfig(StrictModel):
    output_dir: str = Field("runs/train", description="Run folder: config.yaml, metrics.jsonl, TensorBoard, "
                                                      "checkpoints/, samples/, final model.")
    seed: int = Field(0, ge=0, lt=2**63, description="Seeds model init noise, data order, timesteps and noise; "
                                                     "fixed for reproducibility and exact resume.")
    resume: Optional[str] = Field(None, description="null = fresh run (refuses a non-empty run folder that has "
                                                    "checkpoints); 'latest' = newest checkpoint in output_dir; "
                                                    "or a checkpoint folder path.")
    overwrite: bool = Field(False, description="Allow starting fresh in a run folder that already has "
                                               "checkpoints (they are kept until overwritten).")
    push_to_hub: bool = Field(False, description="After the final save, upload the trained model and its model "
                                                 "card (README.md) to the Hugging Face Hub repo "
                                                 "run.hub_model_id (created if missing; needs network and a "
                                                 "token: `hf auth login` or HF_TOKEN). Text-to-image runs.")
    hub_model_id: Optional[str] = Field(None, description="The Hub repo for run.push_to_hub, e.g. "
                                                          "'user/sd15-dpo-lora'.")

    @model_validator(mode="after")
    def _hub(self) -> "RunConfig":
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("run.push_to_hub true needs run.hub_model_id, the Hub repo to upload to "
                             "(e.g. 'user/sd15-dpo-lora')")
        return self


# An Adam decay rate is in [0, 1) (1 divides by 0 in the bias correction); torch checks only once the model loads.
_Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(StrictModel):
    name: Literal["adamw", "adamw8bit", "adafactor"] = Field("adamw", description="adamw8bit needs bitsandbytes "
                                                                                  "(the gpu extra).")
    lr: float = Field(1e-8, gt=0, description="Per-sample lr when scale_lr is true (Diffusion-DPO's 1e-8 x "
                                              "total batch 2048 = 2.048e-5), else the lr used as is.")
    scale_lr: bool = Field(False, description="Multiply lr by batch_size x grad accumulation x num processes.")
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW's (beta1, beta2), each in [0, 1) "
                                                                  "(adamw, adamw8bit; adafactor ignores them).")
    eps: float = Field(1e-8, gt=0, description="AdamW's denominator term (adamw, adamw8bit).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping to this global norm; "
                                                                  "null = off.")
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
