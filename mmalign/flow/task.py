"""The flow-matching task (`task: flow`): SD3-class images and Wan-class videos with Flow-DPO, Flow-RWR and SFT.

The training step is explicit code (`compute_loss`): the adapter (`mmalign.flow.adapter`) turns the batch into
velocity-error surrogates (one shared t and noise per pair), the method table (`mmalign.methods`) turns them into
the loss. Data: `pair` shards for image models; `video_pair` shards for video models, where a pair's winner is
decided by its per-dimension labels (VideoAlign's VQ / MQ / TA, each A / B / same) weighted by `data.dims`
(`score = sum_d w_d·(+1 if A, -1 if B, 0 if same)`: positive -> A wins, negative -> B wins, 0 -> a tie, dropped
and counted under `data/ties_dropped`).

Flow-RWR (`method.name: flow_rwr`) trains on every item with its reward instead of on decided pairs: video pairs
keep both clips (ties too), each rewarded `sum_d w_d·r_d` from the shards' `rewards_a` / `rewards_b` fields (per
dimension, e.g. a reward model's or the toy's ground truth); image pairs (ties dropped) use the pair's `rewards`
field [r_0, r_1]. A shard without them is an error naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from functools import cached_property
from typing import Iterator, Literal, Optional, Union

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from mmalign.config import StrictModel
from mmalign.flow.adapter import TIMESTEP_SAMPLING, WEIGHTING, FlowAdapter, check_flow_model, load_flow_components
from mmalign.flow.cache import CACHE_NAME, COND_FIELDS, cache_producer, read_cached_pairs
from mmalign.flow.online import FlowOnlineConfig, OnlineSampler
from mmalign.losses import FLOW_BETA_SCHEDULES
from mmalign.methods import METHODS, check_method, preference_loss
from mmalign.models.loading import ModelLoadError
from mmalign.models.lora import LoraConfig, attach_lora
from mmalign.models.reference import ReferenceChoice, resolve_reference
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, Task
from mmalign.train.trainer import DataError, TrainingError

FLOW_REFERENCES = ("lora", "copy", "none")
LABEL_SIGN = {"A": 1.0, "B": -1.0, "same": 0.0}


class FlowModelConfig(StrictModel):
    pretrained: str = Field(..., description="A flow-matching diffusers pipeline folder or hub id: "
                                             "StableDiffusion3Pipeline, WanPipeline, or the toy video world's.")
    revision: Optional[str] = None
    variant: Optional[str] = Field(None, description="Weight variant, e.g. 'fp16'.")
    transformer: Optional[str] = Field(None, description="A transformer folder to start from instead of the "
                                                         "pipeline's (e.g. a previous run's output).")
    shift: Optional[float] = Field(None, gt=0, description="Sigma shift of the training timesteps; null = the "
                                                           "pipeline scheduler's (shift, or flow_shift for Wan's "
                                                           "UniPC).")
    lora: Optional[LoraConfig] = Field(None, description="null = full fine-tune (reference: a frozen copy); set "
                                                             "= LoRA (reference: adapters disabled).")
    reference: ReferenceChoice = Field("auto", description="auto = lora with LoRA, else copy; precomputed is "
                                                           "refused (surrogates depend on each step's t and noise).")
    reference_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    gradient_checkpointing: bool = False


class FlowMethodConfig(StrictModel):
    name: Literal["flow_dpo", "flow_rwr", "sft"] = Field(
        "flow_dpo", description="flow_dpo = Flow-DPO (VideoAlign); flow_rwr = reward-weighted velocity loss over "
                                "every item (weights softmax(r / temperature) over the batch); sft = the velocity "
                                "loss on winners.")
    beta: Optional[float] = Field(None, gt=0, description="Required for flow_dpo: its scale depends on the model's "
                                                          "velocity errors (means over all non-batch dims); sft "
                                                          "ignores it.")
    beta_schedule: Literal["constant", "(1-t)^2"] = Field(
        "constant", description="flow_dpo's per-pair β: constant (default; the paper's Table 4 finds β(1-t)^2 "
                                "reward-hacks text alignment) or β·(1-t)^2.")
    temperature: float = Field(1.0, gt=0, description="flow_rwr's τ, on the scale of the rewards (small: nearly "
                                                      "best-of-batch; large: plain SFT on every item).")

    @model_validator(mode="after")
    def _check(self) -> "FlowMethodConfig":
        check_method(self.name, "error", where="method")
        if self.name == "flow_dpo" and self.beta is None:
            raise ValueError("method.beta is required for flow_dpo: no β transfers between flow models (it scales "
                             "the mean velocity errors); the recipes in configs/ state theirs")
        assert self.beta_schedule in FLOW_BETA_SCHEDULES
        return self


class FlowNoiseConfig(StrictModel):
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal", description="Density of u (diffusers' compute_density_for_timestep_sampling); t = the "
                                    "training scheduler's shifted sigma at u·1000.")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    weighting: Literal["none", "cosmap"] = Field("none", description="Per-element loss weight of t "
                                                                     "(compute_loss_weighting_for_sd3).")

    @model_validator(mode="after")
    def _check(self) -> "FlowNoiseConfig":
        assert self.timestep_sampling in TIMESTEP_SAMPLING and self.weighting in WEIGHTING
        return self


class FlowDataConfig(StrictModel):
    shards: Optional[str] = Field(None, description="pair shards (image models) or video_pair shards (video "
                                                    "models); null with `online` (pairs made from samples).")
    resolution: int = Field(512, gt=0, description="Square training size in pixels (centre crop after resizing "
                                                   "the shorter side).")
    num_frames: int = Field(9, gt=0, description="Video: frames per clip (Wan: 4k + 1); a clip with fewer is "
                                                 "skipped and counted (strict: an error).")
    fps: Optional[float] = Field(None, gt=0, description="Video: resample clips to this frame rate before taking "
                                                         "num_frames (null = the file's frames as they are).")
    dims: dict[str, float] = Field(default_factory=lambda: {"VQ": 1.0, "MQ": 1.0, "TA": 1.0},
                                   description="Video: weight of each label dimension in the winner vote "
                                               "(VQ:MQ:TA = 1:1:1 by default).")
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(0, ge=0)
    strict: bool = Field(False, description="Raise on a corrupt sample or a clip that is too short instead of "
                                            "skipping and counting it.")
    cache: Union[bool, str] = Field(
        False, description="true = read the VAE latents (posterior means) and text embeddings from the cache that "
                           "`mmalign train CONFIG --cache-only` writes next to the shards "
                           "(`<shards>/cache/flow-<key>/`, keyed by the model's encoder files, dtype, resolution, "
                           "num_frames and fps: a missing or "
                           "stale cache is an error before any model loads); the VAE and text encoders then stay off "
                           "the accelerator. A folder path = the same, with the caches in that folder instead of next "
                           "to the shards. false = decode and encode every step.")

    @field_validator("cache")
    @classmethod
    def _cache_folder(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("an empty string is not a folder: use true (next to the shards), false, or a path")
        return value

    @model_validator(mode="after")
    def _check_cache(self) -> "FlowDataConfig":
        if self.use_cache and self.shards is None:
            raise ValueError("data.cache holds encodings of data.shards; set data.shards or data.cache false")
        return self

    @property
    def use_cache(self) -> bool:
        """Training reads the cache instead of encoding (data.cache true or a folder)."""
        return self.cache is not False

    @property
    def cache_root(self) -> Optional[str]:
        """The folder holding the caches when data.cache names one; None = `<shards>/cache`."""
        return self.cache if isinstance(self.cache, str) else None


class FlowTrainConfig(BaseTrainConfig):
    """Flow-matching preference fine-tuning (SD3, Wan, the toy video world): Flow-DPO and SFT."""

    task: Literal["flow"] = "flow"
    model: FlowModelConfig
    method: FlowMethodConfig = Field(default_factory=FlowMethodConfig)
    noise: FlowNoiseConfig = Field(default_factory=FlowNoiseConfig)
    data: FlowDataConfig
    online: Optional[FlowOnlineConfig] = Field(None, description="Online training: pairs made each step from the "
                                                                 "model's own samples, scored by rewards "
                                                                 "(mmalign.flow.online); data.shards is then unused.")

    @model_validator(mode="after")
    def _check(self) -> "FlowTrainConfig":
        self.reference_mode()
        if self.online is None and self.data.shards is None:
            raise ValueError("data.shards is required (or an `online` section, which makes pairs from samples)")
        if self.online is not None and self.data.shards is not None:
            raise ValueError("data.shards and online are exclusive: online training makes its pairs from samples; "
                             "set data.shards: null")
        if self.online is not None and self.online.ref_update_every and self.reference_mode() == "none":
            raise ValueError(f"online.ref_update_every: method {self.method.name!r} uses no reference")
        return self

    def reference_mode(self) -> str:
        return resolve_reference(self.model.reference, lora=self.model.lora is not None,
                                 needs_reference=METHODS[self.method.name].needs_reference,
                                 supported=FLOW_REFERENCES)


# -- models ----------------------------------------------------------------------------------------------------------
def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def build_adapter(cfg: FlowTrainConfig, device: torch.device, encoders_on_device: bool = True) -> FlowAdapter:
    """Load the pipeline, attach LoRA if asked, build the reference the method needs. encoders_on_device=False
    leaves the VAE and text encoders on the CPU (training from the latent cache)."""
    m = cfg.model
    comps = load_flow_components(m.pretrained, revision=m.revision, variant=m.variant, shift=m.shift,
                                 transformer_path=m.transformer)
    if encoders_on_device:
        comps.move_encoders(device, cfg.train.mixed_precision)
    transformer = comps.transformer
    weight_dtype = _weight_dtype(cfg.train.mixed_precision)
    ref_dtype = None
    if m.lora is not None:
        attach_lora(transformer, rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                    target_modules=m.lora.target_modules, device=device, weight_dtype=weight_dtype)
    else:
        transformer.to(device)
        transformer.requires_grad_(True)
        ref_dtype = weight_dtype if m.reference_dtype == "auto" else getattr(torch, m.reference_dtype)
    if m.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    n = cfg.noise
    adapter = FlowAdapter(comps, reference=cfg.reference_mode(), reference_dtype=ref_dtype,
                          timestep_sampling=n.timestep_sampling, logit_mean=n.logit_mean, logit_std=n.logit_std,
                          mode_scale=n.mode_scale, weighting=n.weighting, frame_rate=cfg.data.fps or 25.0)
    if adapter.ref_transformer is not None:
        adapter.ref_transformer.to(device)
    return adapter


# -- the training step -----------------------------------------------------------------------------------------
def compute_loss(cfg: FlowTrainConfig, adapter: FlowAdapter | OnlineSampler, transformer, unwrapped, batch: dict,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch: surrogates from the adapter, loss from the method table (online: from fresh samples)."""
    if isinstance(adapter, OnlineSampler):
        return _online_loss(cfg, adapter, transformer, unwrapped, batch, generator)
    method = cfg.method
    surrogates = adapter.surrogates(transformer, batch, generator, with_reference=adapter.reference != "none",
                                    unwrapped=unwrapped)
    loss, metrics = preference_loss(method.name, surrogates, beta=method.beta or 1.0,
                                    beta_schedule=method.beta_schedule, rewards=batch.get("item_rewards"),
                                    temperature=method.temperature)
    if "ties_dropped" in batch:
        metrics["data/ties_dropped"] = torch.tensor(float(batch["ties_dropped"]))
    return loss, metrics


