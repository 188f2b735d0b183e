"""The VLM training task (`task: vlm`): preference (DPO family) or SFT training of a LLaVA-/Qwen2-VL-style model
on `vlm_pair` shards, driven by the one training loop (`mmalign.train.trainer`).

The task is thin: `build` loads the model through `mmalign.vlm.adapter.load_vlm` (LoRA or full fine-tune, vision
tower frozen by default, reference by disabled LoRA / frozen copy / precomputed log-probs), `batches` reads the
shards with `VLMPairDataset`, `compute_loss` is `vlm_preference_loss` (below), and `save_final` writes
the model (full fine-tune: `model/` with its processor, loadable with `from_pretrained`; LoRA: `lora/`, a peft
adapter for `PeftModel.from_pretrained(base, folder)`, plus the processor).

    mmalign train configs/vlm/toy_stic_dpo.yaml data.shards=runs/stic_pairs

The objective (`vlm_preference_loss`):

Per pair (prompt x with images I, chosen y_w, rejected y_l), the adapter gives response log-likelihoods under the
policy and the reference; the loss is `mmalign.losses.dpo_loss` on them (every `loss_type` of the core), plus:

- `sft_weight`: `+ sft_weight · NLL(y_w)`, the chosen answer's negative log-likelihood under the policy, as a
  summed (`sft_reduction="sum"`, the scale of the DPO surrogate) or per-token mean (`"mean"`, the scale of an SFT
  loss) log-probability, averaged over the batch. TOY-NOTES: this term is what kept pure DPO from collapsing the
  caption format;
- `rejected_images` (mDPO-style conditional preference): a second pair per sample, the chosen answer under the clean
  image preferred to the same answer under the sample's `rejected.<i>` image(s), weighted by
  `rejected_images_weight`;
- `online_weight` (BDHS online mode): rejected answers regenerated from the current policy with the image mostly
  hidden (`mmalign.vlm.bdhs.bdhs_rejected`), mixed as `(1 - w) · offline + w · online`.

`surrogate` is `auto` by default: the loss type's own (per-token mean log-probs for `ipo`, sums for the others);
`"mean"` uses per-token means with any type (length-normalised variants); `"sum"` with `ipo` is refused. `name="sft"` is the
SFT-only control: the chosen answers' NLL alone (no reference, no rejected answers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from pydantic import Field, model_validator

from mmalign.config import StrictModel
from mmalign.losses import DPO_LOSS_TYPES
from mmalign.methods import METHODS, check_method, preference_loss, sequence_surrogate
from mmalign.models.reference import ReferenceChoice, resolve_reference
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, SkipBatch, Task
from mmalign.train.trainer import DataError
from mmalign.vlm.adapter import LLM_LORA_TARGETS, PromptTooLongError, VLMAdapter, load_vlm
from mmalign.vlm.reference_cache import REF_CACHE_NAME, precompute_reference_logps, reference_cache_producer


class VLMMethodConfig(StrictModel):
    name: Literal["dpo", "sft"] = Field("dpo", description="dpo = DPO family on response log-probs (+ optional "
                                                           "SFT term); sft = the chosen answers' NLL only (the "
                                                           "SFT-only control).")
    beta: float = Field(0.1, gt=0, description="KL strength; 0.1 is the published setting for STIC and BDHS "
                                               "(summed response log-probs).")
    loss_type: str = Field("sigmoid", description=f"DPO variant (TRL's names), one of {', '.join(DPO_LOSS_TYPES)}.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Only for loss types sigmoid and robust.")
    surrogate: Literal["auto", "sum", "mean"] = Field(
        "auto", description="Response log-likelihood the DPO loss compares: auto = the loss type's own (per-token "
                            "mean for ipo, sum over tokens for the others; mmalign.methods.sequence_surrogate); "
                            "mean = per-token mean with any type (length-normalised); sum with ipo is refused.")
    sft_weight: float = Field(0.0, ge=0.0, description="Weight of the chosen answers' NLL added to the DPO loss; "
                                                       "0 = pure DPO.")
    sft_reduction: Literal["sum", "mean"] = Field("mean", description="NLL of the SFT term per sample: summed "
                                                                      "over response tokens or their mean.")
    rejected_images: bool = Field(False, description="mDPO-style: also prefer the chosen answer under the clean "
                                                     "image to it under the sample's rejected images.")
    rejected_images_weight: float = Field(1.0, ge=0.0)
    online_weight: float = Field(0.0, ge=0.0, le=1.0, description="BDHS online mode: share of the loss from "
                                                                  "pairs whose rejected answers the current "
                                                                  "policy regenerates each step (0 = offline).")
    online_rho: float = Field(0.99, ge=0.0, le=1.0, description="Online BDHS: share of image tokens hidden.")
    online_max_new_tokens: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "VLMMethodConfig":
        check_method(self.name, "logp", self.loss_type, self.label_smoothing, where="method")
        sequence_surrogate(self.loss_type, self.surrogate)
        if self.name == "sft" and (self.rejected_images or self.online_weight):
            raise ValueError("method.name 'sft' uses the chosen answers only; rejected_images and online_weight "
                             "need 'dpo'")
        return self


def _online_rejected(adapter, batch: dict, method: VLMMethodConfig, generator: torch.Generator) -> list[str]:
    from mmalign.vlm.bdhs import BDHSConfig, bdhs_rejected
    from mmalign.selfgen.embed import load_embedder

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    rows = [{"key": k, "images": ims, "prompt": p, "chosen": c}
            for k, ims, p, c in zip(batch["keys"], batch["images"], batch["prompts"], batch["chosen"])]
    cfg = BDHSConfig(rho=method.online_rho, max_new_tokens=method.online_max_new_tokens, seed=seed,
                     batch_size=len(rows))
    results = bdhs_rejected(adapter, rows, cfg, load_embedder("vlm", adapter))
    # An empty answer cannot be scored as a response; fall back to the offline rejected answer for that row.
    return [r["rejected"] or off for r, off in zip(results, batch["rejected"])]


def vlm_preference_loss(adapter, batch: dict[str, Any], method: VLMMethodConfig, policy=None,
                        generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One `collate_vlm_pairs` batch -> (loss, metrics): the adapter's surrogates through the method table.
    `policy` is the module to run forward through (a DDP-wrapped policy in the trainer; default `adapter.model`);
    `generator` seeds online generation.

    Metrics (TRL names): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected, plus sft/nll, tokens/chosen, tokens/rejected; `image/...` for the rejected-image pair and
    `online/...` for online pairs.
    """
    policy = adapter.model if policy is None else policy
    if method.name == "sft":
        s = adapter.surrogates(policy, batch, with_reference=False, chosen_only=True)
        nll, _ = preference_loss("sft", s.per_token() if method.sft_reduction == "mean" else s, beta=1.0)
        return nll, {"sft/nll": nll.detach(), "logps/chosen": s.policy[0].mean().detach(),
                     "tokens/chosen": s.counts[0].float().mean()}

    online = method.online_weight > 0
    extra = None
    if online:
        extra = _online_rejected(adapter, batch, method, generator or torch.Generator().manual_seed(0))
    s = adapter.surrogates(policy, batch, with_reference=True, rejected_images=method.rejected_images,
                           extra_rejected=extra)
    scored = s.per_token() if sequence_surrogate(method.loss_type, method.surrogate) == "mean" else s

    def pair(w: int, l: int):
        return preference_loss("dpo", scored.rows(w, l), beta=method.beta, loss_type=method.loss_type,
                               label_smoothing=method.label_smoothing)

    loss, metrics = pair(0, 1)
    metrics = dict(metrics)
    if method.rejected_images:
        loss_img, m_img = pair(0, 2)
        loss = loss + method.rejected_images_weight * loss_img
        metrics.update({f"image/{k}": v for k, v in m_img.items() if k.startswith("rewards/")})
    if online:
        j = 3 if method.rejected_images else 2
        loss_on, m_on = pair(0, j)
        loss = (1 - method.online_weight) * loss + method.online_weight * loss_on
        metrics.update({f"online/{k}": v for k, v in m_on.items() if k.startswith("rewards/")})
    nll_source = s.per_token() if method.sft_reduction == "mean" else s
    nll = -nll_source.policy[0].mean()
    if method.sft_weight > 0:
        loss = loss + method.sft_weight * nll
    metrics["sft/nll"] = nll.detach()
    metrics["tokens/chosen"] = s.counts[0].float().mean()
    metrics["tokens/rejected"] = s.counts[1].float().mean()
    return loss, metrics



