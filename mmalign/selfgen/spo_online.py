"""Online SPO (`task: spo_online`): the step-wise resampler inside training, on the current policy, as SPO trains.

Each micro-batch is `train.batch_size` prompts from `online.prompts`. The policy (the UNet with its LoRA, in eval
mode, no gradient) runs SPO's step-wise resampler on them (`mmalign.selfgen.spo.resample`: DDIM with eta and
guidance, k candidates per step from `divert_start`, scored by the step-aware preference model at their noise
level, kept when the softmax gap exceeds `threshold`, continued from a random candidate); the kept transitions are
then trained at once with method `spo` (`mmalign.t2i.spo`: their DDIM log-densities under the policy and the
LoRA-disabled reference, `spo_step_loss`). Everything else is the text-to-image task's (`task: t2i`): model, LoRA,
optimiser, checkpoints, validation grids and the exported LoRA.

- The sampling noise comes from the step's generator (one seed per prompt drawn from it), so a resumed run repeats
  the same trajectories.
- A micro-batch whose trajectories kept no transition is skipped and counted (`skipped/spo_no_pairs`); under DDP
  every process still runs its passes, with the loss times 0. Logged: `spo/pairs` (kept transitions per
  micro-batch), `spo/gap` (their mean probability gap) and the method's metrics.
- SPO's paper samples a batch and trains on it for several inner steps; here each sampled batch is trained on once
  (more steps = more fresh samples), and `train.batch_size` counts prompts, not transitions.
"""

from __future__ import annotations

from typing import Iterator, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mmalign.config import StrictModel
from mmalign.selfgen.spo import SPOSamplingConfig, StepScorer, resample
from mmalign.t2i.task import T2ITask, T2ITrainConfig, build_adapter
from mmalign.train.tasks import Built, SkipBatch
from mmalign.train.trainer import DataError, TrainingError


class SPOOnlineConfig(StrictModel):
    prompts: str = Field(..., description="Prompt file: one per line ('#' comments) or JSONL with 'prompt'.")
    scorer: str = Field(..., description="A step-aware preference model folder (kind step_aware) or any scorer spec "
                                         "(the same score at every step: SPO's ablation).")
    num_inference_steps: int = Field(20, gt=1, description="DDIM steps of each trajectory (SPO: 20).")
    guidance_scale: float = Field(5.0, ge=1.0, description="Classifier-free guidance while sampling and training.")
    eta: float = Field(1.0, gt=0.0, le=1.0, description="DDIM eta (SPO: 1).")
    k: int = Field(4, ge=2, description="Candidates per step (SPO: 4 for SD 1.5, 2 for SDXL).")
    divert_start: int = Field(4, ge=0, description="First step that branches (SPO: 4 of 20).")
    threshold: float = Field(0.3, ge=0.0, lt=1.0, description="Softmax gap to keep a transition (SPO: 0.3 SD 1.5, "
                                                              "0.4 SDXL).")
    score_scale: float = Field(1.0, gt=0, description="Multiplies scores before the softmax (1 for CLIP-style "
                                                      "scores with their logit scale).")
    max_prompts: Optional[int] = Field(None, gt=0)

    def sampling(self, batch_size: int) -> SPOSamplingConfig:
        cfg = SPOSamplingConfig(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                eta=self.eta, k=self.k, divert_start=self.divert_start, threshold=self.threshold,
                                score_scale=self.score_scale, batch_size=batch_size)
        cfg.check()
        return cfg


class SPOOnlineTrainConfig(T2ITrainConfig):
    """Online SPO: the text-to-image task's config with an `online` section and no data.shards."""

    task: Literal["spo_online"] = "spo_online"
    online: SPOOnlineConfig

    def makes_own_data(self) -> bool:
        return True

    @model_validator(mode="after")
    def _online(self) -> "SPOOnlineTrainConfig":
        if self.method.name != "spo" or self.data.schema_name != "step_pair":
            raise ValueError("task spo_online trains method.name 'spo' on the transitions it samples: set "
                             "method.name: spo and data.schema: step_pair")
        if self.data.shards is not None:
            raise ValueError("task spo_online samples its own transitions: set data.shards: null")
        self.online.sampling(self.train.batch_size)  # invalid combinations fail here
        return self


class OnlineSPO:
    """What the step needs: the adapter (with its transition scorer), the step-aware scorer, the sampling config."""

    def __init__(self, adapter, scorer: StepScorer, sampling: SPOSamplingConfig):
        self.adapter, self.scorer, self.sampling = adapter, scorer, sampling


