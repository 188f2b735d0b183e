"""LoRA set-up and export in the consumer's format: attaching a diffusers-style adapter to a frozen base (what the
t2i and flow tasks share), and the adapter's config as diffusers' `load_lora_weights` reads it from the safetensors
header."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from pydantic import Field

from mmalign.config import StrictModel
from mmalign.models.loading import move_module


class LoraConfig(StrictModel):
    """`model.lora` of the diffusers-model tasks (text-to-image, flow matching): the settings `attach_lora` takes."""

    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha; null = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names (peft matching) to adapt: the attention projections by default, as the diffusers "
                    "DPO/SDXL LoRA scripts and flow_grpo's SD3 LoRA; add 'conv1', 'conv2' etc. to adapt a UNet's "
                    "resnets; SD3's joint blocks also have add_q_proj / add_k_proj / add_v_proj / to_add_out.")


class LoraExportError(ValueError):
    """The model has no LoRA adapter to export."""


LORA_METADATA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
                      "bias", "init_lora_weights", "lora_dropout", "fan_in_fan_out", "lora_bias")


def lora_metadata(module, adapter_name: str = "default") -> dict:
    """The peft `LoraConfig` of `module`'s adapter as the JSON-able dict diffusers stores with LoRA weights
    (`unet_lora_adapter_metadata`; diffusers' training scripts pass the same `peft_config[...].to_dict()`)."""
    config = getattr(module, "peft_config", {}).get(adapter_name)
    if config is None:
        raise LoraExportError(f"the trained model has no LoRA adapter {adapter_name!r} to export")
    full = config.to_dict()
    # Only what rebuilds the LoRA: diffusers passes the metadata to `LoraConfig(**metadata)`, so a field a
    # consumer's peft lacks (peft adds new method fields in most releases) would make the file unloadable there, and
    # base_model_name_or_path would carry a local path into a shared file.
    meta = {k: full[k] for k in LORA_METADATA_KEYS if k in full}
    # Dropout is training-only, and the exported file is for inference: `load_lora_weights` (and peft's
    # `inject_adapter_in_model`) add the LoRA modules in training mode even into a model in eval mode, so a
    # stored dropout would drop activations at generation time. The trained value is in the model card.
    meta["lora_dropout"] = 0.0
    # sets are not JSON; sorted lists keep the file deterministic
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def attach_lora(model: torch.nn.Module, *, rank: int, alpha: float | None, dropout: float,
                target_modules: Union[Sequence[str], str], device: Union[torch.device, str, None],
                weight_dtype: torch.dtype, init: Union[str, bool] = "gaussian") -> list[torch.nn.Parameter]:
    """Freeze `model`, move it to `device` in `weight_dtype`, add a peft LoRA adapter in place (diffusers'
    `add_adapter`, adapter "default") and return its trainable parameters, kept in float32.

    The LoRA update is `W x + (alpha / rank)·B A x`; alpha None = rank (scale 1). `init` is peft's
    `init_lora_weights` ("gaussian" = A normal with std 1/rank, B = 0, so the adapted model starts as the base);
    `target_modules` is peft's (module names, or a regex string).
    """
    from peft import LoraConfig

    model.requires_grad_(False)
    move_module(model, device, weight_dtype)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                                 init_lora_weights=init, target_modules=target_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # the optimizer updates float32 LoRA weights even when the frozen base is fp16 / bf16
        p.data = p.data.float()
    return params
