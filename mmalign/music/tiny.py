"""Tiny MusicGen models built from configs, for tests and the tiny recipes; nothing downloads.

`build_tiny_musicgen` saves a `MusicgenForConditionalGeneration` (the real transformers class: a T5 text encoder, an
EnCodec audio codec and the MusicGen decoder with K codebook heads) at tiny widths, with a word-level tokenizer built
in memory; `build_tiny_musicgen_decoder` saves the decoder alone (`MusicgenForCausalLM`) with its text encoder in
`text_encoder/`, the variant that is fed encoder states. Both load back with `from_pretrained`, the code a real
checkpoint (`facebook/musicgen-small`) uses, through `mmalign.music.adapter.load_music`.

As in the real models, the codebook vocabulary is `0 .. vocab_size - 1` and the one special token, `vocab_size`,
is pad, BOS and decoder start at once (the decoder embeds `vocab_size + 1` tokens, its heads predict `vocab_size`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

# Words of the toy music captions (patterns, instruments, keys, registers); other words map to <unk>.
MUSIC_WORDS = ("a", "an", "in", "the", "with", "and", "of", "on", "melody", "tune", "song", "ascending", "descending",
               "repeating", "alternating", "piano", "guitar", "violin", "flute", "cello", "drums", "synth", "organ",
               "c", "d", "e", "f", "g", "major", "minor", "low", "high", "slow", "fast", "calm", "bright", "dark",
               "loud", "soft", "pop", "rock", "jazz", "ambient", "music", "track", "beat")
MUSIC_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0, eos 1, unk 2


def word_tokenizer(words: Iterable[str] = MUSIC_WORDS, model_max_length: int = 64):
    """A T5-style word-level `PreTrainedTokenizerFast`: lower-cased whitespace/punctuation words, one id each
    (unknown words -> `<unk>`), `</s>` appended, `<pad>` = 0 and right padding as T5's. Built in memory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(MUSIC_SPECIAL)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length, padding_side="right")


def _text_config(vocab_size: int, width: int, layers: int, heads: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // heads, d_ff=2 * width, num_layers=layers,
                    num_heads=heads, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _decoder_config(vocab_size: int, num_codebooks: int, width: int, layers: int, heads: int,
                    ffn_dim: int | None = None):
    from transformers import MusicgenDecoderConfig

    special = vocab_size  # pad = BOS = decoder start, outside the codebook vocabulary (as musicgen-small's 2048)
    return MusicgenDecoderConfig(vocab_size=vocab_size, num_codebooks=num_codebooks, hidden_size=width,
                                 ffn_dim=ffn_dim or 2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                                 max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                                 activation_dropout=0.0, pad_token_id=special, bos_token_id=special,
                                 decoder_start_token_id=special, audio_channels=1, tie_word_embeddings=False)


def tiny_musicgen(vocab_size: int = 64, num_codebooks: int = 4, width: int = 32, layers: int = 2, heads: int = 4,
                  seed: int = 0, words: Iterable[str] = MUSIC_WORDS, ffn_dim: int | None = None,
                  text_width: int | None = None, text_layers: int | None = None):
    """(model, tokenizer): a tiny `MusicgenForConditionalGeneration` in eval mode and its word tokenizer.

    `width`, `layers`, `heads`, `ffn_dim` (default 2 x width) size the decoder; the T5 text encoder has `text_width`
    and `text_layers` (default: the decoder's) with the same number of heads. A text encoder narrower than the
    decoder is followed by MusicGen's own `enc_to_dec_proj` (a linear map to the decoder's width, part of the
    composite model, as in the musicgen checkpoints, whose T5 is 768 wide). The EnCodec codec runs at 8 kHz with a
    hop of 160 samples: 50 frames per second as musicgen's 32 kHz / 640, and a bandwidth giving exactly
    `num_codebooks` codebooks of `vocab_size` codes. Dropout is 0 (a real checkpoint's decoder has 0.1;
    `load_music(disable_dropout=True)` turns it off for preference training)."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenForConditionalGeneration

    tokenizer = word_tokenizer(words)
    nbits = max(1, (vocab_size - 1).bit_length())
    audio = EncodecConfig(sampling_rate=8000, audio_channels=1, upsampling_ratios=[8, 5, 4], num_filters=2,
                          hidden_size=16, num_residual_layers=1, num_lstm_layers=1, codebook_size=vocab_size,
                          codebook_dim=16, target_bandwidths=[50 * nbits * num_codebooks / 1000], compress=1,
                          normalize=False)
    config = MusicgenConfig(text_encoder=_text_config(len(tokenizer), text_width or width, text_layers or layers,
                                                      heads),
                            audio_encoder=audio,
                            decoder=_decoder_config(vocab_size, num_codebooks, width, layers, heads, ffn_dim))
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():  # EnCodec's codebooks are buffers left at zero until k-means: every code would decode alike
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    _generation_defaults(model.generation_config, vocab_size)
    return model, tokenizer


def tiny_musicgen_decoder(vocab_size: int = 64, num_codebooks: int = 4, width: int = 32, layers: int = 2,
                          heads: int = 4, seed: int = 0, words: Iterable[str] = MUSIC_WORDS):
    """(decoder, text_encoder, tokenizer): a tiny `MusicgenForCausalLM` whose cross-attention reads the states of a
    tiny `T5EncoderModel` of the same width (the decoder-only variant, fed given encoder states)."""
    from transformers import MusicgenForCausalLM, T5EncoderModel

    tokenizer = word_tokenizer(words)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(_text_config(len(tokenizer), width, layers, heads)).eval()
    decoder = MusicgenForCausalLM(_decoder_config(vocab_size, num_codebooks, width, layers, heads)).eval()
    _generation_defaults(decoder.generation_config, vocab_size)
    return decoder, text_encoder, tokenizer


def _generation_defaults(gen, special: int) -> None:
    # musicgen-small's generation_config.json: sampling with pad = BOS = decoder start = the special token
    gen.pad_token_id = gen.bos_token_id = gen.decoder_start_token_id = special
    gen.do_sample = True


def build_tiny_musicgen(out_dir: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Save a randomly initialised tiny MusicGen (model + tokenizer) into `out_dir` (~300 KB) and return it."""
    model, tokenizer = tiny_musicgen(seed=seed, **kwargs)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_musicgen_decoder(out_dir: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Save a tiny `MusicgenForCausalLM` (the folder's root), its text encoder (`text_encoder/`) and tokenizer."""
    decoder, text_encoder, tokenizer = tiny_musicgen_decoder(seed=seed, **kwargs)
    out = Path(out_dir)
    decoder.save_pretrained(out)
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out)
    return out
