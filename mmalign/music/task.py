"""The music training task (`task: music`): preference (DPO family), SFT or RWR training of a MusicGen-class model on
`music_pair` shards, driven by the one training loop (`mmalign.train.trainer`).

The task is thin: `build` loads the model through `mmalign.music.adapter.load_music` (LoRA on the decoder blocks or
a full fine-tune of the decoder; the T5 text encoder and EnCodec stay frozen; reference by disabled LoRA / frozen
copy / precomputed log-probs), `batches` reads the shards with `CheckedMusicPairDataset` (a pair whose codes the
model cannot score is skipped and counted, or with `data.strict` is an error naming its shard and key),
`compute_loss` is `music_preference_loss` (below), and `save_final` writes the model (LoRA: `lora/`, a peft adapter
for `PeftModel.from_pretrained(base, folder)`, with the tokenizer; full fine-tune: `model/`, loadable with
`from_pretrained`).

    mmalign train configs/tiny/music_dpo.yaml

The objective (`music_preference_loss`): per pair (prompt x, chosen codes c_w, rejected codes c_l), the adapter gives
the codes' log-likelihoods under the policy and the reference (summed over codebooks and frames, the delay pattern
as generation applies it); the loss is `mmalign.losses.dpo_loss` on them through the method table, with every
`loss_type` of the core. `surrogate` is `auto` by default: the loss type's own (per-token mean log-probs for `ipo`,
sums for the others); `mean` uses per-token means with any type (length-normalised variants); `sum` with `ipo` is
refused. `sft_weight` adds the chosen codes' NLL (`sft_reduction`: summed or per-token mean). `name: sft` is the
SFT-only control: the chosen codes' NLL alone (no reference, no rejected codes).

`name: rwr` is reward-weighted regression (the method table's `rwr`): both sides of every pair are items, each with
its stored reward R, and the loss is `mean(w · NLL)` with `w = 2B · softmax(R / temperature)` over the 2B items of
the micro-batch (`mmalign.losses.rwr_loss`; NLL per `sft_reduction`); no reference. R is read from each sample's
json (`stored_rewards`): by default the field `reward` {"chosen": R, "rejected": R} that `mmalign selfgen music`
writes (its weighted sum over the scorers); with `reward_weights` {column: weight}, R = Σ weight · score over the
per-column scores, read from `scores` {"chosen": {...}, "rejected": {...}} (selfgen music) or `scores_chosen` /
`scores_rejected` (the toy world's `write_music_pair_shards`). Shards without them are an error naming the field and
the sample at the first micro-batch, before any forward pass.

`name: rankdpo` reads `music_ranked` lists (N code arrays of one prompt with their scores, `mmalign selfgen music
--ranked`): the adapter scores every item's codes under the policy and the reference, and the loss is
`mmalign.losses.ranked_sequence_dpo_loss` (DPO's sigmoid on every ordered pair of a list, LambdaRank weights by
default, `rank_weighting: uniform` for plain pairwise), ln 2 at policy == reference. `train.batch_size` counts
lists; every list of a batch needs the same N. The precomputed reference caches pair sides and is refused.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from pydantic import Field, model_validator

from mmalign.config import StrictModel
from mmalign.losses import DPO_LOSS_TYPES
from mmalign.methods import METHODS, check_method, preference_loss, sequence_surrogate
from mmalign.models.reference import ReferenceChoice, resolve_reference
from mmalign.music.adapter import MUSIC_LORA_TARGETS, MusicAdapter, load_music
from mmalign.music.codes import CheckedMusicPairDataset, MusicCodesError
from mmalign.music.reference_cache import REF_CACHE_NAME, precompute_reference_logps
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, SkipBatch, Task
from mmalign.train.trainer import DataError


class MusicMethodConfig(StrictModel):
    name: Literal["dpo", "sft", "rwr", "rankdpo"] = Field(
        "dpo", description="dpo = DPO family on the codes' log-probs (+ optional SFT term); sft = the chosen codes' "
                           "NLL only; rwr = both sides' NLL weighted by softmax(reward / temperature); rankdpo = "
                           "RankDPO on music_ranked lists (LambdaRank-weighted DPO over every ordered pair).")
    beta: float = Field(0.1, gt=0, description="KL strength on summed code log-probs (the method table's logp "
                                               "default, TRL's 0.1).")
    loss_type: str = Field("sigmoid", description=f"DPO variant (TRL's names), one of {', '.join(DPO_LOSS_TYPES)}.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Only for loss types sigmoid and robust.")
    surrogate: Literal["auto", "sum", "mean"] = Field(
        "auto", description="Code log-likelihood the DPO loss compares: auto = the loss type's own (per-token mean "
                            "for ipo, sum over codebooks and frames for the others; "
                            "mmalign.methods.sequence_surrogate); mean = per-token mean with any type; sum with ipo "
                            "is refused.")
    sft_weight: float = Field(0.0, ge=0.0, description="Weight of the chosen codes' NLL added to the DPO loss; 0 = "
                                                       "pure DPO.")
    sft_reduction: Literal["sum", "mean"] = Field("mean", description="NLL per sample of the SFT term and of "
                                                                      "methods sft and rwr: summed over the codes "
                                                                      "or their per-token mean.")
    rank_weighting: Literal["lambda", "uniform"] = Field("lambda", description="rankdpo: LambdaRank (DCG) pair "
                                                                                 "weights, or uniform.")
    temperature: float = Field(1.0, gt=0, description="rwr's τ, on the scale of the rewards (small = nearly "
                                                      "best-of-batch, large = SFT on both sides).")
    reward_weights: Optional[dict[str, float]] = Field(
        None, description="rwr: null = each side's stored weighted reward (json `reward`, written by selfgen "
                          "music); {column: weight} = Σ weight · score over the stored per-column scores (json "
                          "`scores` or `scores_chosen` / `scores_rejected`).")

    @model_validator(mode="after")
    def _check(self) -> "MusicMethodConfig":
        check_method(self.name, "logp", self.loss_type, self.label_smoothing, where="method")
        sequence_surrogate(self.loss_type, self.surrogate)
        if self.reward_weights is not None and self.name != "rwr":
            raise ValueError(f"method.reward_weights is read by method 'rwr' only (got method {self.name!r})")
        if self.name == "rankdpo" and (self.loss_type != "sigmoid" or self.sft_weight > 0):
            raise ValueError("method 'rankdpo' is DPO's sigmoid loss over a list's pairs: loss_type sigmoid, "
                             f"sft_weight 0 (got loss_type {self.loss_type!r}, sft_weight {self.sft_weight})")
        if self.reward_weights is not None and not self.reward_weights:
            raise ValueError("method.reward_weights is empty: give {column: weight} or null for the stored reward")
        return self


def stored_rewards(meta: Any, weights: Optional[dict[str, float]] = None) -> tuple[float, float]:
    """(chosen, rejected) rewards of one `music_pair` sample from its json `meta`: the field `reward` {"chosen": R,
    "rejected": R} when `weights` is None, else Σ weight · score over the columns of `scores` {side: {column:
    score}} or `scores_chosen` / `scores_rejected` {column: score}. `ValueError` naming the missing field or column
    and what the sample holds."""
    extra = dict(getattr(meta, "model_extra", None) or {})

    def number(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)

    if weights is None:
        reward = extra.get("reward")
        if not isinstance(reward, dict) or not {"chosen", "rejected"} <= set(reward):
            raise ValueError(f"no field `reward` {{\"chosen\": R, \"rejected\": R}} (the weighted reward `mmalign "
                             f"selfgen music` writes); the sample's json holds {sorted(extra) or 'no extra fields'}; "
                             "give method.reward_weights {column: weight} to combine stored per-column scores")
        return number(reward["chosen"], "reward.chosen"), number(reward["rejected"], "reward.rejected")
    out = []
    for side in ("chosen", "rejected"):
        scores, field = (extra["scores"].get(side), f"scores.{side}") if isinstance(extra.get("scores"), dict) \
            else (extra.get(f"scores_{side}"), f"scores_{side}")
        if not isinstance(scores, dict):
            held = sorted(extra) or "no extra fields"
            raise ValueError(f"no per-column scores for the {side} side (field `scores` {{\"{side}\": {{column: "
                             f"score}}}} or `scores_{side}`); the sample's json holds {held}")
        missing = [c for c in weights if c not in scores]
        if missing:
            raise ValueError(f"{field} has no column {missing[0]!r} of method.reward_weights; it holds "
                             f"{sorted(scores)}")
        out.append(sum(w * number(scores[c], f"{field}.{c}") for c, w in weights.items()))
    return out[0], out[1]


class ScoredMusicPairDataset(CheckedMusicPairDataset):
    """`CheckedMusicPairDataset` for method rwr: each sample also holds `rewards` (chosen, rejected) from its json
    (`stored_rewards`), or `reward_problem` (why it has none: a hard error at the batch, not a skipped sample, since
    shards without rewards are a mismatch of data and method, not one bad sample)."""

    def __init__(self, source, *, reward_weights: Optional[dict[str, float]] = None, **kwargs: Any):
        super().__init__(source, **kwargs)
        self.reward_weights = reward_weights

    def _decode(self, raw, lay, meta, epoch):
        out = super()._decode(raw, lay, meta, epoch)
        try:
            out["rewards"], out["reward_problem"] = stored_rewards(meta, self.reward_weights), None
        except ValueError as err:
            out["rewards"], out["reward_problem"] = (math.nan, math.nan), f"sample {raw.get('__key__')!r}: {err}"
        return out


def collate_scored_music_pairs(samples: list[dict[str, Any]], pad_value: int = 0) -> dict[str, Any]:
    """`collate_music_pairs` plus `rewards` (2, B) float64 [chosen; rejected] and `reward_problems` (the
    samples' messages, empty when every sample has its rewards)."""
    from mmalign.data.collate import collate_music_pairs

    batch = collate_music_pairs(samples, pad_value=pad_value)
    batch["rewards"] = torch.tensor([[s["rewards"][0] for s in samples], [s["rewards"][1] for s in samples]],
                                    dtype=torch.float64)
    batch["reward_problems"] = [s["reward_problem"] for s in samples if s["reward_problem"] is not None]
    return batch


def batch_rewards(batch: dict[str, Any], shards: str = "data.shards") -> torch.Tensor:
    """The (2, B) rewards of a `collate_scored_music_pairs` batch; `DataError` naming the first sample without."""
    problems = batch.get("reward_problems")
    if "rewards" not in batch or problems:
        what = problems[0] if problems else "the batch holds no rewards (read it with ScoredMusicPairDataset)"
        raise DataError(f"method rwr: {shards}: {what}")
    return batch["rewards"]


def music_preference_loss(adapter: MusicAdapter, batch: dict[str, Any], method: MusicMethodConfig,
                          policy=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One `collate_music_pairs` batch -> (loss, metrics): the adapter's surrogates through the method table.
    `policy` is the module to run forward through (a DDP-wrapped policy in the trainer; default `adapter.model`).

    Metrics (TRL names): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected, sft/nll, tokens/chosen, tokens/rejected (sft: sft/nll, logps/chosen, tokens/chosen; rwr: the
    table's rwr/weight_max, rwr/ess, rewards/mean, nll/policy, and logps/*, tokens/*).
    """
    policy = adapter.model if policy is None else policy
    if method.name == "rankdpo":
        if "items" not in batch:
            raise DataError("method rankdpo reads music_ranked lists (collate_music_ranked); got a pair batch")
        s = adapter.surrogates(policy, batch, with_reference=True)
        scored = s.per_token() if sequence_surrogate(method.loss_type, method.surrogate) == "mean" else s
        loss, metrics = preference_loss("rankdpo", scored, beta=method.beta, scores=batch["scores"],
                                        rank_weighting=method.rank_weighting)
        return loss, {**metrics, "tokens/mean": s.counts.float().mean()}
    if method.name == "rwr":
        rewards = batch_rewards(batch)  # before any forward
        s = adapter.surrogates(policy, batch, with_reference=False)
        loss, metrics = preference_loss("rwr", s.per_token() if method.sft_reduction == "mean" else s, beta=1.0,
                                        rewards=rewards, temperature=method.temperature)
        return loss, {**metrics, "logps/chosen": s.policy[0].mean().detach(),
                      "logps/rejected": s.policy[1].mean().detach(), "tokens/chosen": s.counts[0].float().mean(),
                      "tokens/rejected": s.counts[1].float().mean()}
    if method.name == "sft":
        s = adapter.surrogates(policy, batch, with_reference=False, chosen_only=True)
        nll, _ = preference_loss("sft", s.per_token() if method.sft_reduction == "mean" else s, beta=1.0)
        return nll, {"sft/nll": nll.detach(), "logps/chosen": s.policy[0].mean().detach(),
                     "tokens/chosen": s.counts[0].float().mean()}
    s = adapter.surrogates(policy, batch, with_reference=True)
    scored = s.per_token() if sequence_surrogate(method.loss_type, method.surrogate) == "mean" else s
    loss, metrics = preference_loss("dpo", scored, beta=method.beta, loss_type=method.loss_type,
                                    label_smoothing=method.label_smoothing)
    metrics = dict(metrics)
    nll = -(s.per_token() if method.sft_reduction == "mean" else s).policy[0].mean()
    if method.sft_weight > 0:
        loss = loss + method.sft_weight * nll
    metrics["sft/nll"] = nll.detach()
    metrics["tokens/chosen"] = s.counts[0].float().mean()
    metrics["tokens/rejected"] = s.counts[1].float().mean()
    return loss, metrics


class MusicLoraConfig(StrictModel):
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: list(MUSIC_LORA_TARGETS),
        description="Linear layers of the decoder blocks to adapt (self- and cross-attention projections, "
                    "feed-forward); the text encoder and EnCodec are never adapted.")


class MusicModelConfig(StrictModel):
    pretrained: str = Field(..., description="MusicGen folder or hub id: MusicgenForConditionalGeneration "
                                             "(facebook/musicgen-*), or MusicgenForCausalLM with text_encoder/.")
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype; float32 on "
                                                                                  "CPU (the safe default).")
    lora: Optional[MusicLoraConfig] = Field(None, description="null = full fine-tune of the decoder; set = LoRA on "
                                                              "the decoder blocks.")
    reference: ReferenceChoice = Field(
        "auto", description="auto = lora with LoRA (adapters disabled, no second copy), else copy (a frozen copy "
                            "in memory); precomputed = read reference log-probs from the shards' cache "
                            "(mmalign.music.reference_cache; built by --cache-only). SFT uses none.")
    max_frames: Optional[int] = Field(None, gt=0, description="Code frames kept per sequence (the first ones; 50 "
                                                              "per second for MusicGen); null = all.")
    disable_dropout: bool = Field(True, description="Set every dropout to 0 (TRL's default for preference "
                                                    "training), so the policy and its reference see one network.")
    gradient_checkpointing: bool = False


class MusicDataConfig(StrictModel):
    shards: str = Field(..., description="music_pair shard folder (with manifest.json): chosen / rejected codes; "
                                         "music_ranked lists for method rankdpo.")
    shuffle_buffer: int = Field(1000, ge=0, description="0 = stored order.")
    num_workers: int = Field(0, ge=0)
    strict: bool = Field(False, description="Raise on a corrupt sample or codes the model cannot score instead "
                                            "of skipping and counting it.")


class MusicTrainConfig(BaseTrainConfig):
    """MusicGen preference training: DPO family with an optional SFT term, or SFT."""

    task: Literal["music"] = "music"
    model: MusicModelConfig
    method: MusicMethodConfig = Field(default_factory=MusicMethodConfig)
    data: MusicDataConfig

    @model_validator(mode="after")
    def _check(self) -> "MusicTrainConfig":
        self.reference_mode()  # a reference the method or the model cannot use fails here
        return self

    def reference_mode(self) -> str:
        """The reference this run uses: lora, copy, precomputed or none (`resolve_reference`)."""
        if self.method.name == "rankdpo" and self.model.reference == "precomputed":
            raise ValueError("model.reference 'precomputed' caches the log-probs of music_pair sides; method "
                             "rankdpo reads music_ranked lists: use model.reference lora (with model.lora) or copy")
        return resolve_reference(self.model.reference, lora=self.model.lora is not None,
                                 needs_reference=METHODS[self.method.name].needs_reference)


class MusicTask(Task):
    config_class = MusicTrainConfig
    progress_metrics = ("rewards/accuracies",)

    def check_inputs(self) -> None:
        from mmalign.data.manifest import load_manifest

        manifest = load_manifest(self.cfg.data.shards)
        want = "music_ranked" if self.cfg.method.name == "rankdpo" else "music_pair"
        if manifest.schema_name != want:
            raise ValueError(f"data.shards {self.cfg.data.shards}: schema {manifest.schema_name!r}; method "
                             f"{self.cfg.method.name!r} of the music task reads {want} shards (rankdpo: "
                             "music_ranked lists, written by `mmalign selfgen music --ranked`; the others: "
                             "music_pair)")

    def _load(self, device, reference: str, lora: bool = True) -> MusicAdapter:
        m = self.cfg.model
        return load_music(m.pretrained, revision=m.revision, dtype=m.dtype, max_frames=m.max_frames,
                          reference=reference, lora=m.lora.model_dump() if m.lora is not None and lora else None,
                          no_dropout=m.disable_dropout, device=device)

    def build(self, device) -> Built:
        self.adapter = self._load(device, self.cfg.reference_mode())
        model = self.adapter.model
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return Built(module=model, params=[p for p in model.parameters() if p.requires_grad], model=self.adapter)

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.data.collate import collate_music_pairs
        from mmalign.train.data import endless_batches

        d, a, m = self.cfg.data, self.adapter, self.cfg.method
        caches = {REF_CACHE_NAME: a.producer()} if a.reference == "precomputed" else None
        common = dict(num_codebooks=a.num_codebooks, vocab_size=a.vocab_size, shuffle=d.shuffle_buffer > 0,
                      shuffle_buffer=max(d.shuffle_buffer, 1), seed=self.cfg.run.seed, rank=rank,
                      world_size=world_size, strict=d.strict, caches=caches)
        if m.name == "rwr":
            dataset = ScoredMusicPairDataset(d.shards, reward_weights=m.reward_weights, **common)
            collate_fn = collate_scored_music_pairs
        elif m.name == "rankdpo":
            from mmalign.data.collate import collate_music_ranked
            from mmalign.music.codes import CheckedMusicRankedDataset

            dataset, collate_fn = CheckedMusicRankedDataset(d.shards, **common), collate_music_ranked
        else:
            dataset, collate_fn = CheckedMusicPairDataset(d.shards, **common), collate_music_pairs
        # padding is masked out of the score; the start token keeps padded rows inside the embeddings
        collate = partial(collate_fn, pad_value=a.start_token_id)
        yield from endless_batches(dataset, collate, self.cfg.train.batch_size, skip=skip,
                                   num_workers=d.num_workers, what=f"data.shards {d.shards}")

    def skip_reason(self, batch: dict) -> tuple[str, str] | None:
        """A micro-batch with codes the model cannot score (the reader already skips such samples; this catches
        batches from elsewhere) is skipped on every process and counted (`skipped/bad_codes`); strict: an
        error."""
        problem = self.adapter.batch_problem(batch)
        if problem is None:
            return None
        if self.cfg.data.strict:  # one clear error (the CLI prints it and exits 2), not a traceback
            raise DataError(f"data.strict: {problem}")
        return "bad_codes", problem

    @staticmethod
    def compute_loss(cfg, model, module, unwrapped, batch: dict, generator) -> tuple[torch.Tensor, dict]:
        """`model` is the `MusicAdapter`; `module` the (possibly wrapped) policy to run forward through. Bad codes
        are found before this by `skip_reason`; met here (a caller without the loop) they raise `SkipBatch`
        before any forward, or in strict mode an error."""
        try:
            return music_preference_loss(model, batch, cfg.method, policy=module)
        except MusicCodesError as err:
            if cfg.data.strict:
                raise DataError(f"data.strict: {err}") from err
            raise SkipBatch("bad_codes", str(err)) from err

    def save_final(self, unwrapped, run_dir: Path) -> dict[str, str]:
        from mmalign.train.checkpoint import atomic_dir

        a = self.adapter
        # A peft model saves its adapter only (PeftModel.from_pretrained(base, lora/)); a full model saves itself.
        name = "lora" if self.cfg.model.lora is not None else "model"

        def write(d: Path) -> None:
            unwrapped.save_pretrained(str(d))
            a.tokenizer.save_pretrained(str(d))
            if name == "model" and a.text_encoder is not None:
                a.text_encoder.save_pretrained(str(d / "text_encoder"))

        atomic_dir(run_dir / name, write)
        return {name: str(run_dir / name)}

    def build_cache(self) -> Path:
        """`--cache-only`: precompute the reference log-probs into the shards' cache (reference 'precomputed')."""
        if self.cfg.model.reference != "precomputed":
            raise ValueError("--cache-only builds the reference log-prob cache; set model.reference=precomputed")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # The reference is the loaded weights themselves (before any LoRA): score with them, no second copy.
        self.adapter = self._load(device, "none", lora=False)
        self.adapter.ref_model, self.adapter.reference = self.adapter.model.eval(), "copy"
        return precompute_reference_logps(self.adapter, self.cfg.data.shards, batch_size=self.cfg.train.batch_size)