class VLMLoraConfig(StrictModel):
    rank: int = Field(128, ge=1, description="LoRA rank r (STIC / BDHS published setting: 128).")
    alpha: float = Field(256.0, gt=0, description="LoRA alpha (published: 256, scale 2).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLM_LORA_TARGETS),
        description="Linear layers of the language model to adapt (the vision tower is never adapted).")


class VLMModelConfig(StrictModel):
    pretrained: str = Field(..., description="Model folder or hub id (LLaVA-1.5/1.6-style or Qwen2-VL-style).")
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype; float32 on "
                                                                                  "CPU (the safe default).")
    lora: Optional[VLMLoraConfig] = Field(None, description="null = full fine-tune of the trainable groups; set = "
                                                            "LoRA on the language model.")
    reference: ReferenceChoice = Field(
        "auto", description="auto = lora with LoRA (adapters disabled, no second copy), else copy (a frozen copy "
                            "in memory); precomputed = read reference log-probs from the shards' cache "
                            "(`mmalign.vlm.reference_cache`; built by --cache-only). SFT uses none.")
    train_vision: bool = Field(False, description="Train the vision tower (frozen by default).")
    train_projector: bool = Field(True, description="Train the projector (with LoRA: as a full trainable copy).")
    train_llm: bool = Field(True, description="Train the language model (full fine-tune only; with LoRA the LLM "
                                              "trains through its adapters).")
    max_length: Optional[int] = Field(None, gt=0, description="Response tokens kept per answer; null = all. The "
                                                              "prompt (with its image tokens) is never cut.")
    max_prompt_length: Optional[int] = Field(None, gt=0, description="Longer prompts are skipped and counted "
                                                                     "(strict: an error); null = no limit.")
    gradient_checkpointing: bool = False


