"""LoRA in the consumer's format: what every modality's export shares (diffusers' `load_lora_weights` reads the
adapter's config from the safetensors header)."""

from __future__ import annotations


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
