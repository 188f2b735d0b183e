"""Tiny tokenizers shared by the tiny models of every modality (tests, tiny recipes, the toy worlds).

Each modality builds its tiny models in its own folder (`mmalign.t2i.tiny`, `mmalign.vlm.tiny`,
`mmalign.rewards.tiny`): real diffusers/transformers classes with small widths, saved with `save_pretrained` and
loaded back through the same `from_pretrained` code a real checkpoint uses. Nothing here downloads anything.
"""

from __future__ import annotations

from typing import Iterable

# Words of the toy world's captions; other text falls back to single characters.
TOY_WORDS = ("a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "on", "the", "left",
             "center", "right")


def word_clip_tokenizer(words: Iterable[str] = TOY_WORDS, model_max_length: int = 16, special_last: bool = False):
    """A CLIP BPE tokenizer whose merges spell each word of `words` as one token.

    Every lowercase letter and digit is in the vocabulary on its own, so any other text still tokenizes (as
    characters). Built in memory: no files, no network. `special_last=True` gives `<|startoftext|>` and
    `<|endoftext|>` the two largest ids, as in the real CLIP vocabulary (open_clip pools the text at the argmax id).
    """
    from transformers import CLIPTokenizer

    specials = ("<|startoftext|>", "<|endoftext|>")
    vocab: dict[str, int] = {} if special_last else {t: i for i, t in enumerate(specials)}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        add(ch)
        add(ch + "</w>")
    def bpe(pieces: list[str]) -> list[str]:
        # What the tokenizer does with the merges so far: repeatedly apply the lowest-ranked adjacent merge.
        rank = {m: i for i, m in enumerate(merges)}
        while True:
            ranked = [(rank[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in rank]
            if not ranked:
                return pieces
            _, i = min(ranked)
            pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]

    for word in words:
        # Continue from the segmentation the existing merges already produce (e.g. "re" from "red" inside
        # "green"); new merges rank after all old ones, so earlier words keep their single token.
        pieces = bpe(list(word[:-1]) + [word[-1] + "</w>"])
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            add(pieces[0])
    for token in specials:
        add(token)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tok
