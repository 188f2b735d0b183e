"""Shared validation and numerics for the loss functions.

Everything here is private to ``mmalign.losses``; the public functions own their math and only use these helpers
for the checks and conventions that every loss states the same way:

- half precision (float16, bfloat16) is computed in float32; float64 stays float64; float32 stays float32;
- shape mismatches raise ``ValueError`` naming the function, the arguments and their shapes;
- metrics are detached 0-dim tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a loss computes in: the promoted floating dtype of the inputs, half precision lifted to float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or dtype in _HALF:
        return torch.float32
    return dtype


def check_tensors(fn: str, names: Sequence[str], tensors: Sequence[object]) -> None:
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_shapes(fn: str, names: Sequence[str], tensors: Sequence[torch.Tensor], layout: str) -> None:
    """Require every tensor to have the same shape with ``len(layout)`` dims, e.g. layout ``"B"`` or ``"BK"``.

    Broadcasting is never used: a (B, 1) error against a (B,) reference would silently build a (B, B) loss.
    """
    check_tensors(fn, names, tensors)
    shapes = [tuple(t.shape) for t in tensors]
    expected = "(" + ", ".join(layout) + (",)" if len(layout) == 1 else ")")
    listing = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
    if any(len(s) != len(layout) for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"{fn}: {', '.join(names)} must all have the same shape {expected}; got {listing}")
    if shapes[0][0] == 0:
        raise ValueError(f"{fn}: empty batch ({listing}); a loss needs at least one sample")


def check_positive(fn: str, name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value}")
    return value


def check_choice(fn: str, name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{fn}: unknown {name} {value!r}; valid values are {', '.join(repr(v) for v in valid)}")


def tie_aware_accuracy(x: torch.Tensor) -> torch.Tensor:
    """Per-element 1 where x > 0, 1/2 where x == 0, 0 where x < 0 (a tie is a coin flip, not a miss)."""
    return (x > 0).to(x.dtype) + 0.5 * (x == 0).to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 when the mask is empty, still connected to ``x``'s graph (gradient 0)."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp_min(1).to(x.dtype)


def detached(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().reshape(()) for k, v in metrics.items()}
