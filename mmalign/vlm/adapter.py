"""Vision-language model adapter (LLaVA-style and Qwen2-VL-style): a batch -> per-sample response log-probs.

The log-likelihood surrogate of a response `y` to a prompt `x` (chat turns with images) is
`sum over response tokens t of log p(y_t | x, y_<t)`; prompt tokens and pads are masked out. The adapter also
returns the mean over response tokens and the token count, for length-normalised variants. The losses in
`mmalign.losses` take these numbers; this module holds no loss math.

Layout: every sequence is `[prompt][response][pads]` (right padding, so position ids are plain `arange` for
LLaVA; Qwen2-VL computes its 3-D rope positions from the attention mask). Prompts are tokenised by the model's
processor, which expands each image placeholder into the image's tokens; they are never truncated, because image
tokens and image features must match. `max_length` applies to the response only. Image tokens are counted per
sample against what the images need before any forward; a mismatch is a `ImageTokenMismatchError` naming the
sample.

Reference model (`mmalign.models.reference`): the same network with its LoRA adapters disabled (`lora`: peft; no
second copy), a frozen copy (`copy`), or log-probs precomputed once into a cache next to the shards
(`precomputed`, `mmalign.vlm.reference_cache`). `VLMAdapter.surrogates` is the adapter contract
(`mmalign.models.contract`): a pair batch -> `Surrogates` of kind "logp" (summed response log-probs, with counts).

Prompt and processor handling is in `mmalign.vlm.processing`, the log-prob arithmetic in `mmalign.vlm.logprobs`.

Generation (`generate`) is batched with left padding and the KV cache; `image_keep_prob` < 1 hides image tokens
from attention (BDHS) while keeping every token's position.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from mmalign.models.contract import Surrogates
from mmalign.models.loading import ModelLoadError, read_model_config
from mmalign.models.reference import ReferenceMode, adapters_disabled, frozen_copy
from mmalign.vlm.logprobs import ResponseLogps, response_logps
from mmalign.vlm.processing import ImageTokenMismatchError, family_of, load_processor, normalize_turns, pair_rows
from mmalign.vlm.reference_cache import cached_reference

# Module paths (attribute chains from the top-level model) of each trainable group.
_GROUPS = {
    "llava": {"vision": ("model.vision_tower",), "projector": ("model.multi_modal_projector", "model.image_newline"),
              "llm": ("model.language_model", "lm_head")},
    "qwen2_vl": {"vision": ("model.visual",), "projector": ("model.visual.merger",),
                 "llm": ("model.language_model", "lm_head")},
}
_PROJECTOR_NAMES = {"llava": ["multi_modal_projector"], "qwen2_vl": ["merger"]}
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Processor outputs laid along the sequence (padded with the sequence); every other output is per image.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class PromptTooLongError(ValueError):
    """A prompt is longer than `max_prompt_length`; prompts are never truncated (image tokens would be cut)."""


# -- inputs ----------------------------------------------------------------------------------------------------
@dataclass
class VLMInputs:
    """A tokenised batch. `model_inputs` go to the model's forward; `labels_mask` (B, L) is True on response
    tokens (the tokens scored); `keys` name the samples in errors."""

    model_inputs: dict[str, Tensor]
    labels_mask: Tensor
    prompt_lengths: list[int]
    keys: list[str]

    def to(self, device) -> "VLMInputs":
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.model_inputs.items()}
        return VLMInputs(moved, self.labels_mask.to(device), self.prompt_lengths, self.keys)


# -- the adapter -----------------------------------------------------------------------------------------------
@dataclass
class VLMAdapter:
    """A VLM (policy), its processor and its reference.

    Attributes:
        model: the policy (`PeftModel` when LoRA is on).
        processor: the model's processor (tokenizer + image processor + chat template).
        family: "llava" or "qwen2_vl" (module names, image-token accounting).
        max_length: response tokens kept per sample (None = all); the prompt is never cut.
        max_prompt_length: prompts longer than this raise `PromptTooLongError` (None = no limit).
        reference: "lora" (adapters disabled), "copy" (frozen `ref_model`), "precomputed" (cached log-probs),
            "none" (no reference: SFT).
    """

    model: torch.nn.Module
    processor: Any
    family: str
    pretrained: str
    revision: Optional[str] = None
    max_length: Optional[int] = None
    max_prompt_length: Optional[int] = None
    reference: ReferenceMode = "none"
    ref_model: Optional[torch.nn.Module] = None
    _response_sep: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 response tokens or None, got {self.max_length}")
        self._response_sep = self._find_response_separator()

    # -- tokenisation ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self._config().image_token_id)

    def _config(self):
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.config

    def _find_response_separator(self) -> str:
        """The text the chat template puts between the generation prompt and the answer (" " for LLaVA-1.5's
        "ASSISTANT: answer", "" for ChatML), so a response tokenised on its own matches the template."""
        user = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        gen = self.processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = self.processor.apply_chat_template(
            user + [{"role": "assistant", "content": [{"type": "text", "text": "\x00"}]}], tokenize=False)
        if full.startswith(gen) and "\x00" in full:
            return full[len(gen): full.index("\x00")]
        return ""

    def prompt_text(self, turns: list[dict]) -> str:
        return self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)

    def response_ids(self, response: str, eos: bool = True, cut: bool = True) -> list[int]:
        """Token ids of an answer as the chat template continues the generation prompt (plus end-of-turn with
        `eos`); `cut` applies `max_length`, which scoring does and an answer start given to `generate` must not."""
        ids = self.tokenizer(self._response_sep + response, add_special_tokens=False)["input_ids"]
        if eos:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids if self.max_length is None or not cut else ids[: self.max_length]

    def _tokens_per_image(self, outputs: dict, n_images: int) -> list[int] | None:
        """Image tokens each image needs, from the processor outputs; None when the family's count is not
        closed-form (LLaVA-NeXT any-resolution tiling: the model's own check then applies)."""
        cfg = self._config()
        if self.family == "qwen2_vl":
            merge = cfg.vision_config.spatial_merge_size
            return [int(g.prod()) // merge**2 for g in outputs["image_grid_thw"]]
        if cfg.model_type == "llava":
            v = cfg.vision_config
            n = (v.image_size // v.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
            return [n] * n_images
        return None

    def prompt_too_long(self, prompts: Sequence, images: Sequence[Sequence[Any]],
                        keys: Sequence[str]) -> str | None:
        """The `PromptTooLongError` message for the first prompt over `max_prompt_length` (images included), or
        None; processes the prompts without running the model (None at once when there is no limit)."""
        if self.max_prompt_length is None:
            return None
        try:
            self._process_prompts(prompts, images, keys)
        except PromptTooLongError as err:
            return str(err)
        return None

    def _process_prompts(self, prompts: Sequence, images: Sequence[Sequence[Any]], keys: Sequence[str]):
        """Per sample: prompt token rows (no padding) and the per-image processor outputs."""
        turns = [normalize_turns(p, len(ims), k) for p, ims, k in zip(prompts, images, keys)]
        texts = [self.prompt_text(t) for t in turns]
        placeholder = getattr(self.processor, "image_token", None)
        for text, ims, key in zip(texts, images, keys):
            if placeholder and text.count(placeholder) != len(ims):
                raise ImageTokenMismatchError(
                    f"sample {key}: the prompt holds {text.count(placeholder)} image placeholder(s) "
                    f"{placeholder!r} for {len(ims)} image(s); the prompt text must not contain the image token "
                    "itself (image parts are added from the images)")
        flat = [im for ims in images for im in ims]
        self.tokenizer.padding_side = "left"
        enc = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        rows = []
        for i, key in enumerate(keys):
            keep = enc["attention_mask"][i].bool()
            row = {k: enc[k][i][keep] for k in _SEQUENCE_KEYS if k in enc}
            if self.max_prompt_length is not None and len(row["input_ids"]) > self.max_prompt_length:
                raise PromptTooLongError(f"sample {key}: the prompt has {len(row['input_ids'])} tokens (images "
                                         f"included), more than max_prompt_length={self.max_prompt_length}; "
                                         "prompts are never truncated (image tokens would no longer match the "
                                         "image features): raise max_prompt_length or drop the sample")
            rows.append(row)
        per_image = {k: v for k, v in enc.items() if k not in _SEQUENCE_KEYS}
        self._check_image_tokens(rows, per_image, [len(ims) for ims in images], keys)
        return rows, per_image

    def _check_image_tokens(self, rows: list[dict], per_image: dict, n_images: list[int], keys) -> None:
        needed = self._tokens_per_image(per_image, sum(n_images))
        found = [int((r["input_ids"] == self.image_token_id).sum()) for r in rows]
        if needed is None:
            return
        start = 0
        for key, n, f in zip(keys, n_images, found):
            want = sum(needed[start: start + n])
            start += n
            if f != want:
                raise ImageTokenMismatchError(
                    f"sample {key}: {f} image tokens in the prompt but its {n} image(s) give {want} image "
                    f"features; the prompt text must not contain the image token "
                    f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r} itself, and prompts are "
                    "never truncated")

    def _pad(self, rows: list[dict], side: Literal["left", "right"]) -> dict[str, Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = {}
        for k in rows[0]:
            fill = pad_id if k == "input_ids" else 0
            t = torch.full((len(rows), length), fill, dtype=rows[0][k].dtype)
            for i, r in enumerate(rows):
                n = len(r[k])
                if side == "right":
                    t[i, :n] = r[k]
                else:
                    t[i, length - n:] = r[k]
            out[k] = t
        return out

    def encode(self, prompts: Sequence, images: Sequence[Sequence[Any]], responses: Sequence[str],
               keys: Sequence[str] | None = None) -> VLMInputs:
        """Tokenise (prompt, images, response) triples into one right-padded batch for scoring.

        prompts: chat turns (or a string) per sample; images: a list of PIL images per sample; responses: the
        answer text (an end-of-turn token is appended, then the response is cut to `max_length` tokens).
        """
        n = len(prompts)
        if not (len(images) == len(responses) == n):
            raise ValueError(f"encode: {n} prompts, {len(images)} image lists and {len(responses)} responses; "
                             "give one of each per sample")
        keys = list(keys) if keys is not None else [str(i) for i in range(n)]
        rows, per_image = self._process_prompts(prompts, images, keys)
        prompt_lengths = []
        for row, response in zip(rows, responses):
            resp = torch.tensor(self.response_ids(response), dtype=row["input_ids"].dtype)
            prompt_lengths.append(len(row["input_ids"]))
            for k in list(row):
                extra = resp if k == "input_ids" else (torch.ones_like(resp) if k == "attention_mask"
                                                       else torch.zeros_like(resp))
                row[k] = torch.cat([row[k], extra.to(row[k].dtype)])
        batch = self._pad(rows, "right")
        labels_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for i, (row, p) in enumerate(zip(rows, prompt_lengths)):
            labels_mask[i, p: len(row["input_ids"])] = True
        return VLMInputs({**batch, **per_image}, labels_mask, prompt_lengths, keys)

    # -- scoring -----------------------------------------------------------------------------------------------
    def logps(self, model: torch.nn.Module, inputs: VLMInputs) -> ResponseLogps:
        """Response log-probs of `inputs` under `model` (the policy, or a reference).

        Only the positions from the shortest prompt's last token on are projected to the vocabulary
        (`logits_to_keep`): the image and prompt positions before it predict no scored token, and (B, L, V)
        logits over every image token are a large share of a step's memory (and 19% of a toy forward + backward).
        """
        ids = inputs.model_inputs["input_ids"]
        start = max(min(inputs.prompt_lengths) - 1, 0)
        logits = model(**inputs.model_inputs, use_cache=False, logits_to_keep=ids.shape[1] - start).logits
        return response_logps(logits, ids[:, start:], inputs.labels_mask[:, start:])

    def policy_logps(self, inputs: VLMInputs) -> ResponseLogps:
        return self.logps(self.model, inputs)

    @torch.no_grad()
    def reference_logps(self, inputs: VLMInputs) -> ResponseLogps:
        """Reference log-probs: the policy with LoRA disabled, or the frozen copy. Precomputed references come
        from the batch cache (`surrogates`), not from here."""
        if self.reference == "lora":
            if not hasattr(self.model, "disable_adapter"):
                raise ValueError("reference='lora' needs a peft model (apply_lora first); use reference='copy' "
                                 "for full fine-tunes")
            with adapters_disabled(self.model) as model:
                return self.logps(model, inputs)
        if self.reference == "copy":
            if self.ref_model is None:
                raise ValueError("reference='copy' but no ref_model; call make_reference_copy()")
            # the policy's mode (as the lora reference, which is the policy itself): equal at step 0 even with
            # dropout in the model
            self.ref_model.train(self.model.training)
            return self.logps(self.ref_model, inputs)
        raise ValueError(f"reference={self.reference!r} computes no reference log-probs here ('precomputed' reads "
                         "them from the shards' cache; 'none' has none)")

    def make_reference_copy(self) -> None:
        """Freeze a deep copy of the current policy as the reference (`reference='copy'`)."""
        self.ref_model, self.reference = frozen_copy(self.model), "copy"

    # -- the adapter contract ----------------------------------------------------------------------------------
    def surrogates(self, policy: torch.nn.Module, batch: dict, generator: torch.Generator | None = None,
                   with_reference: bool = True, unwrapped: torch.nn.Module | None = None, *,
                   rejected_images: bool = False, extra_rejected: Sequence[str] | None = None,
                   chosen_only: bool = False) -> Surrogates:
        """A `collate_vlm_pairs` batch -> `Surrogates` (K, B) of kind "logp": rows chosen, rejected, then (with
        `rejected_images`) the chosen answer under the sample's rejected image, then (with `extra_rejected`, one
        answer per sample, e.g. regenerated online) those answers under the clean image. `chosen_only`: the
        chosen row alone (K = 1, for SFT). `policy` may be wrapped (DDP); the reference runs on the adapter's own
        model. Deterministic: `generator` is unused."""
        if chosen_only:
            prompts, images, responses = batch["prompts"], batch["images"], batch["chosen"]
            keys = list(batch["keys"])
        else:
            prompts, images, responses, keys = pair_rows(batch, rejected_images)
        if extra_rejected is not None:
            prompts, images = prompts + batch["prompts"], images + batch["images"]
            responses = responses + list(extra_rejected)
            keys = keys + [f"{k}:extra_rejected" for k in batch["keys"]]
        n = len(batch["keys"])
        device = next(self.model.parameters()).device
        inputs = self.encode(prompts, images, responses, keys).to(device)
        lp = self.logps(policy, inputs)
        k = len(keys) // n
        ref = None
        if with_reference and not chosen_only:
            if self.reference == "precomputed":
                if extra_rejected is not None:
                    raise ValueError("answers generated during training cannot have precomputed reference "
                                     "log-probs; use model.reference lora or copy")
                ref = torch.stack([r.sum for r in cached_reference(batch, rejected_images)]).to(device)
            else:
                ref = self.reference_logps(inputs).sum.view(k, n)
        return Surrogates(lp.sum.view(k, n), ref, "logp", counts=lp.count.view(k, n))

    def producer(self) -> dict[str, Any]:
        """What reference log-probs depend on besides the sample: model, revision and processor settings."""
        ip = self.processor.image_processor.to_dict()
        tok = self.tokenizer.backend_tokenizer.to_str() if hasattr(self.tokenizer, "backend_tokenizer") else ""
        digest = hashlib.sha256(json.dumps(ip, sort_keys=True, default=str).encode()
                                + tok.encode() + (self.processor.chat_template or "").encode()).hexdigest()[:16]
        return {"kind": "vlm_reference_logps", "model": self.pretrained, "revision": self.revision,
                "processor": digest, "max_length": self.max_length, "family": self.family}

    # -- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence, images: Sequence[Sequence[Any]], *, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 prefixes: Sequence[str] | None = None, image_keep_prob: float = 1.0,
                 mask_seeds: Sequence[int] | None = None, seed: int | None = None,
                 model: torch.nn.Module | None = None) -> list[str]:
        """Answers to a batch of prompts in one left-padded `generate` call with the KV cache.

        prefixes: per sample, the start of the answer to continue (returned answers exclude it).
        image_keep_prob: each image token stays visible to attention with this probability (1 = all; 0 = blind);
            masks are drawn per sample from `mask_seeds` (same seed = same mask) and positions are kept, so the
            text sees the image's positions but not its content.
        seed: seeds sampling (do_sample=True).
        """
        model = self.model if model is None else model
        keys = [str(i) for i in range(len(prompts))]
        rows, per_image = self._process_prompts(prompts, images, keys)
        if prefixes is not None:
            for row, prefix in zip(rows, prefixes):
                if prefix:
                    # Never cut: a BDHS context (true sentences + a prefix) can be longer than max_length.
                    ids = torch.tensor(self.response_ids(prefix, eos=False, cut=False), dtype=row["input_ids"].dtype)
                    for k in list(row):
                        extra = ids if k == "input_ids" else (torch.ones_like(ids) if k == "attention_mask"
                                                              else torch.zeros_like(ids))
                        row[k] = torch.cat([row[k], extra.to(row[k].dtype)])
        batch = self._pad(rows, "left")
        device = next(model.parameters()).device
        kwargs: dict[str, Any] = {k: v.to(device) for k, v in {**batch, **per_image}.items()}
        if image_keep_prob < 1.0:
            seeds = list(mask_seeds) if mask_seeds is not None else list(range(len(rows)))
            kwargs["position_ids"] = self._positions(model, kwargs)
            kwargs["attention_mask"] = image_token_mask(kwargs["input_ids"], kwargs["attention_mask"],
                                                        self.image_token_id, image_keep_prob, seeds)
        if seed is not None:
            torch.manual_seed(seed)
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=self.tokenizer.eos_token_id)
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(**kwargs, **gen_kwargs)
        finally:
            model.train(was_training)
        new = out[:, kwargs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        if prefixes is None:
            return [t[len(self._response_sep):] if t.startswith(self._response_sep) else t for t in texts]
        return texts

    def _positions(self, model, kwargs: dict[str, Tensor]) -> Tensor:
        """Position ids from the padding mask alone (what the model would compute), so that hiding image tokens
        from attention does not shift the positions of the text after them."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_kwargs = {k: v for k, v in kwargs.items() if k != "input_ids"}
        return base._prepare_position_ids_for_generation(kwargs["input_ids"], model_kwargs)


def image_token_mask(input_ids: Tensor, attention_mask: Tensor, image_token_id: int, keep_prob: float,
                     seeds: Sequence[int]) -> Tensor:
    """The attention mask with each image token of row i kept with probability `keep_prob` (row i's draws come
    from `torch.Generator().manual_seed(seeds[i])`); every other position is unchanged. keep_prob 0 hides every
    image token (a blind model)."""
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob} (BDHS: keep_prob = 1 - rho)")
    if len(seeds) != input_ids.shape[0]:
        raise ValueError(f"one mask seed per row: {len(seeds)} seeds for {input_ids.shape[0]} rows")
    mask = attention_mask.clone()
    for i, s in enumerate(seeds):
        where = (input_ids[i] == image_token_id).nonzero().squeeze(-1)
        g = torch.Generator().manual_seed(int(s))
        keep = torch.rand(len(where), generator=g) < keep_prob
        mask[i, where] = mask[i, where] * keep.to(mask.dtype).to(mask.device)
    return mask


# -- building --------------------------------------------------------------------------------------------------
def _module(model: torch.nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def set_trainable(model: torch.nn.Module, family: str, *, vision: bool = False, projector: bool = True,
                  llm: bool = True) -> dict[str, int]:
    """Freeze / unfreeze the vision tower, the projector and the language model (with its head).

    Defaults follow LLaVA-style preference tuning: vision tower frozen, projector and LLM trained. Returns the
    number of trainable parameters per group.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}
    for group, flag in (("vision", vision), ("projector", projector), ("llm", llm)):
        n = 0
        for path in _GROUPS[family][group]:
            mod = _module(model, path)
            if mod is None:
                continue
            params = [mod] if isinstance(mod, torch.nn.Parameter) else list(mod.parameters())
            for p in params:
                p.requires_grad_(flag)
                n += p.numel() if flag else 0
        counts[group] = n
    return counts


def apply_lora(model: torch.nn.Module, family: str, *, rank: int = 128, alpha: float = 256.0,
               dropout: float = 0.05, target_modules: Sequence[str] = LLM_LORA_TARGETS,
               train_projector: bool = True):
    """Wrap `model` in peft LoRA on the language model's linear layers only (the vision tower stays frozen).

    With `train_projector`, the projector is fully trained as a peft `modules_to_save` copy, so disabling the
    adapters (the reference) also restores the original projector.
    """
    from peft import LoraConfig, get_peft_model

    pattern = r"^model\.language_model\..*\.(" + "|".join(re.escape(t) for t in target_modules) + r")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern,
                        modules_to_save=_PROJECTOR_NAMES[family] if train_projector else None)
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, config)


