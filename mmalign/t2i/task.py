"""The text-to-image task (`task: t2i`, the default): SD 1.x/2.x and SDXL with Diffusion-DPO, MaPO, RankDPO, SFT.

The training step is explicit code (`compute_loss`): the adapter (`mmalign.t2i.adapter`) turns the batch into
surrogates (encoding or reading cached latents and text, one shared timestep and noise per pair or ranked list),
and the method table (`mmalign.methods`) turns them into the loss. The loop around it is
`mmalign.train.trainer.train`; the latent cache is `mmalign.t2i.cache`, the final outputs and validation grids
`mmalign.t2i.export`.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from mmalign.config import StrictModel
from mmalign.losses import DPO_LOSS_TYPES
from mmalign.methods import METHODS, check_method, preference_loss
from mmalign.models.loading import move_module, read_model_index
from mmalign.models.lora import LoraConfig, attach_lora
from mmalign.models.reference import ReferenceChoice, resolve_reference
from mmalign.t2i.adapter import CACHE_NAME, T2IAdapter, TextConditioning, encoder_dtype, load_t2i_components, \
    sdxl_resolution_problem
from mmalign.t2i.cache import EMPTY_PROMPT_FILE, build_cache, cache_producer
from mmalign.t2i.export import push_to_hub, run_validation, save_final_model, write_model_card
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, Task
from mmalign.train.trainer import DataError, TrainingError

T2I_REFERENCES = ("lora", "copy", "none")


# -- config --------------------------------------------------------------------------------------------------------
class ModelConfig(StrictModel):
    pretrained: str = Field(..., description="Diffusers pipeline folder or hub id (hub ids need network or a "
                                             "populated HF cache).")
    revision: Optional[str] = None
    variant: Optional[str] = Field(None, description="Weight variant, e.g. 'fp16' for hub checkpoints.")
    unet: Optional[str] = Field(None, description="Optional separate UNet folder to start from (e.g. a "
                                                  "previous run's output); the reference is taken from it too.")
    lora: Optional[LoraConfig] = Field(None, description="null = full fine-tune (reference: a frozen copy); set = "
                                                         "LoRA (reference: the same UNet with adapters disabled, "
                                                         "no second copy).")
    reference: ReferenceChoice = Field(
        "auto", description="auto = lora with LoRA, else copy; lora = the UNet with its adapters disabled; copy = "
                            "a frozen copy of the starting UNet. Methods without a reference (sft, mapo) use none. "
                            "precomputed is refused: diffusion surrogates depend on the t and noise of each step.")
    reference_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="Dtype of the frozen reference UNet in full fine-tunes; auto = the mixed precision "
                            "dtype (float32 when mixed_precision is 'no').")
    offload_reference: bool = Field(False, description="Keep the frozen reference on CPU between uses "
                                                       "(saves accelerator memory at a speed cost).")
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="PyTorch SDPA by default; xformers "
                                                                       "needs the `gpu` extra and a GPU.")


class MethodConfig(StrictModel):
    name: Literal["dpo", "mapo", "rankdpo", "spo", "sft"] = Field(
        "dpo", description="dpo = Diffusion-DPO; mapo = margin-aware (no reference); rankdpo = ranked lists; "
                           "spo = step-wise preferences on single denoising transitions (step_pair shards from "
                           "`mmalign selfgen spo`); sft = plain denoising loss on winners (the baseline every paper "
                           "compares to).")
    beta: Optional[float] = Field(None, gt=0, description="null = the method's published default: dpo/rankdpo "
                                                          "5000 (assumes per-sample MSE averaged over C,H,W), "
                                                          "mapo 0.1, spo 10 (assumes transition log-densities "
                                                          "averaged over C,H,W).")
    clip_eps: float = Field(0.1, gt=0, lt=1, description="spo: the log-ratio clip ε (PPO-style, SPO's 0.1).")
    loss_type: str = Field("sigmoid", description=f"dpo variant (TRL's names), one of {', '.join(DPO_LOSS_TYPES)}.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Only for dpo loss types that use it "
                                                                    "(sigmoid, robust).")
    mapo_snr_value: float = Field(0.5, gt=0)
    rank_weighting: Literal["lambda", "uniform"] = "lambda"
    ties: Literal["drop", "keep"] = Field("drop", description="Tied pairs (label 0.5): drop = never batched. "
                                                              "No text-to-image objective uses ties, so 'keep' "
                                                              "is refused (it is for tie-aware reward losses).")

    @model_validator(mode="after")
    def _check(self) -> "MethodConfig":
        check_method(self.name, self.kind, self.loss_type, self.label_smoothing, where="method")
        if self.ties != "drop":
            raise ValueError(f"ties {self.ties!r}: method {self.name!r} has no tie-aware form; use ties 'drop'")
        return self

    @property
    def kind(self) -> str:
        """The surrogate kind the method is defined on: SPO's transition log-densities, else denoising errors."""
        return "transition" if self.name == "spo" else "error"

    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return METHODS[self.name].default_beta[self.kind]