class VLMDataConfig(StrictModel):
    shards: str = Field(..., description="vlm_pair shard folder (with manifest.json).")
    shuffle_buffer: int = Field(1000, ge=0, description="0 = stored order.")
    num_workers: int = Field(0, ge=0)
    strict: bool = Field(False, description="Raise on a corrupt sample or an over-long prompt instead of "
                                            "skipping and counting it.")


class VLMTrainConfig(BaseTrainConfig):
    """VLM preference training: DPO family with an optional SFT term, mDPO-style rejected images, online BDHS."""

    task: Literal["vlm"] = "vlm"
    model: VLMModelConfig
    method: VLMMethodConfig = Field(default_factory=VLMMethodConfig)
    data: VLMDataConfig

    @model_validator(mode="after")
    def _check(self) -> "VLMTrainConfig":
        self.reference_mode()  # a reference the method or the model cannot use fails here
        if self.model.reference == "precomputed" and self.method.online_weight > 0:
            raise ValueError("method.online_weight > 0 scores answers generated during training; it needs a live "
                             "reference (model.reference lora or copy)")
        return self

    def reference_mode(self) -> str:
        """The reference this run uses: lora, copy, precomputed or none (`resolve_reference`)."""
        return resolve_reference(self.model.reference, lora=self.model.lora is not None,
                                 needs_reference=METHODS[self.method.name].needs_reference)


