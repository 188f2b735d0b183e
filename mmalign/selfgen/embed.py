"""Sentence embeddings for BDHS's semantic filter: unit vectors whose dot product is the cosine similarity.

- `"vlm"`: the VLM's own input (token) embeddings, averaged over the text's tokens. Needs nothing else; coarse.
- a local folder or hub id of a transformers text encoder (a sentence-embedding model such as an all-MiniLM
  checkpoint): mean pooling over the attention mask, the pooling sentence-transformers uses for those models.
  Loaded with `AutoModel.from_pretrained`, so it works offline from a local folder.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

TextEmbedder = Callable[[Sequence[str]], torch.Tensor]  # texts -> (N, D) unit rows


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class TokenEmbeddingEmbedder:
    """Mean of the VLM's input embedding vectors of a text's tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.embeddings = model.get_input_embeddings()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        rows = []
        weight = self.embeddings.weight
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
            rows.append(weight[torch.tensor(ids, device=weight.device)].mean(0))
        return _normalise(torch.stack(rows)).cpu()


class EncoderEmbedder:
    """A transformers text encoder with attention-masked mean pooling."""

    def __init__(self, pretrained: str, device: str | torch.device = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.model = AutoModel.from_pretrained(pretrained).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return _normalise((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu()


def load_embedder(spec: str, adapter=None, device: str | torch.device = "cpu") -> TextEmbedder:
    """`"vlm"` (needs `adapter`) or a text-encoder folder / hub id."""
    if spec == "vlm":
        if adapter is None:
            raise ValueError("embedder 'vlm' needs the VLM adapter")
        return TokenEmbeddingEmbedder(adapter.model, adapter.tokenizer)
    try:
        return EncoderEmbedder(spec, device)
    except (OSError, ValueError) as err:
        raise ValueError(f"embedder {spec!r}: not 'vlm' and not a loadable text encoder folder or hub id ({err})"
                         ) from err