class DataConfig(StrictModel):
    shards: Optional[str] = Field(None, description="Shard folder (with manifest.json) or brace pattern of .tar "
                                                    "files (required, except for online tasks that make their own "
                                                    "data, e.g. task spo_online).")
    schema_name: Literal["pair", "ranked", "step_pair"] = Field(
        "pair", alias="schema", description="pair for dpo/mapo/sft, ranked for rankdpo, step_pair for spo.")
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


class ValidationConfig(StrictModel):
    every: int = Field(0, ge=0, description="Steps between validation grids; 0 = only at the end if prompts "
                                            "are set.")
    prompts: list[str] = Field(default_factory=list)
    seed: int = Field(0, ge=0)
    num_inference_steps: int = Field(20, gt=0)
    guidance_scale: float = 5.0
    images_per_prompt: int = Field(2, gt=0)


class T2ITrainConfig(BaseTrainConfig):
    """Text-to-image preference fine-tuning (SD 1.x/2.x, SDXL): Diffusion-DPO, MaPO, RankDPO, SFT."""

    task: Literal["t2i"] = "t2i"
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _check(self) -> "T2ITrainConfig":
        if self.data.shards is None and not self.makes_own_data():
            raise ValueError("missing required key 'data.shards' (a shard folder or .tar brace pattern)")
        if self.data.resolution % 8:
            raise ValueError(f"data.resolution {self.data.resolution} is not a multiple of 8 (the VAE "
                             "downsamples by 8; SDXL needs 16)")
        if self.method.name == "rankdpo" and self.data.schema_name != "ranked":
            raise ValueError("method.name 'rankdpo' needs data.schema 'ranked'")
        if self.method.name != "rankdpo" and self.data.schema_name == "ranked":
            raise ValueError(f"data.schema 'ranked' is only used by method 'rankdpo', not {self.method.name!r}")
        if (self.method.name == "spo") != (self.data.schema_name == "step_pair"):
            raise ValueError("method.name 'spo' trains on data.schema 'step_pair' (from `mmalign selfgen spo`), and "
                             f"step_pair shards only on spo (got method {self.method.name!r}, schema "
                             f"{self.data.schema_name!r})")
        if self.method.name == "spo" and (self.data.use_cache or self.data.proportion_empty_prompts > 0):
            raise ValueError("method 'spo' reads stored latents and conditions on the stored prompt with the "
                             "row's guidance: data.cache and data.proportion_empty_prompts do not apply")
        if self.data.use_cache and (not self.data.center_crop or self.data.random_flip):
            raise ValueError("data.cache true holds one encoding per image: set data.center_crop true and "
                             "data.random_flip false, or data.cache false for random crops and flips")
        self.reference_mode()  # a reference the method or model cannot use fails here
        return self

    def makes_own_data(self) -> bool:
        """Whether the run samples its own data instead of reading data.shards (online subclasses)."""
        return False

    def reference_mode(self) -> str:
        """The reference this run uses: lora, copy or none (`mmalign.models.reference.resolve_reference`)."""
        return resolve_reference(self.model.reference, lora=self.model.lora is not None,
                                 needs_reference=METHODS[self.method.name].needs_reference,
                                 supported=T2I_REFERENCES)