class VLMTask(Task):
    config_class = VLMTrainConfig
    progress_metrics = ("rewards/accuracies",)

    def check_inputs(self) -> None:
        from mmalign.data.manifest import load_manifest

        manifest = load_manifest(self.cfg.data.shards)
        if manifest.schema_name != "vlm_pair":
            raise ValueError(f"data.shards {self.cfg.data.shards}: schema {manifest.schema_name!r}; the vlm task "
                             "reads vlm_pair shards")

    def _load(self, device, reference: str, lora: bool = True) -> VLMAdapter:
        m = self.cfg.model
        return load_vlm(m.pretrained, revision=m.revision, dtype=m.dtype, max_length=m.max_length,
                        max_prompt_length=m.max_prompt_length, reference=reference,
                        lora=m.lora.model_dump() if m.lora is not None and lora else None, train_vision=m.train_vision,
                        train_projector=m.train_projector, train_llm=m.train_llm, device=device)

    def build(self, device) -> Built:
        self.adapter = self._load(device, self.cfg.reference_mode())
        model = self.adapter.model
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        return Built(module=model, params=[p for p in model.parameters() if p.requires_grad], model=self.adapter)

    def _producer(self):
        return {REF_CACHE_NAME: reference_cache_producer(self.adapter, self.cfg.method.rejected_images)}

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.data.collate import collate_vlm_pairs
        from mmalign.data.dataset import VLMPairDataset
        from mmalign.train.data import endless_batches

        d = self.cfg.data
        caches = self._producer() if self.adapter.reference == "precomputed" else None
        dataset = VLMPairDataset(d.shards, shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1),
                                 seed=self.cfg.run.seed, rank=rank, world_size=world_size, strict=d.strict,
                                 caches=caches)
        yield from endless_batches(dataset, collate_vlm_pairs, self.cfg.train.batch_size, skip=skip,
                                   num_workers=d.num_workers, what=f"data.shards {d.shards}")

    def skip_reason(self, batch: dict) -> tuple[str, str] | None:
        """A micro-batch with a prompt over `model.max_prompt_length` (with its clean or, with rejected images,
        its rejected images) is skipped on every process and counted (`skipped/prompt_too_long`); strict: an
        error."""
        a = self.adapter
        problem = a.prompt_too_long(batch["prompts"], batch["images"], batch["keys"])
        if problem is None and self.cfg.method.rejected_images and "rejected_images" in batch:
            problem = a.prompt_too_long(batch["prompts"], batch["rejected_images"], batch["keys"])
        if problem is None:
            return None
        if self.cfg.data.strict:  # one clear error (the CLI prints it and exits 2), not a traceback
            raise DataError(f"data.strict: {problem}")
        return "prompt_too_long", problem

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch: dict, generator) -> tuple[torch.Tensor, dict]:
        """`model` is the `VLMAdapter`; `module` the (possibly wrapped) policy to run forward through. Over-long
        prompts are found before this by `skip_reason`; one met here (a caller without the loop) raises
        `SkipBatch` before any forward, or in strict mode an error."""
        try:
            return vlm_preference_loss(model, batch, cfg.method, policy=module, generator=generator)
        except PromptTooLongError as err:
            if cfg.data.strict:  # one clear error (the CLI prints it and exits 2), not a traceback
                raise DataError(f"data.strict: {err}") from err
            raise SkipBatch("prompt_too_long", str(err)) from err

    def save_final(self, unwrapped, run_dir: Path) -> dict[str, str]:
        from mmalign.train.checkpoint import atomic_dir

        processor = self.adapter.processor
        # A peft model saves its adapter only (PeftModel.from_pretrained(base, lora/)); a full model saves itself.
        name = "lora" if self.cfg.model.lora is not None else "model"

        def write(d: Path) -> None:
            unwrapped.save_pretrained(str(d))
            processor.save_pretrained(str(d))

        atomic_dir(run_dir / name, write)
        return {name: str(run_dir / name)}

    def build_cache(self) -> Path:
        """`--cache-only`: precompute the reference log-probs into the shards' cache (reference 'precomputed')."""
        if self.cfg.model.reference != "precomputed":
            raise ValueError("--cache-only builds the reference log-prob cache; set model.reference=precomputed")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # The reference is the loaded weights themselves (before any LoRA): score with them, no second copy. Every
        # pair is scored, over-long prompts too (training skips them; max_prompt_length is not in the cache key).
        self.adapter = self._load(device, "none", lora=False)
        self.adapter.max_prompt_length = None
        self.adapter.ref_model, self.adapter.reference = self.adapter.model.eval(), "copy"
        return precompute_reference_logps(self.adapter, self.cfg.data.shards,
                                          batch_size=self.cfg.train.batch_size,
                                          rejected_images=self.cfg.method.rejected_images)
