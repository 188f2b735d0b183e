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


class RefreshedReference:
    """A reference that is moved to the policy every `every` optimizer steps (online training: flow_grpo's
    `ref_update_step`), saved in checkpoints so a resumed run compares against the same reference.

    - `copy`: `refresh` loads the policy's weights into the frozen copy `ref_module` (in its dtype).
    - `lora`: the snapshot is the LoRA tensors alone (the trainable parameters); the reference forward runs the
      policy with the snapshot swapped in (`weights`), so no second network is kept. Before the first refresh the
      reference is the base model (adapters disabled), as without refreshing.

    `every` = 0 never refreshes. `state_dict()` holds the step counter and the snapshot (LoRA tensors; for `copy`
    the whole reference's weights, so checkpoints grow by one model).
    """

    def __init__(self, mode: str, every: int, ref_module: torch.nn.Module | None = None):
        if mode not in ("lora", "copy"):
            raise ValueError(f"a refreshed reference is 'lora' or 'copy', got {mode!r}")
        if mode == "copy" and ref_module is None:
            raise ValueError("reference 'copy' needs the frozen copy to refresh")
        self.mode, self.every, self.ref_module = mode, int(every), ref_module
        self.steps = 0
        self.refreshes = 0
        self.lora: dict[str, torch.Tensor] | None = None

    def after_step(self, policy: torch.nn.Module) -> bool:
        """Count one optimizer step; refresh (and return True) when `every` steps have passed."""
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            self.refresh(policy)
            return True
        return False

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        if self.mode == "copy":
            for ref, p in zip(self.ref_module.parameters(), policy.parameters()):
                ref.copy_(p.to(ref.dtype))
        else:
            self.lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        self.refreshes += 1

    @contextlib.contextmanager
    def weights(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The reference network: the refreshed copy, the policy with the LoRA snapshot swapped in, or (`lora`
        before any refresh) the policy with its adapters disabled. Use under `torch.no_grad()`; the policy's own
        LoRA tensors are put back on exit (the storage is swapped, not written, so a pending backward through
        the policy still sees its own weights)."""
        if self.mode == "copy":
            yield self.ref_module
            return
        if self.lora is None:
            with adapters_disabled(policy) as model:
                yield model
            return
        params = dict(policy.named_parameters())
        missing = sorted(set(self.lora) - set(params))
        if missing:
            raise RuntimeError(f"the LoRA snapshot names parameters the policy does not have: {missing[:3]}")
        saved = {n: params[n].data for n in self.lora}
        try:
            for n, tensor in self.lora.items():
                # requires_grad off while swapped: autocast caches its casts of trainable leaves for the whole
                # autocast region, keyed by the parameter, and would hand the reference the policy's weights
                params[n].requires_grad_(False)
                params[n].data = tensor.to(params[n].device, params[n].dtype)
            yield policy
        finally:
            for n, data in saved.items():
                params[n].data = data
                params[n].requires_grad_(True)

    def state_dict(self) -> dict:
        state = {"steps": torch.tensor(self.steps), "refreshes": torch.tensor(self.refreshes)}
        if self.mode == "copy":
            state["weights"] = {k: v.detach().clone() for k, v in self.ref_module.state_dict().items()}
        elif self.lora is not None:
            state["lora"] = {k: v.detach().cpu().clone() for k, v in self.lora.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.refreshes = int(state["steps"]), int(state["refreshes"])
        if self.mode == "copy":
            self.ref_module.load_state_dict(state["weights"])
        else:
            self.lora = ({k: v.clone() for k, v in state["lora"].items()} if "lora" in state else None)
