"""MusicGen-class adapter: a batch of audio-code sequences -> their log-probability exactly as generation sees it.

MusicGen's decoder reads and writes K EnCodec codebooks at once with the *delay pattern*: codebook k runs k steps
behind codebook 0. For T frames the decoder sequence has T + K positions (mono); position 0 holds the decoder start
token in every codebook, frame t of codebook k sits at position t + k + 1, and the remaining positions of each
codebook (its first k + 1 and its last K - 1 - k) hold the start token as well: `generate` builds this layout with
the decoder's own `build_delay_pattern_mask` (filled with `decoder_start_token_id`, which MusicGen checkpoints share
with pad and BOS, one past the codebook vocabulary) and re-applies it after every sampled step
(`apply_delay_pattern_mask`). At position j the decoder embeds the K tokens (summed) and its K heads predict the K
tokens of position j + 1. So the log-probability of codes `c` (K, T) given the text is

    log π(c | text) = Σ_k Σ_t log softmax(head_k(h_{t+k}))[c[k, t]]

summed over codebooks and frames, real frames only: delay-pattern positions and the padding of shorter sequences in a
batch are never scored, and `count` (= K·T per sequence) is returned for per-token means. It is never
`outputs.loss`, which is a mean over tokens and codebooks. `tests/test_music_adapter.py` checks this teacher-forced
sum against the log-probability of the same codes read off `generate`'s own per-step logits.

Here the layout is taken from the decoder's `build_delay_pattern_mask` (so stereo checkpoints, whose interleaved
left/right codebooks share a delay, are scored as generated too); the decoder is teacher-forced on the whole
delayed sequence but its last position, with no decoder attention mask, as `generate` runs it. Samples of a batch
are right-padded: the decoder is causal, so the pads after a sequence never reach the logits that score it.

Classifier-free guidance (`guidance_scale` > 1 in `generate`) samples from a mix of the conditional and the
unconditional (empty-text) logits. It is a sampling choice, not part of the model: log π here is the conditional
model's alone, and codes generated with guidance are scored without it.

Generated codes are kept as codes (`MusicAdapter.generate`): decoding them to audio and re-encoding with EnCodec is
not the identity. Reference (`mmalign.models.reference`): the same network with its LoRA adapters disabled (`lora`),
a frozen copy (`copy`), or log-probs precomputed once into a cache next to the shards (`precomputed`,
`mmalign.music.reference_cache`). `MusicAdapter.surrogates` is the adapter contract (`mmalign.models.contract`).

Two model layouts load (`load_music`): a `MusicgenForConditionalGeneration` folder (text encoder, EnCodec, decoder;
`facebook/musicgen-*`), and a `MusicgenForCausalLM` folder (model_type `musicgen_decoder`) with its frozen text
encoder in `text_encoder/`, whose states it is fed. Codes the model cannot score (another number of codebooks, values
outside the codebook vocabulary `0 .. vocab_size - 1`, no frames) raise `MusicCodesError` naming the sample before
any forward pass (`mmalign.music.codes.code_problem` is the one check; the task's reader skips and counts such
samples).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from mmalign.models.contract import Surrogates
from mmalign.models.loading import ModelLoadError, read_model_config
from mmalign.models.reference import ReferenceMode, adapters_disabled, frozen_copy
from mmalign.music.codes import MusicCodesError, code_problem
from mmalign.music.reference_cache import cached_reference

MUSIC_KINDS = ("musicgen", "musicgen_decoder")
# Linear layers of the decoder's blocks (self-attention, cross-attention, feed-forward); the text encoder and EnCodec
# are never adapted.
MUSIC_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# -- the delay pattern and the log-probability ----------------------------------------------------------------------
@dataclass
class CodeLogps:
    """Per-sequence log-probability of codes: `sum` (N,) over codebooks and frames, `count` (N,) tokens scored."""

    sum: Tensor
    count: Tensor

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp_min(1).to(self.sum.dtype)


def delayed_sequence(decoder, codes: Tensor, frames: Tensor, start_id: int) -> tuple[Tensor, Tensor]:
    """The decoder's token sequence for codes as `generate` lays it out, and where it holds codes to score.

    decoder: the `MusicgenForCausalLM` (its `build_delay_pattern_mask` and config are used, nothing runs).
    codes: (N, K, T) long; frames: (N, T) bool, True on real frames (False on a shorter sequence's padding).
    Returns `seq` (N·K, L) long, row n·K + k = codebook k of sequence n, L = T + C (C = K mono, K / 2 stereo; at
    least 2C - 1, below which generate builds no pattern), every non-code position holding `start_id`; and `scored`
    (N·K, L) bool, True where `seq` holds a real frame's code.
    """
    n, k, t = codes.shape
    channel_codebooks = k // 2 if decoder.config.audio_channels == 2 else k
    slots_per_row = max(t, channel_codebooks - 1)
    length = slots_per_row + channel_codebooks
    start = codes.new_full((n * k, 1), start_id)
    _, pattern = decoder.build_delay_pattern_mask(start, pad_token_id=start_id, max_length=length)
    slots = (pattern == -1).view(n, k, length)  # the positions generate fills with sampled tokens, in frame order
    if not bool((slots.sum(-1) == slots_per_row).all()):
        raise RuntimeError("the decoder's delay pattern does not give one position per frame; this transformers "
                           "version lays MusicGen's codes out differently than mmalign expects")
    real = torch.zeros((n, k, slots_per_row), dtype=torch.bool, device=codes.device)
    real[..., :t] = frames[:, None, :].to(codes.device)
    filled = codes.new_full((n, k, slots_per_row), start_id)
    filled[..., :t] = torch.where(real[..., :t], codes, torch.full_like(codes, start_id))
    seq = pattern.view(n, k, length).clone()
    seq[slots] = filled.reshape(-1)
    scored = torch.zeros_like(slots)
    scored[slots] = real.reshape(-1)
    return seq.view(n * k, length), scored.view(n * k, length)


def code_logps(logits: Tensor, seq: Tensor, scored: Tensor, num_codebooks: int) -> CodeLogps:
    """Sum over codebooks and positions of `log softmax(logits)[j, seq[j + 1]]` where `scored[j + 1]`.

    logits: (N·K, L - 1, V), the decoder's output over `seq[:, :-1]` (row n·K + k = codebook k's head); computed in
    float32 (float64 stays float64). Unscored targets (start tokens, outside the heads' vocabulary) are never read.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    targets, mask = seq[:, 1:], scored[:, 1:]
    vocab = logits.shape[-1]
    # log p(target) = logit[target] - logsumexp(logits), without a (N·K, L, V) log-softmax tensor
    picked = logits.gather(-1, targets.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1).to(dtype)
    lse = torch.logsumexp(logits.to(dtype), dim=-1)
    token = torch.where(mask, picked - lse, torch.zeros((), dtype=dtype, device=logits.device))
    rows = token.shape[0] // num_codebooks
    return CodeLogps(token.view(rows, -1).sum(-1), mask.reshape(rows, -1).sum(-1))


@dataclass
class MusicInputs:
    """A tokenised batch: `text` (input_ids, attention_mask) per sequence, the delayed code sequence `seq` and its
    `scored` mask (N·K, L) (`delayed_sequence`), and the `keys` naming the sequences in errors."""

    text: dict[str, Tensor]
    seq: Tensor
    scored: Tensor
    keys: list[str]

    def to(self, device) -> "MusicInputs":
        return MusicInputs({k: v.to(device) for k, v in self.text.items()}, self.seq.to(device),
                           self.scored.to(device), self.keys)


class _RecordIds:
    """A stopping criterion that never stops and keeps the last `input_ids` generate shows it: the full delayed
    sequence of sampled tokens (MusicgenForConditionalGeneration.generate returns audio, not codes)."""

    ids: Optional[Tensor] = None

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        self.ids = input_ids.clone()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# -- the adapter ---------------------------------------------------------------------------------------------------
@dataclass
class MusicAdapter:
    """A MusicGen model (policy), its tokenizer and its reference.

    Attributes:
        model: the policy (`PeftModel` when LoRA is on): a `MusicgenForConditionalGeneration`, or a
            `MusicgenForCausalLM` (kind "musicgen_decoder") fed the states of `text_encoder`.
        tokenizer: the text tokenizer (T5's for real checkpoints).
        kind: "musicgen" or "musicgen_decoder".
        text_encoder: the frozen text encoder of a "musicgen_decoder" model (None otherwise).
        max_frames: frames kept per sequence (the first ones; None = all).
        reference: "lora" (adapters disabled), "copy" (frozen `ref_model`), "precomputed" (cached log-probs),
            "none" (no reference: SFT).
    """

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    pretrained: str
    revision: Optional[str] = None
    text_encoder: Optional[torch.nn.Module] = None
    max_frames: Optional[int] = None
    reference: ReferenceMode = "none"
    ref_model: Optional[torch.nn.Module] = None

    def __post_init__(self) -> None:
        if self.kind not in MUSIC_KINDS:
            raise ValueError(f"kind {self.kind!r}: valid kinds are {', '.join(MUSIC_KINDS)}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 frames or None, got {self.max_frames}")

    # -- the model's codebooks ---------------------------------------------------------------------------------
    def _base(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def decoder(self):
        """The `MusicgenForCausalLM` (of the composite model, or the model itself)."""
        base = self._base()
        return base.decoder if self.kind == "musicgen" else base

    @property
    def num_codebooks(self) -> int:
        return int(self.decoder.config.num_codebooks)

    @property
    def vocab_size(self) -> int:
        """Codes per codebook (the heads' outputs); `vocab_size` itself is the pad / start token."""
        return int(self.decoder.config.vocab_size)

    @property
    def start_token_id(self) -> int:
        """The token generate starts every codebook with and fills the delay pattern with."""
        gen = self._base().generation_config
        for value in (gen.decoder_start_token_id, gen.bos_token_id, self.decoder.config.bos_token_id):
            if value is not None:
                return int(value)
        raise ValueError(f"{self.pretrained}: the model names no decoder start / BOS token")

    @property
    def channel_codebooks(self) -> int:
        """Codebooks per delay step group: K (mono) or K / 2 (stereo: left and right share a delay)."""
        return self.num_codebooks // 2 if self.decoder.config.audio_channels == 2 else self.num_codebooks

    # -- inputs ------------------------------------------------------------------------------------------------
    def check_codes(self, codes: Tensor, frames: Tensor, keys: Sequence[str]) -> None:
        """`MusicCodesError` naming the first sequence of `codes` (N, K, T) the model cannot score."""
        if codes.ndim != 3:
            raise MusicCodesError(f"codes must be (N, K, T), got shape {tuple(codes.shape)}")
        for i, key in enumerate(keys):
            problem = code_problem(codes[i], self.num_codebooks, self.vocab_size, frames[i])
            if problem is not None:
                raise MusicCodesError(f"sample {key}: {problem}")

    def batch_problem(self, batch: dict) -> str | None:
        """The `MusicCodesError` message for the first sample of a `collate_music_pairs` batch the model cannot
        score, or None (no model runs)."""
        try:
            self.check_codes(batch["codes"], batch["codes_mask"], _row_keys(batch["keys"], batch.get("items", 2),
                                                                            ranked="items" in batch))
        except MusicCodesError as err:
            return str(err)
        return None

    def encode_text(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise the text prompts (padded, as MusicGen's processor does): input_ids and attention_mask."""
        enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode(self, prompts: Sequence[str], codes: Tensor, frames: Optional[Tensor] = None,
               keys: Optional[Sequence[str]] = None) -> MusicInputs:
        """(prompt, codes) pairs -> `MusicInputs`. codes: (N, K, T) long; frames: (N, T) bool real frames (default
        all). Checks the codes first (`MusicCodesError` naming the key), then keeps the first `max_frames`."""
        n = codes.shape[0]
        if len(prompts) != n:
            raise ValueError(f"encode: {len(prompts)} prompts for {n} code sequences; give one prompt per sequence")
        keys = list(keys) if keys is not None else [str(i) for i in range(n)]
        frames = torch.ones(codes.shape[0], codes.shape[-1], dtype=torch.bool) if frames is None else frames.bool()
        self.check_codes(codes, frames, keys)
        if self.max_frames is not None:
            codes, frames = codes[..., : self.max_frames], frames[:, : self.max_frames]
        seq, scored = delayed_sequence(self.decoder, codes.long(), frames, self.start_token_id)
        return MusicInputs(self.encode_text(prompts), seq, scored, keys)

    # -- scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encoder_states(self, text: dict[str, Tensor]) -> Tensor:
        """The frozen text encoder's states for a "musicgen_decoder" model (what its cross-attention reads)."""
        if self.text_encoder is None:
            raise ValueError(f"{self.pretrained}: a musicgen_decoder model needs its text encoder (text_encoder/)")
        return self.text_encoder(**text).last_hidden_state

    def logits(self, model: torch.nn.Module, inputs: MusicInputs) -> Tensor:
        """(N·K, L - 1, V): `model`'s logits over the delayed sequence but its last position, teacher-forced."""
        dec_in = inputs.seq[:, :-1]
        if self.kind == "musicgen":
            out = model(input_ids=inputs.text["input_ids"], attention_mask=inputs.text["attention_mask"],
                        decoder_input_ids=dec_in, use_cache=False)
        else:
            out = model(input_ids=dec_in, encoder_hidden_states=self.encoder_states(inputs.text),
                        encoder_attention_mask=inputs.text["attention_mask"], use_cache=False)
        return out.logits

    def logps(self, model: torch.nn.Module, inputs: MusicInputs) -> CodeLogps:
        """Code log-probs of `inputs` under `model` (the policy, possibly wrapped, or a reference)."""
        return code_logps(self.logits(model, inputs), inputs.seq, inputs.scored, self.num_codebooks)

    @torch.no_grad()
    def reference_logps(self, inputs: MusicInputs) -> CodeLogps:
        """Reference log-probs: the policy with LoRA disabled, or the frozen copy. Precomputed references come
        from the batch's cache (`surrogates`), not from here."""
        if self.reference == "lora":
            if not hasattr(self.model, "disable_adapter"):
                raise ValueError("reference='lora' needs a peft model (apply_lora first); use reference='copy' "
                                 "for full fine-tunes")
            with adapters_disabled(self.model) as model:
                return self.logps(model, inputs)
        if self.reference == "copy":
            if self.ref_model is None:
                raise ValueError("reference='copy' but no ref_model; call make_reference_copy()")
            self.ref_model.train(self.model.training)  # the policy's mode, as the lora reference (the policy itself)
            return self.logps(self.ref_model, inputs)
        raise ValueError(f"reference={self.reference!r} computes no reference log-probs here ('precomputed' reads "
                         "them from the shards' cache; 'none' has none)")

    def make_reference_copy(self) -> None:
        """Freeze a deep copy of the current policy as the reference (`reference='copy'`)."""
        self.ref_model, self.reference = frozen_copy(self.model), "copy"

    # -- the adapter contract ----------------------------------------------------------------------------------
    def surrogates(self, policy: torch.nn.Module, batch: dict, generator: torch.Generator | None = None,
                   with_reference: bool = True, unwrapped: torch.nn.Module | None = None, *,
                   chosen_only: bool = False) -> Surrogates:
        """A `collate_music_pairs` batch -> `Surrogates` (2, B) of kind "logp": summed code log-probs of the chosen
        (row 0) and rejected (row 1) codes given the prompt, `counts` the codes scored. `chosen_only`: row 0 alone
        (K = 1, for SFT). A `collate_music_ranked` batch (N items per list, `batch["items"]`) gives (N, B), row j
        item j of every list. `policy` may be wrapped (DDP); the reference runs on the adapter's own model.
        Deterministic: `generator` is unused."""
        n = len(batch["keys"])
        codes, frames = batch["codes"], batch["codes_mask"]
        items = int(batch.get("items", 2))
        rows = 1 if chosen_only else items
        if codes.shape[0] != items * n:
            what = "[chosen; rejected]" if "items" not in batch else "item-major"
            raise ValueError(f"a music batch of {n} samples holds {items} x {n} code sequences ({what}), got "
                             f"{codes.shape[0]}")
        inputs = self.encode(list(batch["prompts"]) * rows, codes[: rows * n], frames[: rows * n],
                             _row_keys(batch["keys"], rows, ranked="items" in batch))
        device = next(self.model.parameters()).device
        inputs = inputs.to(device)
        lp = self.logps(policy, inputs)
        ref = None
        if with_reference and not chosen_only:
            if self.reference == "precomputed":
                ref = cached_reference(batch).to(device=device, dtype=lp.sum.dtype)
            else:
                ref = self.reference_logps(inputs).sum.view(rows, n)
        return Surrogates(lp.sum.view(rows, n), ref, "logp", counts=lp.count.view(rows, n))

    def producer(self) -> dict[str, Any]:
        """What reference log-probs depend on besides the sample: model, revision, tokenizer and max_frames."""
        tok = self.tokenizer.backend_tokenizer.to_str() if hasattr(self.tokenizer, "backend_tokenizer") else ""
        return {"kind": "music_reference_logps", "model": self.pretrained, "revision": self.revision,
                "tokenizer": hashlib.sha256(tok.encode()).hexdigest()[:16], "max_frames": self.max_frames,
                "model_kind": self.kind}

    # -- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, frames: int, do_sample: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                 model: torch.nn.Module | None = None) -> Tensor:
        """Codes (B, K, frames) for a batch of prompts, one `generate` call with the KV cache.

        frames: T, the code frames per sample (50 per second for MusicGen); generate runs T + C - 1 steps.
        top_k, guidance_scale: None = the checkpoint's generation config (musicgen-small: top_k 250, guidance 3);
            top_k 0 and guidance_scale 1 sample from π itself, whose log-probability `logps` computes.
        seed: seeds sampling (the global torch generator, as transformers' sampling uses it).
        """
        from transformers import StoppingCriteriaList

        c = self.channel_codebooks
        if frames < max(1, c - 1):
            raise ValueError(f"frames must be >= {max(1, c - 1)} (MusicGen's delay pattern needs 2C - 1 = "
                             f"{2 * c - 1} positions), got {frames}")
        model = self.model if model is None else model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        device = next(base.parameters()).device
        text = {k: v.to(device) for k, v in self.encode_text(prompts).items()}
        start_id = self.start_token_id
        kwargs: dict[str, Any] = dict(max_new_tokens=frames + c - 1, do_sample=do_sample, num_return_sequences=1,
                                      return_dict_in_generate=False)
        if do_sample:
            kwargs["temperature"] = temperature
        if top_k is not None:
            kwargs["top_k"] = top_k
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        n, k = len(prompts), self.num_codebooks
        if self.kind == "musicgen":
            kwargs.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        else:
            if guidance_scale is not None and guidance_scale > 1:
                raise ValueError("classifier-free guidance with a musicgen_decoder model needs unconditional "
                                 "encoder states; generate with guidance_scale 1 (or None)")
            from transformers import DynamicCache, EncoderDecoderCache

            start = torch.full((n * k, 1), start_id, dtype=torch.long, device=device)
            # The start token equals pad, so generate would mask it out of attention; teacher forcing (and the
            # composite model's generate) attend to it. MusicgenForCausalLM.generate makes a self-attention-only
            # cache, into which the cross-attention would write the text's keys (transformers 5.x): give it an
            # encoder-decoder cache.
            cache = EncoderDecoderCache(DynamicCache(config=base.config), DynamicCache(config=base.config))
            kwargs.update(input_ids=start, attention_mask=torch.ones_like(start[::k]), cache=cache,
                          encoder_hidden_states=self.encoder_states(text),
                          encoder_attention_mask=text["attention_mask"])
        record = _RecordIds()
        if seed is not None:
            torch.manual_seed(seed)
        was_training = base.training
        base.eval()
        try:
            base.generate(**kwargs, stopping_criteria=StoppingCriteriaList([record]))
        finally:
            base.train(was_training)
        ids = record.ids
        _, pattern = self.decoder.build_delay_pattern_mask(ids[:, :1], pad_token_id=start_id,
                                                           max_length=ids.shape[1])
        return ids[pattern == -1].view(n, k, frames)

    @torch.no_grad()
    def decode_audio(self, codes: Tensor) -> Tensor:
        """Waveforms (B, channels, samples) of codes (B, K, T) through the model's EnCodec ("musicgen" only)."""
        if self.kind != "musicgen":
            raise ValueError(f"{self.pretrained}: a musicgen_decoder model has no audio codec")
        audio = self._base().audio_encoder
        return audio.decode(codes[None].to(next(audio.parameters()).device), audio_scales=[None] * len(codes))[0]


def _row_keys(keys: Sequence[str], rows: int, ranked: bool = False) -> list[str]:
    """The sample key of each code row of a batch, with its side (pairs) or item index (ranked lists)."""
    if ranked:
        return [f"{key} (item {j})" for j in range(rows) for key in keys]
    sides = ("chosen", "rejected")[:rows]
    return [f"{key} ({side})" for side in sides for key in keys]


# -- building ------------------------------------------------------------------------------------------------------
def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of `model` to 0 (TRL's `disable_dropout` for preference training): `nn.Dropout` modules
    and the float rates MusicGen's decoder applies functionally (`dropout`, `activation_dropout`,
    `attention_dropout`, `layerdrop`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "activation_dropout", "attention_dropout", "layerdrop"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def apply_lora(model: torch.nn.Module, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               target_modules: Sequence[str] = MUSIC_LORA_TARGETS):
    """Wrap `model` in peft LoRA on the decoder blocks' linear layers only (text encoder, EnCodec and the codebook
    embeddings and heads stay frozen); the result saves with `save_pretrained` and loads with
    `PeftModel.from_pretrained(base, folder)`."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(re.escape(t) for t in target_modules)
    pattern = r"^(decoder\.)?model\.decoder\.layers\.\d+\.(.*\.)?(" + names + r")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    model.requires_grad_(False)
    return get_peft_model(model, config)


def load_music(pretrained: str, *, revision: str | None = None, dtype: str | torch.dtype = "float32",
               max_frames: int | None = None, reference: ReferenceMode = "none", lora: dict | None = None,
               no_dropout: bool = True, device: str | torch.device = "cpu") -> MusicAdapter:
    """Load a MusicGen model and its tokenizer with `from_pretrained` (local folder or hub id) and set what trains.

    lora: None = full fine-tune of the decoder (text encoder and EnCodec frozen); a dict of `apply_lora` options
        (rank, alpha, dropout, target_modules) = LoRA on the decoder blocks.
    reference: "lora" needs `lora`; "copy" makes a frozen copy of the loaded weights; "precomputed" and "none" keep
        no reference in memory.
    no_dropout: `disable_dropout` on the loaded model (before LoRA, whose own dropout is `lora["dropout"]`), so the
        policy and its reference see the same network (musicgen checkpoints train with dropout 0.1).
    """
    from transformers import (AutoModelForTextEncoding, AutoTokenizer, MusicgenForCausalLM,
                              MusicgenForConditionalGeneration)

    kind = read_model_config(pretrained, revision).get("model_type", "?")
    if kind not in MUSIC_KINDS:
        raise ModelLoadError(f"{pretrained}: model_type {kind!r} is not a MusicGen model; valid: "
                             f"{', '.join(MUSIC_KINDS)} (MusicgenForConditionalGeneration, MusicgenForCausalLM)")
    if reference == "lora" and lora is None:
        raise ValueError("reference='lora' needs lora options (model.lora); with a full fine-tune use "
                         "reference='copy' or 'precomputed'")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cls = MusicgenForConditionalGeneration if kind == "musicgen" else MusicgenForCausalLM
    text_encoder = None
    try:
        model = cls.from_pretrained(pretrained, revision=revision, dtype=torch_dtype)
        if kind == "musicgen_decoder":
            text_encoder = AutoModelForTextEncoding.from_pretrained(pretrained, subfolder="text_encoder",
                                                                    revision=revision, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(pretrained, revision=revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{pretrained}: could not load the model, its tokenizer"
                             f"{' or its text_encoder/' if kind == 'musicgen_decoder' else ''}: {err}") from err
    if text_encoder is not None:
        width = model.config.cross_attention_hidden_size or model.config.hidden_size
        if text_encoder.config.d_model != width:
            raise ModelLoadError(f"{pretrained}: text_encoder/ gives states of width {text_encoder.config.d_model}, "
                                 f"the decoder's cross-attention reads {width}")
        text_encoder.requires_grad_(False).eval().to(device)
    if no_dropout:
        disable_dropout(model)
    model.to(device)
    adapter = MusicAdapter(model, tokenizer, kind, pretrained, revision, text_encoder, max_frames)
    if reference == "copy":
        adapter.make_reference_copy()
    if lora is not None:
        adapter.model = apply_lora(model, **lora)
    else:
        model.requires_grad_(False)
        adapter.decoder.requires_grad_(True)
    adapter.reference = reference
    return adapter