def _online_loss(cfg: FlowTrainConfig, sampler: OnlineSampler, transformer, unwrapped, batch: dict,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Sample, score and pick the groups of a micro-batch of prompts (`mmalign.flow.online`), then the loss."""
    from mmalign.models.contract import Surrogates
    from mmalign.train.tasks import SkipBatch

    method, adapter = cfg.method, sampler.adapter
    g = sampler.groups(unwrapped, list(batch["captions"]), method.name, generator)
    kept, scale = g["kept"], 1.0
    if not kept.any():
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if not distributed:
            raise SkipBatch("online_no_gap", f"prompts {list(batch['keys'])}: every group's best and worst rewards "
                                             f"are within online.min_gap {cfg.online.min_gap}")
        kept, scale = torch.ones_like(kept), 0.0  # the ranks must run the same passes: a step that moves nothing
    index = kept.nonzero().squeeze(1)
    device = next(unwrapped.parameters()).device
    latents = g["latents"][:, index].to(device)
    err, ref, sigmas = adapter.group_errors(transformer, latents, g["cond"].select(index), generator,
                                            with_reference=adapter.reference != "none", unwrapped=unwrapped)
    surrogates = Surrogates(-err, None if ref is None else -ref, "error", t=sigmas)
    loss, metrics = preference_loss(method.name, surrogates, beta=method.beta or 1.0,
                                    beta_schedule=method.beta_schedule, rewards=g["item_rewards"][:, index],
                                    temperature=method.temperature)
    metrics.update(g["metrics"])
    return loss * scale if scale != 1.0 else loss, metrics


# -- data --------------------------------------------------------------------------------------------------------
def _item_rewards(extra: dict | None, dims: dict[str, float], key: str) -> tuple[float, float]:
    """(reward of A, reward of B) = sum_d w_d·r_d from a video pair's `rewards_a` / `rewards_b` JSON fields."""
    out = []
    for side in ("rewards_a", "rewards_b"):
        r = (extra or {}).get(side)
        if not isinstance(r, dict) or any(d not in r for d in dims):
            raise DataError(f"{key}: method flow_rwr needs per-dimension rewards {sorted(dims)} in the video pair's "
                            f"'{side}' field (got {r!r}); write them with the pairs (e.g. a reward model's scores)")
        out.append(sum(w * float(r[d]) for d, w in dims.items()))
    return out[0], out[1]


def video_pair_batch(batch: dict, dims: dict[str, float], num_frames: int, resolution: int,
                     strict: bool = False, rewards: bool = False) -> dict:
    """A `collate_video_pairs` batch (frames decoded) -> `{"videos": (2B', 3, F, R, R) [winners; losers],
    "captions", "ties_dropped", "short_dropped"}`; see the module docstring for the winner vote. With `rewards`
    (Flow-RWR) every pair is kept as [A; B] (ties too) and `"item_rewards"` (2, B') holds their rewards. A pair with
    a clip shorter than `num_frames` is a bad sample, as a corrupt one: added to the batch's `skipped` (the loop's
    `skipped_samples`) and `skip_reasons["short_clip"]`.

    A batch read with the latent cache (`batch["cache"]["flow"]`: per pair the latents of A and B in stored order and
    their decoded frame counts, `mmalign.flow.cache`) gives `"latents"` (2B', ...) [winners; losers] and the
    conditioning's fields (`"prompt_embeds"` (B', L, D), ...) instead of `"videos"`, by the same vote."""
    from mmalign.data.transforms import video_to_tensor

    cached = batch["cache"][CACHE_NAME] if "cache" in batch else None
    kept = []
    winners, losers, captions, item_rewards = [], [], [], []
    ties = short = 0
    labels = batch["labels"]
    missing = [] if rewards else sorted(set(dims) - set(labels))  # RWR reads rewards, not labels
    if missing:
        raise DataError(f"data.dims {sorted(dims)}: the shards' video_pair labels have no {missing} (they have "
                        f"{sorted(labels)})")
    for i, prompt in enumerate(batch["prompts"]):
        # labels[d][i] is P(A preferred): 1 (A), 0 (B), 0.5 (same) -> sign +1 / -1 / 0
        vote = 1.0 if rewards else sum(w * (2.0 * float(labels[d][i]) - 1.0) for d, w in dims.items())
        if vote == 0:
            ties += 1
            continue
        if cached is None:
            clips = (batch["frames_a"][i], batch["frames_b"][i])
            n_a, n_b = len(clips[0]), len(clips[1])
        else:
            n_a, n_b = (int(n) for n in cached["frames"][i])
        if min(n_a, n_b) < num_frames:
            if strict:
                raise DataError(f"{batch['keys'][i]}: clips of {n_a} and {n_b} frames, fewer than "
                                f"data.num_frames {num_frames}")
            short += 1
            continue
        if rewards:
            item_rewards.append(_item_rewards(batch["extra"][i] if "extra" in batch else None, dims,
                                              batch["keys"][i]))
        win = 0 if vote > 0 else 1  # A or B
        if cached is None:
            winners.append(video_to_tensor(clips[win], num_frames, resolution))
            losers.append(video_to_tensor(clips[1 - win], num_frames, resolution))
        else:
            winners.append(torch.as_tensor(cached["latents"][i][win]))
            losers.append(torch.as_tensor(cached["latents"][i][1 - win]))
        kept.append(i)
        captions.append(prompt)
    stacked = torch.stack(winners + losers) if captions else None  # None: nothing decided (FlowTask.skip_reason)
    out = {"videos" if cached is None else "latents": stacked, "captions": captions, "ties_dropped": ties,
           "short_dropped": short}
    if cached is not None:
        out.update({f: torch.as_tensor(cached[f])[kept] for f in COND_FIELDS if f in cached})
    if short:
        reasons = dict(batch.get("skip_reasons") or {})
        reasons["short_clip"] = reasons.get("short_clip", 0) + short
        out.update(skipped=int(batch.get("skipped", 0)) + short, skip_reasons=reasons)
    if rewards and captions:
        out["item_rewards"] = torch.tensor(item_rewards, dtype=torch.float32).T.contiguous()
    return out


def pair_item_rewards(batch: dict) -> Tensor:
    """(2, B) rewards of an image pair batch's [winners; losers] from each pair's `rewards` field [r_0, r_1]."""
    rows = []
    for i, extra in enumerate(batch.get("extra") or [None] * len(batch["keys"])):
        r = (extra or {}).get("rewards")
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise DataError(f"{batch['keys'][i]}: method flow_rwr needs the pair's 'rewards' field [r_0, r_1] "
                            f"(got {r!r})")
        w = int(batch["winner_index"][i])
        rows.append((float(r[w]), float(r[1 - w])))
    return torch.tensor(rows, dtype=torch.float32).T.contiguous()


# -- the task ------------------------------------------------------------------------------------------------------
class FlowTask(Task):
    """Flow-matching preference fine-tuning; see the module docstring and `FlowTrainConfig`."""

    config_class = FlowTrainConfig
    progress_metrics = ("rewards/accuracies",)
    compute_loss = staticmethod(compute_loss)

    def __init__(self, cfg: FlowTrainConfig):
        super().__init__(cfg)
        self.adapter: FlowAdapter | None = None
        self.family: str | None = None

    @cached_property
    def producer(self) -> dict:
        """What the latent cache of this config is keyed by (`mmalign.flow.cache.cache_producer`)."""
        return cache_producer(self.cfg)

    def check_inputs(self) -> None:
        """Model family, scheduler, frame count and size, and the shards' schema, before any weights load."""
        from mmalign.data.manifest import open_source

        cfg = self.cfg
        try:
            self.family, _ = check_flow_model(cfg.model.pretrained, cfg.model.revision, cfg.model.shift)
        except ModelLoadError as err:
            raise TrainingError(str(err)) from None
        if self.family == "wan":
            vae = _subconfig(cfg.model.pretrained, "vae")
            tr = _subconfig(cfg.model.pretrained, "transformer")
            t_factor = vae.get("scale_factor_temporal", 4)
            if (cfg.data.num_frames - 1) % t_factor:
                raise TrainingError(f"data.num_frames {cfg.data.num_frames}: Wan's VAE takes {t_factor}k+1 frames "
                                    f"(e.g. {t_factor * ((cfg.data.num_frames - 1) // t_factor) + 1})")
            s_factor = vae.get("scale_factor_spatial", 8) * tr.get("patch_size", [1, 2, 2])[-1]
            if cfg.data.resolution % s_factor:
                raise TrainingError(f"data.resolution {cfg.data.resolution}: Wan needs a multiple of {s_factor} "
                                    "(VAE downsampling x patch size)")
        elif self.family == "sd3":
            vae = _subconfig(cfg.model.pretrained, "vae")
            tr = _subconfig(cfg.model.pretrained, "transformer")
            s_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1) * tr.get("patch_size", 2)
            if cfg.data.resolution % s_factor:
                raise TrainingError(f"data.resolution {cfg.data.resolution}: SD3 needs a multiple of {s_factor} "
                                    "(VAE downsampling x patch size)")
        elif self.family == "ltx":
            # AutoencoderKLLTXVideo's ratios: explicit in the config, else patch size x 2^(scaling blocks); the
            # defaults are LTX-Video's (8x temporal, 32x spatial), for hub ids whose configs are read when loading.
            vae = _subconfig(cfg.model.pretrained, "vae")
            tr = _subconfig(cfg.model.pretrained, "transformer")
            scaling = 2 ** sum(vae.get("spatio_temporal_scaling", [True, True, True, False]))
            t_factor = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * scaling
            s_factor = (vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * scaling) * tr.get(
                "patch_size", 1)
            n, r = cfg.data.num_frames, cfg.data.resolution
            if (n - 1) % t_factor:
                low = t_factor * ((n - 1) // t_factor) + 1
                raise TrainingError(f"data.num_frames {n}: LTX's VAE takes {t_factor}k+1 frames (e.g. {low} or "
                                    f"{low + t_factor})")
            if r % s_factor:
                raise TrainingError(f"data.resolution {r}: LTX needs a multiple of {s_factor} (VAE downsampling x "
                                    f"patch size; e.g. {max(s_factor, s_factor * round(r / s_factor))})")
        video = self.family in ("wan", "ltx", "toy_video")
        if cfg.online is not None:
            self._check_online()
            return
        src = open_source(cfg.data.shards)
        wanted = "video_pair" if video else "pair"
        if src.schema != wanted:
            raise DataError(f"data.shards {cfg.data.shards}: holds {src.schema!r} samples; {self.family} models "
                            f"train on {wanted!r} shards")
        if cfg.data.use_cache:
            from mmalign.data.cache import StaleCacheError, open_cache

            try:
                open_cache(cfg.data.shards, CACHE_NAME, self.producer, root=cfg.data.cache_root)
            except StaleCacheError as err:
                raise StaleCacheError(f"data.cache {cfg.data.cache}: {err}. Build the cache for this config with "
                                      "`mmalign train CONFIG --cache-only` (same overrides)") from None

    def _check_online(self) -> None:
        """The prompt file, the family and the rewards' names (no weights load)."""
        from mmalign.data.prompts import read_prompt_rows
        from mmalign.rewards.base import ScorerError
        from mmalign.rewards.registry import SCORERS, scorer_kind

        o = self.cfg.online
        if self.family not in ("sd3", "wan", "toy_video"):
            raise TrainingError(f"online: sampling supports sd3, wan and toy_video pipelines, not {self.family!r}")
        try:
            read_prompt_rows(o.prompts, limit=o.max_prompts)
        except (OSError, ValueError) as err:
            raise DataError(f"online.prompts: {err}") from None
        want = "video" if self.family in ("wan", "toy_video") else "image"
        for i, spec in enumerate(o.rewards):
            try:
                kind = scorer_kind(spec.scorer)
            except ScorerError as err:
                raise TrainingError(f"online.rewards[{i}]: {err}") from None
            if kind in ("latent", "audio") or (kind == "video" and want == "image") or (
                    kind == "image" and want == "video" and spec.scorer.partition("=")[0] in SCORERS):
                raise TrainingError(f"online.rewards[{i}] {spec.scorer!r} scores {kind} inputs; {self.family} "
                                    f"samples are {want}s (use a {want} scorer)")

    def check_sharded(self) -> None:
        if self.cfg.online is not None and self.cfg.online.ref_update_every:
            raise TrainingError("online.ref_update_every copies the policy into the reference, which needs the "
                                "whole weights on every process; use DDP (no FSDP / ZeRO-3) or ref_update_every: 0")

    def after_optimizer_step(self, unwrapped) -> None:
        if self.adapter is not None and self.adapter.refreshed is not None:
            self.adapter.refreshed.after_step(unwrapped)

    def skip_reason(self, batch: dict) -> tuple[str, str] | None:
        if ("videos" in batch and batch["videos"] is None) or ("latents" in batch and batch["latents"] is None):
            return ("no_decided_pairs", f"a micro-batch of video pairs with {batch['ties_dropped']} ties under "
                                        f"data.dims and {batch['short_dropped']} clips shorter than data.num_frames")
        return None

    def build(self, device) -> Built:
        self.adapter = build_adapter(self.cfg, device, encoders_on_device=not self.cfg.data.use_cache)
        transformer = self.adapter.c.transformer
        params = [p for p in transformer.parameters() if p.requires_grad]
        o = self.cfg.online
        if o is None:
            return Built(module=transformer, params=params, model=self.adapter)
        from mmalign.rewards.combine import RewardSet
        from mmalign.models.reference import RefreshedReference

        stateful = []
        if o.ref_update_every:
            self.adapter.refreshed = RefreshedReference(self.adapter.reference, o.ref_update_every,
                                                        self.adapter.ref_transformer)
            stateful.append(self.adapter.refreshed)
        rewards = RewardSet.load(o.rewards, device=device)
        sampler = OnlineSampler(self.adapter, o, rewards, num_frames=self.cfg.data.num_frames,
                                resolution=self.cfg.data.resolution)
        return Built(module=transformer, params=params, model=sampler, stateful=stateful)

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.train.data import endless_batches

        cfg, d = self.cfg, self.cfg.data
        if cfg.online is not None:
            from mmalign.data.prompts import prompt_batches

            yield from prompt_batches(cfg.online.prompts, cfg.train.batch_size, seed=cfg.run.seed, rank=rank,
                                      world_size=world_size, skip=skip, limit=cfg.online.max_prompts)
            return
        rwr = cfg.method.name == "flow_rwr"
        common = dict(shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1), seed=cfg.run.seed,
                      rank=rank, world_size=world_size, strict=d.strict)
        if self.family in ("wan", "ltx", "toy_video"):
            from mmalign.data.collate import collate_video_pairs
            from mmalign.data.dataset import VideoPairDataset
            from mmalign.data.video import FrameSampling

            extra = ("rewards_a", "rewards_b") if rwr else ()
            if d.use_cache:  # latents + text from the cache, no video decoded
                dataset = VideoPairDataset(d.shards, decode_videos=False, extra_fields=extra, **common,
                                           caches={CACHE_NAME: self.producer}, cache_root=d.cache_root)
            else:
                frames = FrameSampling(fps=d.fps, max_frames=None) if d.fps else FrameSampling(max_frames=None)
                dataset = VideoPairDataset(d.shards, frames=frames, extra_fields=extra, **common)
            for batch in endless_batches(dataset, collate_video_pairs, cfg.train.batch_size, skip=skip,
                                         num_workers=d.num_workers, what=f"data.shards {d.shards}"):
                yield {**batch, **video_pair_batch(batch, d.dims, d.num_frames, d.resolution, d.strict, rwr)}
            return
        from functools import partial

        from mmalign.data.collate import collate_pairs
        from mmalign.data.dataset import PairDataset

        images = (dict(decode_images=False, caches={CACHE_NAME: self.producer}, cache_root=d.cache_root)
                  if d.use_cache else dict(transforms={"resolution": d.resolution, "crop": "center"}))
        dataset = PairDataset(d.shards, ties="drop", extra_fields=("rewards",) if rwr else (), **images, **common)
        for batch in endless_batches(dataset, partial(collate_pairs), cfg.train.batch_size, skip=skip,
                                     num_workers=d.num_workers, what=f"data.shards {d.shards}"):
            if d.use_cache:
                batch = {**batch, **read_cached_pairs(batch)}
            yield {**batch, "item_rewards": pair_item_rewards(batch)} if rwr else batch

    def build_cache(self) -> Path:
        """`mmalign train CONFIG --cache-only`: `mmalign.flow.cache.build_cache` (the transformer never loads)."""
        from mmalign.flow.cache import build_cache

        return build_cache(self.cfg, progress=self.cfg.train.progress)

    def save_final(self, unwrapped, run_dir: Path, state_dict: dict | None = None) -> dict[str, str]:
        """The transformer (full fine-tune) or its LoRA in the pipeline's `load_lora_weights` format."""
        from mmalign.flow.export import save_final_transformer

        return save_final_transformer(self.cfg, self.adapter, unwrapped, run_dir, state_dict)


def _subconfig(pretrained: str, sub: str) -> dict:
    """A component's config.json of a local pipeline folder ({} for hub ids: checked when loading)."""
    path = Path(pretrained) / sub / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
