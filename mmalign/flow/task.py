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
from typing import Iterator, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mmalign.config import StrictModel
from mmalign.flow.adapter import TIMESTEP_SAMPLING, WEIGHTING, FlowAdapter, check_flow_model, load_flow_components
from mmalign.losses import FLOW_BETA_SCHEDULES
from mmalign.methods import METHODS, check_method, preference_loss
from mmalign.models.loading import ModelLoadError, move_module
from mmalign.models.reference import ReferenceChoice, resolve_reference
from mmalign.train.config import BaseTrainConfig
from mmalign.train.tasks import Built, Task
from mmalign.train.trainer import DataError, TrainingError

FLOW_REFERENCES = ("lora", "copy", "none")
LABEL_SIGN = {"A": 1.0, "B": -1.0, "same": 0.0}


class FlowLoraConfig(StrictModel):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha; null = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names (peft matching) to adapt: the attention projections by default (flow_grpo's SD3 "
                    "LoRA); SD3's joint blocks also have add_q_proj / add_k_proj / add_v_proj / to_add_out.")


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
    lora: Optional[FlowLoraConfig] = Field(None, description="null = full fine-tune (reference: a frozen copy); set "
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
    shards: str = Field(..., description="pair shards (image models) or video_pair shards (video models).")
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


class FlowTrainConfig(BaseTrainConfig):
    """Flow-matching preference fine-tuning (SD3, Wan, the toy video world): Flow-DPO and SFT."""

    task: Literal["flow"] = "flow"
    model: FlowModelConfig
    method: FlowMethodConfig = Field(default_factory=FlowMethodConfig)
    noise: FlowNoiseConfig = Field(default_factory=FlowNoiseConfig)
    data: FlowDataConfig

    @model_validator(mode="after")
    def _check(self) -> "FlowTrainConfig":
        self.reference_mode()
        return self

    def reference_mode(self) -> str:
        return resolve_reference(self.model.reference, lora=self.model.lora is not None,
                                 needs_reference=METHODS[self.method.name].needs_reference,
                                 supported=FLOW_REFERENCES)


# -- models ----------------------------------------------------------------------------------------------------------
def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def build_adapter(cfg: FlowTrainConfig, device: torch.device) -> FlowAdapter:
    """Load the pipeline, attach LoRA if asked, build the reference the method needs."""
    m = cfg.model
    comps = load_flow_components(m.pretrained, revision=m.revision, variant=m.variant, shift=m.shift,
                                 transformer_path=m.transformer)
    encoder_dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(comps.pipe, name, None)
        if module is not None:
            move_module(module, device, torch.float32 if name == "vae" else encoder_dtype)
    transformer = comps.transformer
    weight_dtype = _weight_dtype(cfg.train.mixed_precision)
    ref_dtype = None
    if m.lora is not None:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        move_module(transformer, device, weight_dtype)
        transformer.add_adapter(LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha or m.lora.rank,
                                           lora_dropout=m.lora.dropout, init_lora_weights="gaussian",
                                           target_modules=m.lora.target_modules))
        for p in transformer.parameters():  # trainable LoRA params stay float32 under mixed precision
            if p.requires_grad:
                p.data = p.data.float()
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
                          mode_scale=n.mode_scale, weighting=n.weighting)
    if adapter.ref_transformer is not None:
        adapter.ref_transformer.to(device)
    return adapter


