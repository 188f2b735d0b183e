"""The VLM training task (`task: vlm`): preference (DPO family) or SFT training of a LLaVA-/Qwen2-VL-style model
on `vlm_pair` shards, driven by the one training loop (`mmalign.train.trainer`).

The task is thin: `build` loads the model through `mmalign.adapters.vlm.load_vlm` (LoRA or full fine-tune, vision
tower frozen by default, reference by disabled LoRA / frozen copy / precomputed log-probs), `batches` reads the
shards with `VLMPairDataset`, `compute_loss` is `mmalign.vlm.loss.vlm_preference_loss`, and `save_final` writes
the model (full fine-tune: `model/` with its processor, loadable with `from_pretrained`; LoRA: `lora/`, a peft
adapter for `PeftModel.from_pretrained(base, folder)`, plus the processor).

    mmalign train configs/vlm/toy_stic_dpo.yaml data.shards=runs/stic_pairs
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from pydantic import Field, model_validator

from mmalign.config import StrictModel
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, Task
from mmalign.vlm.loss import VLMMethodConfig, vlm_preference_loss


class VLMLoraConfig(StrictModel):
    rank: int = Field(128, ge=1, description="LoRA rank r (STIC / BDHS published setting: 128).")
    alpha: float = Field(256.0, gt=0, description="LoRA alpha (published: 256, scale 2).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers of the language model to adapt (the vision tower is never adapted).")


class VLMModelConfig(StrictModel):
    pretrained: str = Field(..., description="Model folder or hub id (LLaVA-1.5/1.6-style or Qwen2-VL-style).")
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype; float32 on "
                                                                                  "CPU (the safe default).")
    lora: Optional[VLMLoraConfig] = Field(None, description="null = full fine-tune of the trainable groups; set = "
                                                            "LoRA on the language model.")
    reference: Literal["auto", "lora", "copy", "precomputed"] = Field(
        "auto", description="auto = lora with LoRA (adapters disabled, no second copy), else copy (a frozen copy "
                            "in memory); precomputed = read reference log-probs from the shards' cache "
                            "(`mmalign.adapters.vlm.precompute_reference_logps`; built by --cache-only).")
    train_vision: bool = Field(False, description="Train the vision tower (frozen by default).")
    train_projector: bool = Field(True, description="Train the projector (with LoRA: as a full trainable copy).")
    train_llm: bool = Field(True, description="Train the language model (full fine-tune only; with LoRA the LLM "
                                              "trains through its adapters).")
    max_length: Optional[int] = Field(None, gt=0, description="Response tokens kept per answer; null = all. The "
                                                              "prompt (with its image tokens) is never cut.")
    max_prompt_length: Optional[int] = Field(None, gt=0, description="Longer prompts are skipped and counted "
                                                                     "(strict: an error); null = no limit.")
    gradient_checkpointing: bool = False


class VLMDataConfig(StrictModel):
    shards: str = Field(..., description="vlm_pair shard folder (with manifest.json).")
    shuffle_buffer: int = Field(1000, ge=0, description="0 = stored order.")
    num_workers: int = Field(0, ge=0)
    strict: bool = Field(False, description="Raise on a corrupt sample or an over-long prompt instead of "
                                            "skipping and counting it.")


class VLMTrainConfig(BaseTrainConfig):
    """VLM preference training: DPO family with an optional SFT term, mDPO-style rejected images, online BDHS."""

    task: Literal["vlm"] = "vlm"
    model: VLMModelConfig
    method: VLMMethodConfig = Field(default_factory=VLMMethodConfig)
    data: VLMDataConfig

    @model_validator(mode="after")
    def _check(self) -> "VLMTrainConfig":
        if self.model.reference == "lora" and self.model.lora is None:
            raise ValueError("model.reference 'lora' needs model.lora; use 'copy' or 'precomputed' for full "
                             "fine-tunes")
        if self.model.reference == "precomputed" and self.method.online_weight > 0:
            raise ValueError("method.online_weight > 0 scores answers generated during training; it needs a live "
                             "reference (model.reference lora or copy)")
        return self

    def reference_mode(self) -> str:
        if self.method.name == "sft":
            return "none"
        if self.model.reference == "auto":
            return "lora" if self.model.lora is not None else "copy"
        return self.model.reference


class VLMTask(Task):
    config_class = VLMTrainConfig

    def check_inputs(self) -> None:
        from mmalign.data.manifest import load_manifest

        manifest = load_manifest(self.cfg.data.shards)
        if manifest.schema_name != "vlm_pair":
            raise ValueError(f"data.shards {self.cfg.data.shards}: schema {manifest.schema_name!r}; the vlm task "
                             "reads vlm_pair shards")

    def _load(self, device, reference: str, lora: bool = True):
        from mmalign.adapters.vlm import load_vlm

        m = self.cfg.model
        return load_vlm(m.pretrained, revision=m.revision, dtype=m.dtype, max_length=m.max_length,
                        max_prompt_length=m.max_prompt_length, reference=reference,
                        lora=m.lora.model_dump() if m.lora is not None and lora else None, train_vision=m.train_vision,
                        train_projector=m.train_projector, train_llm=m.train_llm, device=device)

    def build(self, device) -> Built:
        self.adapter = self._load(device, self.cfg.reference_mode())
        model = self.adapter.model
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        return Built(module=model, params=[p for p in model.parameters() if p.requires_grad], model=self.adapter)

    def _producer(self):
        from mmalign.adapters.vlm import REF_CACHE_NAME, reference_cache_producer

        return {REF_CACHE_NAME: reference_cache_producer(self.adapter, self.cfg.method.rejected_images)}

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.data.collate import collate_vlm_pairs
        from mmalign.data.dataset import VLMPairDataset
        from mmalign.train.data import endless_batches

        d = self.cfg.data
        caches = self._producer() if self.adapter.reference == "precomputed" else None
        dataset = VLMPairDataset(d.shards, shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1),
                                 seed=self.cfg.run.seed, rank=rank, world_size=world_size, strict=d.strict,
                                 caches=caches)
        yield from endless_batches(dataset, collate_vlm_pairs, self.cfg.train.batch_size, skip=skip,
                                   num_workers=d.num_workers, what=f"data.shards {d.shards}")

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch: dict, generator) -> tuple[torch.Tensor, dict]:
        """`model` is the `VLMAdapter`; `module` the (possibly wrapped) policy to run forward through."""
        from mmalign.adapters.vlm import PromptTooLongError

        try:
            return vlm_preference_loss(model, batch, cfg.method, policy=module, generator=generator)
        except PromptTooLongError as err:
            if cfg.data.strict:
                raise
            # A whole micro-batch is dropped: a non-finite loss is skipped and counted by the loop.
            import logging

            logging.getLogger("mmalign.train").warning("skipping a micro-batch: %s", err)
            return torch.tensor(float("nan"), device=next(model.model.parameters()).device), {}

    def save_final(self, unwrapped, run_dir: Path) -> dict[str, str]:
        from mmalign.train.checkpoint import atomic_dir

        processor = self.adapter.processor
        # A peft model saves its adapter only (PeftModel.from_pretrained(base, lora/)); a full model saves itself.
        name = "lora" if self.cfg.model.lora is not None else "model"

        def write(d: Path) -> None:
            unwrapped.save_pretrained(str(d))
            processor.save_pretrained(str(d))

        atomic_dir(run_dir / name, write)
        return {name: str(run_dir / name)}

    def build_cache(self) -> Path:
        """`--cache-only`: precompute the reference log-probs into the shards' cache (reference 'precomputed')."""
        from mmalign.adapters.vlm import precompute_reference_logps

        if self.cfg.model.reference != "precomputed":
            raise ValueError("--cache-only builds the reference log-prob cache; set model.reference=precomputed")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # The reference is the loaded weights themselves (before any LoRA): score with them, no second copy.
        self.adapter = self._load(device, "none", lora=False)
        self.adapter.ref_model, self.adapter.reference = self.adapter.model.eval(), "copy"
        return precompute_reference_logps(self.adapter, self.cfg.data.shards,
                                          batch_size=self.cfg.train.batch_size,
                                          rejected_images=self.cfg.method.rejected_images)
