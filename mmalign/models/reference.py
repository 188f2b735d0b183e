"""The reference model, one vocabulary for every modality: `reference: lora | copy | precomputed | none`.

- `lora`: the policy network itself with its LoRA adapters disabled (no second copy in memory);
- `copy`: a frozen deep copy of the starting weights (full fine-tunes), optionally in another dtype;
- `precomputed`: the reference's surrogates computed once before training and read with the batch (possible where
  the surrogate is a deterministic function of the sample, e.g. a VLM's response log-probs; not for diffusion,
  whose surrogates depend on the t and noise drawn at each step);
- `none`: methods that need no reference (sft, mapo).

A config says `auto` (the default) for the usual choice: `lora` with LoRA, else `copy`, and `none` whenever the
method needs no reference (`resolve_reference`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Literal

import torch

from mmalign.models.loading import move_module

REFERENCES = ("lora", "copy", "precomputed", "none")
ReferenceMode = Literal["lora", "copy", "precomputed", "none"]
ReferenceChoice = Literal["auto", "lora", "copy", "precomputed", "none"]


def resolve_reference(requested: str, *, lora: bool, needs_reference: bool,
                      supported: tuple[str, ...] = REFERENCES, where: str = "model.reference") -> str:
    """The reference mode a run uses: `requested` (`auto` or a mode) checked against the method and the model.

    A method that needs no reference always gets `none`; `auto` is `lora` with LoRA, else `copy`. Raises
    ValueError naming `where` for a combination that cannot work.
    """
    if not needs_reference:
        return "none"
    mode = ("lora" if lora else "copy") if requested == "auto" else requested
    if mode not in supported:
        raise ValueError(f"{where} {mode!r} is not available here; valid: auto, {', '.join(supported)}")
    if mode == "none":
        raise ValueError(f"{where} 'none': the method compares against a reference; use auto, "
                         f"{', '.join(m for m in supported if m != 'none')}")
    if mode == "lora" and not lora:
        raise ValueError(f"{where} 'lora' needs model.lora (the reference is the LoRA model with its adapters "
                         "disabled); use 'copy' for full fine-tunes")
    return mode


def frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of `module` with gradients off, in eval mode, optionally cast to `dtype`."""
    return move_module(copy.deepcopy(module).requires_grad_(False).eval(), dtype=dtype)


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` with its LoRA adapters switched off for the duration (the `lora` reference): a peft `PeftModel`
    (`disable_adapter()` context) or a diffusers / transformers model with peft adapters attached
    (`disable_adapters()` / `enable_adapters()`)."""
    if hasattr(module, "disable_adapter") and hasattr(module, "get_base_model"):  # peft.PeftModel
        with module.disable_adapter():
            yield module
    elif hasattr(module, "disable_adapters"):
        module.disable_adapters()
        try:
            yield module
        finally:
            module.enable_adapters()
    else:
        raise ValueError(f"reference 'lora' needs a model with LoRA adapters; {type(module).__name__} has none "
                         "(use reference 'copy' for full fine-tunes)")
