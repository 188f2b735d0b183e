"""Training configs: one typed schema per task, sharing the sections the loop owns (`mmalign train CONFIG k=v`).

Every config has a top-level `task:` (default `t2i`) naming a registered task (`mmalign.train.tasks`). The shared
sections are `run` (where and how reproducibly), `optim` and `train` (the loop), in `BaseTrainConfig`; each task
subclasses it and adds its own `model`, `method`, `data` and `validation` sections. Every field documents its
default and why. Unknown keys are errors.

The text-to-image task's sections (`T2ITrainConfig`, also exported as `TrainConfig`) live in this file too: they
were the first, and existing code imports them from here. New tasks keep their config next to their code.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from mmalign.config import StrictModel

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")


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


class LoraConfig(StrictModel):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: Optional[float] = Field(None, description="LoRA alpha; null = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names (peft matching) to adapt. The diffusers DPO/SDXL LoRA scripts adapt the "
                    "attention projections; add 'conv1', 'conv2' etc. to adapt resnets.")


class ModelConfig(StrictModel):
    adapter: Literal["t2i"] = Field("t2i", description="Modality adapter. Today: t2i (SD 1.x/2.x, SDXL).")
    pretrained: str = Field(..., description="Diffusers pipeline folder or hub id (hub ids need network or a "
                                             "populated HF cache).")
    revision: Optional[str] = None
    variant: Optional[str] = Field(None, description="Weight variant, e.g. 'fp16' for hub checkpoints.")
    unet: Optional[str] = Field(None, description="Optional separate UNet folder to start from (e.g. a "
                                                  "previous run's output); the reference is taken from it too.")
    lora: Optional[LoraConfig] = Field(None, description="null = full fine-tune with a frozen reference copy; "
                                                         "set = LoRA, reference = the same UNet with adapters "
                                                         "disabled (no second copy).")
    reference_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="Dtype of the frozen reference UNet in full fine-tunes; auto = the mixed precision "
                            "dtype (float32 when mixed_precision is 'no').")
    offload_reference: bool = Field(False, description="Keep the frozen reference on CPU between uses "
                                                       "(saves accelerator memory at a speed cost).")
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="PyTorch SDPA by default; xformers "
                                                                       "needs the `gpu` extra and a GPU.")


class MethodConfig(StrictModel):
    name: Literal["dpo", "mapo", "rankdpo", "sft"] = Field(
        "dpo", description="dpo = Diffusion-DPO; mapo = margin-aware (no reference); rankdpo = ranked lists; "
                           "sft = plain denoising loss on winners (the baseline every paper compares to).")
    beta: Optional[float] = Field(None, gt=0, description="null = the method's published default: dpo/rankdpo "
                                                          "5000 (assumes per-sample MSE averaged over C,H,W), "
                                                          "mapo 0.1.")
    loss_type: str = Field("sigmoid", description=f"DPO variant, one of {', '.join(DPO_LOSS_TYPES)}.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Only for dpo loss types that use it "
                                                                    "(sigmoid, robust).")
    mapo_snr_value: float = Field(0.5, gt=0)
    rank_weighting: Literal["lambda", "uniform"] = "lambda"
    ties: Literal["drop", "keep"] = Field("drop", description="Tied pairs (label 0.5): drop = never batched. "
                                                              "No text-to-image objective uses ties, so 'keep' "
                                                              "is refused (it is for tie-aware reward losses).")

    @model_validator(mode="after")
    def _check(self) -> "MethodConfig":
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
        if self.ties != "drop":
            raise ValueError(f"ties {self.ties!r}: method {self.name!r} has no tie-aware form; use ties 'drop'")
        return self

    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return {"dpo": 5000.0, "rankdpo": 5000.0, "mapo": 0.1, "sft": 1.0}[self.name]


class DataConfig(StrictModel):
    shards: str = Field(..., description="Shard folder (with manifest.json) or brace pattern of .tar files.")
    schema_name: Literal["pair", "ranked"] = Field("pair", alias="schema", description="pair for dpo/mapo/sft, "
                                                                                      "ranked for rankdpo.")
    resolution: int = Field(512, gt=0, description="Square training resolution in pixels; a multiple of 8 "
                                                   "(16 for SDXL).")
    center_crop: bool = Field(True, description="true = centre crop, false = random crop (same crop for both "
                                                "images of a pair).")
    random_flip: bool = Field(False, description="Same flip for both images of a pair.")
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(0, ge=0)
    proportion_empty_prompts: float = Field(0.0, ge=0.0, le=1.0, description="Replace a caption with '' with "
                                                                            "this probability (keeps CFG working).")
    cache: Union[bool, str] = Field(
        False, description="true = read VAE posteriors, text embeddings and SDXL size/crop from the cache that "
                           "`mmalign train CONFIG --cache-only` writes next to the shards "
                           "(`<shards>/cache/t2i-<key>/`, keyed by model, resolution and crop: a missing or stale "
                           "cache is an error); the VAE and "
                           "text encoders then stay off the accelerator. A folder path = the same, with the caches "
                           "in that folder (`DIR/t2i-<key>/`) instead of next to the shards (shards on read-only or "
                           "slow storage); `--cache-only` then writes there. Needs center_crop true and random_flip "
                           "false (one encoding per image). false = encode every step.")
    strict: bool = Field(False, description="Raise on a corrupt sample instead of skipping and counting it.")

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @field_validator("cache")
    @classmethod
    def _cache_folder(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("an empty string is not a folder: use true (next to the shards), false, or a path")
        return value

    @property
    def use_cache(self) -> bool:
        """Training reads the cache instead of encoding (data.cache true or a folder)."""
        return self.cache is not False

    @property
    def cache_root(self) -> Optional[str]:
        """The folder holding the caches when data.cache names one; None = `<shards>/cache`."""
        return self.cache if isinstance(self.cache, str) else None


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


class ValidationConfig(StrictModel):
    every: int = Field(0, ge=0, description="Steps between validation grids; 0 = only at the end if prompts "
                                            "are set.")
    prompts: list[str] = Field(default_factory=list)
    seed: int = 0
    num_inference_steps: int = Field(20, gt=0)
    guidance_scale: float = 5.0
    images_per_prompt: int = Field(2, gt=0)


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


class T2ITrainConfig(BaseTrainConfig):
    """Text-to-image preference fine-tuning (SD 1.x/2.x, SDXL): Diffusion-DPO, MaPO, RankDPO, SFT."""

    task: Literal["t2i"] = "t2i"
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _check(self) -> "T2ITrainConfig":
        if self.data.resolution % 8:
            raise ValueError(f"data.resolution {self.data.resolution} is not a multiple of 8 (the VAE "
                             "downsamples by 8; SDXL needs 16)")
        if self.method.name == "rankdpo" and self.data.schema_name != "ranked":
            raise ValueError("method.name 'rankdpo' needs data.schema 'ranked'")
        if self.method.name != "rankdpo" and self.data.schema_name == "ranked":
            raise ValueError(f"data.schema 'ranked' is only used by method 'rankdpo', not {self.method.name!r}")
        if self.data.use_cache and (not self.data.center_crop or self.data.random_flip):
            raise ValueError("data.cache true holds one encoding per image: set data.center_crop true and "
                             "data.random_flip false, or data.cache false for random crops and flips")
        return self


TrainConfig = T2ITrainConfig  # the name existing callers use
