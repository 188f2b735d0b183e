"""Final outputs of a flow run: the transformer a diffusers pipeline loads, or its LoRA in the pipeline's own
`load_lora_weights` format (PEFT-format keys, the adapter's LoRA config in the safetensors header so alpha != rank
loads with its scale), written by the pipeline class's own `save_lora_weights` (SD3's, Wan's, LTX's
`LTXVideoLoraLoaderMixin`)."""

from __future__ import annotations

from pathlib import Path

from mmalign.flow.adapter import FlowAdapter


def save_final_transformer(cfg, adapter: FlowAdapter, transformer, run_dir: Path,
                           state_dict: dict | None = None) -> dict[str, str]:
    """`RUN/lora` (LoRA runs: `pipe.load_lora_weights(RUN/lora)`) or `RUN/transformer` (full fine-tunes:
    `<TransformerClass>.from_pretrained(RUN/transformer)`). `state_dict`: the gathered weights of a sharded run."""
    from mmalign.train.checkpoint import atomic_dir

    if cfg.model.lora is not None:
        from diffusers.loaders import WanLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        from mmalign.models.lora import lora_metadata

        layers = get_peft_model_state_dict(transformer, state_dict=state_dict)
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        saver = getattr(type(adapter.c.pipe), "save_lora_weights", None) or WanLoraLoaderMixin.save_lora_weights
        metadata = lora_metadata(transformer)
        atomic_dir(run_dir / "lora", lambda d: saver(str(d), transformer_lora_layers=layers,
                                                     transformer_lora_adapter_metadata=metadata))
        return {"lora": str(run_dir / "lora")}
    if state_dict is not None:
        import torch

        with torch.device("meta"):
            plain = type(transformer).from_config(transformer.config)
        plain.load_state_dict(state_dict, assign=True)
        transformer = plain
    atomic_dir(run_dir / "transformer", lambda d: transformer.save_pretrained(str(d)))
    return {"transformer": str(run_dir / "transformer")}