def _collate(rows: list[dict], captions: list[str], sampling: SPOSamplingConfig) -> dict:
    return {"x_t": torch.stack([r["x_t"] for r in rows]), "x_w": torch.stack([r["x_w"] for r in rows]),
            "x_l": torch.stack([r["x_l"] for r in rows]),
            "timesteps": torch.tensor([r["timestep"] for r in rows]),
            "prev_timesteps": torch.tensor([r["prev_timestep"] for r in rows]),
            "num_inference_steps": torch.full((len(rows),), sampling.num_inference_steps),
            "eta": torch.full((len(rows),), float(sampling.eta)),
            "guidance_scale": torch.full((len(rows),), float(sampling.guidance_scale)),
            "captions": [captions[r["prompt_index"]] for r in rows],
            "keys": [f"{r['prompt_index']}-{r['step_index']}" for r in rows]}


def compute_loss(cfg: SPOOnlineTrainConfig, model: OnlineSPO, unet, unwrapped_unet, batch: dict,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Sample the prompts' trajectories with the current policy, keep SPO's step pairs, train on them."""
    from mmalign.methods import preference_loss

    captions = list(batch["captions"])
    seeds = torch.randint(0, 2 ** 62, (len(captions),), generator=generator).tolist()
    a = model.adapter
    was_training = unwrapped_unet.training
    unwrapped_unet.eval()
    try:
        rows = resample(a, model.scorer, captions, seeds, model.sampling,
                        scheduler=a.spo.scheduler(model.sampling.num_inference_steps))
    finally:
        unwrapped_unet.train(was_training)
    scale = 1.0
    if not rows:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if not distributed:
            raise SkipBatch("spo_no_pairs", f"prompts {list(batch['keys'])}: no step's probability gap exceeded "
                                            f"online.threshold {model.sampling.threshold}")
        # the ranks must run the same passes: a dummy transition from a fresh draw, weighted 0
        keep_all = SPOSamplingConfig(**{**model.sampling.__dict__, "threshold": -1.0, "batch_size": 1})
        rows = resample(a, model.scorer, captions[:1], seeds[:1], keep_all,
                        scheduler=a.spo.scheduler(model.sampling.num_inference_steps))[:1]
        scale = 0.0
    step_batch = _collate(rows, captions, model.sampling)
    surrogates = a.spo.surrogates(unet, step_batch, with_reference=True, unwrapped=unwrapped_unet)
    loss, metrics = preference_loss("spo", surrogates, beta=cfg.method.resolved_beta(), clip_eps=cfg.method.clip_eps)
    metrics["spo/pairs"] = torch.tensor(float(len(rows) if scale else 0))
    metrics["spo/gap"] = torch.tensor(sum(r["gap"] for r in rows) / len(rows))
    return (loss * scale if scale != 1.0 else loss), metrics


class SPOOnlineTask(T2ITask):
    """Online SPO; see the module docstring."""

    config_class = SPOOnlineTrainConfig
    compute_loss = staticmethod(compute_loss)

    def check_inputs(self) -> None:
        from pathlib import Path

        from mmalign.data.prompts import read_prompt_rows
        from mmalign.models.loading import read_model_index
        from mmalign.rewards.registry import SCORERS

        cfg = self.cfg
        read_model_index(cfg.model.pretrained, cfg.model.revision)
        if cfg.train.ema and cfg.model.lora is not None:
            raise TrainingError("train.ema is for full fine-tunes; with LoRA keep ema false")
        try:
            read_prompt_rows(cfg.online.prompts, limit=cfg.online.max_prompts)
        except (OSError, ValueError) as err:
            raise DataError(f"online.prompts: {err}") from None
        spec = cfg.online.scorer
        if not (Path(spec).is_dir() or spec.partition("=")[0] in SCORERS or ":" in spec):
            raise TrainingError(f"online.scorer {spec!r}: not a folder (a step-aware model) nor a scorer name of "
                                f"{sorted(SCORERS)} nor package.module:function")

    def build(self, device) -> Built:
        self.adapter = build_adapter(self.cfg, device)
        unet = self.adapter.c.unet
        scorer = StepScorer.load(self.cfg.online.scorer, device)
        params = [p for p in unet.parameters() if p.requires_grad]
        return Built(module=unet, params=params,
                     model=OnlineSPO(self.adapter, scorer, self.cfg.online.sampling(self.cfg.train.batch_size)))

    def batches(self, rank: int, world_size: int, skip: int) -> Iterator[dict]:
        from mmalign.data.prompts import prompt_batches

        o = self.cfg.online
        yield from prompt_batches(o.prompts, self.cfg.train.batch_size, seed=self.cfg.run.seed, rank=rank,
                                  world_size=world_size, skip=skip, limit=o.max_prompts)