# -- the training step -----------------------------------------------------------------------------------------
def compute_loss(cfg: FlowTrainConfig, adapter: FlowAdapter, transformer, unwrapped, batch: dict,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch: surrogates from the adapter, loss from the method table."""
    method = cfg.method
    surrogates = adapter.surrogates(transformer, batch, generator, with_reference=adapter.reference != "none",
                                    unwrapped=unwrapped)
    loss, metrics = preference_loss(method.name, surrogates, beta=method.beta or 1.0,
                                    beta_schedule=method.beta_schedule, rewards=batch.get("item_rewards"),
                                    temperature=method.temperature)
    if "ties_dropped" in batch:
        metrics["data/ties_dropped"] = torch.tensor(float(batch["ties_dropped"]))
    return loss, metrics


# -- data --------------------------------------------------------------------------------------------------------
def _clip_tensor(frames, num_frames: int, resolution: int) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, num_frames, resolution, resolution) in [-1, 1]: the first num_frames frames, the
    shorter side resized to `resolution` (bilinear, antialiased), centre-cropped."""
    import torch.nn.functional as F

    x = torch.as_tensor(frames[:num_frames]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[:, :, top:top + resolution, left:left + resolution].permute(1, 0, 2, 3).contiguous()


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
    (Flow-RWR) every pair is kept as [A; B] (ties too) and `"item_rewards"` (2, B') holds their rewards."""
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
        a, b = batch["frames_a"][i], batch["frames_b"][i]
        if min(len(a), len(b)) < num_frames:
            if strict:
                raise DataError(f"{batch['keys'][i]}: clips of {len(a)} and {len(b)} frames, fewer than "
                                f"data.num_frames {num_frames}")
            short += 1
            continue
        if rewards:
            item_rewards.append(_item_rewards(batch["extra"][i] if "extra" in batch else None, dims,
                                              batch["keys"][i]))
        win, lose = (a, b) if vote > 0 else (b, a)
        winners.append(_clip_tensor(win, num_frames, resolution))
        losers.append(_clip_tensor(lose, num_frames, resolution))
        captions.append(prompt)
    videos = torch.stack(winners + losers) if captions else None  # None: nothing decided (FlowTask.skip_reason)
    out = {"videos": videos, "captions": captions, "ties_dropped": ties, "short_dropped": short}
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
        video = self.family in ("wan", "toy_video")
        src = open_source(cfg.data.shards)
        wanted = "video_pair" if video else "pair"
        if src.schema != wanted:
            raise DataError(f"data.shards {cfg.data.shards}: holds {src.schema!r} samples; {self.family} models "
                            f"train on {wanted!r} shards")

    def skip_reason(self, batch: dict) -> tuple[str, str] | None:
        if "videos" in batch and batch["videos"] is None:
            return ("no_decided_pairs", f"a micro-batch of video pairs with {batch['ties_dropped']} ties under "
                                        f"data.dims and {batch['short_dropped']} clips shorter than data.num_frames")
        return None

    def build(self, device) -> Built:
        self.adapter = build_adapter(self.cfg, device)
        transformer = self.adapter.c.transformer
        params = [p for p in transformer.parameters() if p.requires_grad]
        return Built(module=transformer, params=params, model=self.adapter)

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.train.data import endless_batches

        cfg, d = self.cfg, self.cfg.data
        rwr = cfg.method.name == "flow_rwr"
        common = dict(shuffle=d.shuffle_buffer > 0, shuffle_buffer=max(d.shuffle_buffer, 1), seed=cfg.run.seed,
                      rank=rank, world_size=world_size, strict=d.strict)
        if self.family in ("wan", "toy_video"):
            from mmalign.data.collate import collate_video_pairs
            from mmalign.data.dataset import VideoPairDataset
            from mmalign.data.video import FrameSampling

            frames = FrameSampling(fps=d.fps, max_frames=None) if d.fps else FrameSampling(max_frames=None)
            extra = ("rewards_a", "rewards_b") if rwr else ()
            dataset = VideoPairDataset(d.shards, frames=frames, extra_fields=extra, **common)
            for batch in endless_batches(dataset, collate_video_pairs, cfg.train.batch_size, skip=skip,
                                         num_workers=d.num_workers, what=f"data.shards {d.shards}"):
                yield {**batch, **video_pair_batch(batch, d.dims, d.num_frames, d.resolution, d.strict, rwr)}
            return
        from functools import partial

        from mmalign.data.collate import collate_pairs
        from mmalign.data.dataset import PairDataset

        dataset = PairDataset(d.shards, transforms={"resolution": d.resolution, "crop": "center"}, ties="drop",
                              extra_fields=("rewards",) if rwr else (), **common)
        for batch in endless_batches(dataset, partial(collate_pairs), cfg.train.batch_size, skip=skip,
                                     num_workers=d.num_workers, what=f"data.shards {d.shards}"):
            yield {**batch, "item_rewards": pair_item_rewards(batch)} if rwr else batch

    def save_final(self, unwrapped, run_dir: Path, state_dict: dict | None = None) -> dict[str, str]:
        """The transformer (full fine-tune) or its LoRA in the pipeline's `load_lora_weights` format."""
        from mmalign.flow.export import save_final_transformer

        return save_final_transformer(self.cfg, self.adapter, unwrapped, run_dir, state_dict)


def _subconfig(pretrained: str, sub: str) -> dict:
    """A component's config.json of a local pipeline folder ({} for hub ids: checked when loading)."""
    path = Path(pretrained) / sub / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