def load_vlm(pretrained: str, *, revision: str | None = None, dtype: str | torch.dtype = "float32",
             max_length: int | None = None, max_prompt_length: int | None = None,
             reference: ReferenceMode = "none", lora: dict | None = None, train_vision: bool = False,
             train_projector: bool = True, train_llm: bool = True, attn_implementation: str = "sdpa",
             device: str | torch.device = "cpu") -> VLMAdapter:
    """Load a VLM and its processor with `from_pretrained` (local folder or hub id) and set what is trained.

    lora: None = full fine-tune of the enabled groups; a dict of `apply_lora` options (rank, alpha, dropout,
        target_modules) = LoRA on the LLM (+ projector copy when `train_projector`).
    reference: "lora" needs `lora`; "copy" makes a frozen copy of the loaded weights; "precomputed" and "none"
        keep no reference in memory.
    """
    from transformers import AutoModelForImageTextToText

    cfg = read_model_config(pretrained, revision)
    family = family_of(cfg.get("model_type", "?"))
    if reference == "lora" and lora is None:
        raise ValueError("reference='lora' needs lora options (model.lora); with a full fine-tune use "
                         "reference='copy' or 'precomputed'")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        model = AutoModelForImageTextToText.from_pretrained(pretrained, revision=revision, dtype=torch_dtype,
                                                            attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{pretrained}: could not load the model: {err}") from err
    processor = load_processor(pretrained, family, revision)
    model.to(device)
    adapter = VLMAdapter(model, processor, family, pretrained, revision, max_length, max_prompt_length)
    if reference == "copy":
        adapter.make_reference_copy()
    if lora is not None:
        adapter.model = apply_lora(model, family, train_projector=train_projector, **lora)
        if train_vision:
            raise ValueError("train_vision with LoRA is not supported: LoRA adapts the language model only")
    else:
        set_trainable(model, family, vision=train_vision, projector=train_projector, llm=train_llm)
    adapter.reference = reference
    return adapter