# -- models ----------------------------------------------------------------------------------------------------------
def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def build_adapter(cfg: T2ITrainConfig, device: torch.device, encoders_on_device: bool = True) -> T2IAdapter:
    """Load components, attach LoRA if asked, and build the reference the method needs.

    encoders_on_device=False leaves the VAE and text encoders on the CPU (training from the cache).
    """
    m = cfg.model
    comps = load_t2i_components(m.pretrained, revision=m.revision, variant=m.variant, unet_path=m.unet,
                                resolution=cfg.data.resolution)
    weight_dtype = _weight_dtype(cfg.train.mixed_precision)
    if encoders_on_device:
        for module in [x for x in (comps.vae, *comps.text_encoders) if x is not None]:
            move_module(module, device, encoder_dtype(cfg.train.mixed_precision))
    unet = comps.unet
    if m.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    ref_dtype = None
    if m.lora is not None:
        attach_lora(unet, rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                    target_modules=m.lora.target_modules, device=device, weight_dtype=weight_dtype)
    else:
        unet.to(device)
        unet.requires_grad_(True)
        ref_dtype = weight_dtype if m.reference_dtype == "auto" else getattr(torch, m.reference_dtype)
    if m.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    adapter = T2IAdapter(comps, reference=cfg.reference_mode(), reference_dtype=ref_dtype,
                         offload_reference=m.offload_reference, resolution=cfg.data.resolution,
                         proportion_empty_prompts=cfg.data.proportion_empty_prompts)
    if adapter.ref_unet is not None and not m.offload_reference:
        adapter.ref_unet.to(device)
    if cfg.method.name == "spo":
        from mmalign.t2i.spo import TransitionScorer

        adapter.spo = TransitionScorer(adapter, m.revision)
    return adapter


