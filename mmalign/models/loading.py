"""Reading a model folder or hub id: one error class for every modality.

A local folder is read directly; anything else must look like a hub id (`org/name`) and is read through the hub
client (which needs network or a populated Hugging Face cache). Offline, the error says to pass a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A model folder or hub id could not be loaded; the message names it and says what was expected."""


def _check_hub_id(pretrained: str) -> None:
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise ModelLoadError(f"{pretrained}: no such model folder (and not a hub id of the form org/name)")


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    """A diffusers pipeline's model_index.json, from a local folder or the hub cache."""
    local = Path(pretrained)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{pretrained}: not a diffusers pipeline folder (no model_index.json); expected "
                                 "subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/")
        return json.loads(index.read_text())
    _check_hub_id(pretrained)
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as err:  # hub errors come in many classes; the message matters
        raise ModelLoadError(f"{pretrained}: could not load the pipeline config from the hub or the local cache "
                             f"({type(err).__name__}: {err}). Offline, pass a local pipeline folder.") from err


def read_model_config(pretrained: str, revision: str | None = None) -> dict:
    """A transformers model's config.json (as a dict), from a local folder or the hub cache."""
    local = Path(pretrained)
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{pretrained}: not a transformers model folder (no config.json)")
        return json.loads(path.read_text())
    _check_hub_id(pretrained)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(pretrained, revision=revision).to_dict()
    except Exception as err:  # hub errors come in many classes; the message matters
        raise ModelLoadError(f"{pretrained}: could not load the model config from the hub or the local cache "
                             f"({type(err).__name__}: {err}). Offline, pass a local model folder.") from err


def move_module(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`module.to(device, dtype)`, casting only when the dtype differs (diffusers' `ModelMixin.to` warns about
    float32 modules on every cast, even a no-op one)."""
    if device is not None:
        module.to(device)
    if dtype is not None and getattr(module, "dtype", None) != dtype:
        module.to(dtype=dtype)
    return module
