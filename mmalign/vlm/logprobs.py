"""Response log-likelihoods: the VLM surrogate (`sum` over response tokens, with `count` for per-token means)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass
class ResponseLogps:
    """Per-sample response log-likelihood: `sum` (B,), `mean` = sum / count (B,), `count` (B,) tokens scored."""

    sum: Tensor
    mean: Tensor
    count: Tensor

    def split(self, n: int) -> list["ResponseLogps"]:
        """Cut a stacked batch ([chosen; rejected; ...]) into groups of `n` rows."""
        return [ResponseLogps(s, m, c) for s, m, c in zip(self.sum.split(n), self.mean.split(n), self.count.split(n))]

    def surrogate(self, kind: Literal["sum", "mean"] = "sum") -> Tensor:
        if kind not in ("sum", "mean"):
            raise ValueError(f"surrogate kind {kind!r}: valid values are 'sum' and 'mean'")
        return self.sum if kind == "sum" else self.mean


def response_logps(logits: Tensor, input_ids: Tensor, labels_mask: Tensor) -> ResponseLogps:
    """Sum / mean / count of `log softmax(logits)[t-1, input_ids[t]]` over positions t where `labels_mask`.

    logits: (B, L, V) from a causal LM over `input_ids` (B, L); computed in float32 (float64 stays float64).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    targets = input_ids[:, 1:]
    mask = labels_mask[:, 1:]
    shifted = logits[:, :-1]
    # log p(target) = logit[target] - logsumexp(logits), without a (B, L, V) log-softmax tensor.
    picked = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(dtype)
    lse = torch.stack([torch.logsumexp(row.to(dtype), dim=-1) for row in shifted])
    token_logps = torch.where(mask, picked - lse, torch.zeros((), dtype=dtype, device=logits.device))
    count = mask.sum(-1)
    total = token_logps.sum(-1)
    return ResponseLogps(total, total / count.clamp_min(1).to(dtype), count)