# -- the training step -----------------------------------------------------------------------------------------
def compute_loss(cfg: T2ITrainConfig, adapter: T2IAdapter, unet, unwrapped_unet, batch: dict,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch: surrogates from the adapter, loss from the method table."""
    method = cfg.method
    if method.name == "spo":  # one transition per row: no t or noise to draw
        surrogates = adapter.spo.surrogates(unet, batch, with_reference=True, unwrapped=unwrapped_unet)
    else:
        surrogates = adapter.surrogates(unet, batch, generator, with_reference=adapter.reference != "none",
                                        unwrapped=unwrapped_unet)
    return preference_loss(method.name, surrogates, beta=method.resolved_beta(), loss_type=method.loss_type,
                           label_smoothing=method.label_smoothing, scores=batch.get("scores"),
                           rank_weighting=method.rank_weighting, mapo_snr_value=method.mapo_snr_value,
                           clip_eps=method.clip_eps)


# -- data --------------------------------------------------------------------------------------------------------
def usable_groups(cfg: T2ITrainConfig) -> int | None:
    """Pairs (tied pairs dropped) or ranked lists the shards hold, from the manifest; None without one."""
    from mmalign.data.manifest import open_source

    source = open_source(cfg.data.shards, schema=cfg.data.schema_name)
    if source.manifest is None:
        return None
    ties = sum(source.ties or []) if cfg.data.schema_name == "pair" else 0
    return source.manifest.num_samples - ties


def build_dataset(cfg: T2ITrainConfig, rank: int, world_size: int, producer: dict | None = None):
    """The reader and collator for training; with `producer` (the cache's, in `data.cache`'s folder if it names
    one), cached entries replace images. Images travel from the DataLoader workers as uint8 `pixels` (a quarter of
    the bytes of float pixels, and no float conversion in the workers) and become float on the training device
    (`T2IAdapter.inputs`)."""
    from mmalign.data.collate import collate_pairs, collate_ranked, collate_step_pairs
    from mmalign.data.dataset import PairDataset, RankedDataset, StepPairDataset

    d = cfg.data
    if d.schema_name == "step_pair":  # stored latents: no images, transforms or cache
        return StepPairDataset(d.shards, shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1),
                               seed=cfg.run.seed, rank=rank, world_size=world_size,
                               strict=d.strict), collate_step_pairs
    if producer is not None:
        images = dict(decode_images=False, caches={CACHE_NAME: producer}, cache_root=d.cache_root)
    else:
        images = dict(transforms={"resolution": d.resolution, "crop": "center" if d.center_crop else "random",
                                  "random_flip": d.random_flip})
    common = dict(shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1), seed=cfg.run.seed,
                  rank=rank, world_size=world_size, strict=d.strict, **images)
    if d.schema_name == "ranked":
        return RankedDataset(d.shards, **common), partial(collate_ranked, pixels="uint8")
    # Tied pairs carry no direction for the T2I objectives: they are dropped (and counted in the manifest).
    return PairDataset(d.shards, ties="drop", **common), partial(collate_pairs, pixels="uint8")


# -- the task ------------------------------------------------------------------------------------------------------
class T2ITask(Task):
    """Text-to-image preference fine-tuning; see the module docstring and `T2ITrainConfig`."""

    config_class = T2ITrainConfig
    progress_metrics = ("rewards/accuracies",)
    uploads_to_hub = True
    compute_loss = staticmethod(compute_loss)

    def __init__(self, cfg: T2ITrainConfig):
        super().__init__(cfg)
        self.adapter: T2IAdapter | None = None
        self.ema = None
        self.empty_prompt: TextConditioning | None = None
        self.final_outputs: dict[str, str] | None = None  # set by save_final (the model card and upload use it)

    @cached_property
    def producer(self) -> dict:
        return cache_producer(self.cfg)

    def check_inputs(self) -> None:
        cfg = self.cfg
        index = read_model_index(cfg.model.pretrained, cfg.model.revision)  # a missing model folder fails here
        problem = sdxl_resolution_problem(cfg.model.pretrained, "text_encoder_2" in index, cfg.data.resolution)
        if problem:
            raise TrainingError(problem)
        if cfg.train.ema and cfg.model.lora is not None:
            raise TrainingError("train.ema is for full fine-tunes; with LoRA keep ema false")
        usable = usable_groups(cfg)
        what = {"ranked": "ranked lists", "step_pair": "step pairs"}.get(cfg.data.schema_name,
                                                                          "pairs (ties dropped)")
        if usable is not None and usable < cfg.train.batch_size:
            raise DataError(f"data.shards {cfg.data.shards}: no usable batch: the manifest lists {usable} usable "
                            f"{what}, fewer than train.batch_size {cfg.train.batch_size}"
                            + (" (method.ties drop removes tied pairs)" if cfg.data.schema_name == "pair" else ""))
        if cfg.data.use_cache:
            from mmalign.data.cache import StaleCacheError, open_cache

            try:
                open_cache(cfg.data.shards, CACHE_NAME, self.producer, root=cfg.data.cache_root)
            except StaleCacheError as err:
                raise StaleCacheError(f"data.cache {cfg.data.cache}: {err}. Build the cache for this config with "
                                      "`mmalign train CONFIG --cache-only` (same overrides)") from None

    def check_sharded(self) -> None:
        if self.cfg.train.ema:
            raise TrainingError("train.ema is not supported with sharded weights (FSDP / DeepSpeed ZeRO-3): the "
                                "EMA keeps whole copies of the sharded parameters; set train.ema=false or train "
                                "with DDP (configs/accelerate/multi_gpu.yaml)")

    def build(self, device) -> Built:
        cfg = self.cfg
        self.adapter = build_adapter(cfg, device, encoders_on_device=not cfg.data.use_cache)
        unet = self.adapter.c.unet
        stateful = []
        if cfg.train.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay)
            self.ema.to(device)
            stateful.append(self.ema)
        if cfg.data.proportion_empty_prompts > 0:
            if cfg.data.use_cache:
                from safetensors.torch import load_file

                from mmalign.data.cache import open_cache

                saved = load_file(str(open_cache(cfg.data.shards, CACHE_NAME, self.producer,
                                                 root=cfg.data.cache_root).dir
                                      / EMPTY_PROMPT_FILE))
                self.empty_prompt = TextConditioning(saved["prompt_embeds"], saved.get("pooled"))
            else:
                empty = self.adapter.encode_text([""])
                self.empty_prompt = TextConditioning(empty.prompt_embeds[0], None if empty.pooled is None
                                                     else empty.pooled[0])
        params = [p for p in unet.parameters() if p.requires_grad]
        return Built(module=unet, params=params, model=self.adapter, stateful=stateful)

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.train.data import endless_batches

        cfg = self.cfg
        dataset, collate = build_dataset(cfg, rank, world_size, self.producer if cfg.data.use_cache else None)
        for batch in endless_batches(dataset, collate, cfg.train.batch_size, skip=skip,
                                     num_workers=cfg.data.num_workers, what=f"data.shards {cfg.data.shards}"):
            if self.empty_prompt is not None:
                batch["empty_prompt"] = self.empty_prompt
            yield batch

    def after_optimizer_step(self, unwrapped) -> None:
        if self.ema is not None:
            self.ema.step(unwrapped.parameters())

    def save_final(self, unwrapped, run_dir: Path, state_dict: dict | None = None) -> dict[str, str]:
        """The model (`mmalign.t2i.export`), `README.md` (the model card) and, with run.push_to_hub, the upload.

        The loop runs the final validation right after this (not with sharded weights): the card then gets that
        grid and the upload waits for it (`validate`); without one, both happen here, with the latest grid."""
        outputs = save_final_model(self.cfg, self.adapter, unwrapped, self.ema, run_dir, state_dict)
        grids = sorted((run_dir / "samples").glob("step-*.png"))
        outputs["card"] = str(write_model_card(self.cfg, run_dir, str(grids[-1]) if grids else None))
        self.final_outputs = dict(outputs)
        if not self.cfg.validation.prompts or state_dict is not None:
            outputs.update(self._push(run_dir))
        return outputs

    def _push(self, run_dir: Path) -> dict[str, str]:
        run = self.cfg.run
        return {"hub": push_to_hub(run.hub_model_id, run_dir, self.final_outputs)} if run.push_to_hub else {}

    @property
    def validation_every(self) -> int:
        return self.cfg.validation.every if self.cfg.validation.prompts else 0

    def validate(self, unwrapped, run_dir: Path, step: int, logger) -> dict[str, str]:
        if not self.cfg.validation.prompts:
            return {}
        c = self.adapter.c
        encoders = [x for x in (c.vae, *c.text_encoders) if x is not None]
        device = next(unwrapped.parameters()).device
        if self.cfg.data.use_cache:  # the encoders wait on the CPU while training from the cache
            for module in encoders:
                move_module(module, device, encoder_dtype(self.cfg.train.mixed_precision))
        try:
            out = {"grid": run_validation(self.cfg, self.adapter, unwrapped, run_dir, step, logger)}
        finally:
            if self.cfg.data.use_cache:
                for module in encoders:
                    module.to("cpu")
        if self.final_outputs is not None:  # the final validation, after save_final: the card gets this grid
            write_model_card(self.cfg, run_dir, out["grid"])
            out.update(self._push(run_dir))
        return out

    def build_cache(self) -> Path:
        return build_cache(self.cfg, progress=self.cfg.train.progress)
