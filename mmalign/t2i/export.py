"""Text-to-image outputs: the trained model in the format diffusers reads, and validation grids.

Full fine-tune: `unet/` (`UNet2DConditionModel.from_pretrained`); LoRA: `lora/`, the format
`pipeline.load_lora_weights(folder)` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmalign.models.loading import read_model_index
from mmalign.t2i.adapter import T2IAdapter
from mmalign.train.checkpoint import atomic_dir
from mmalign.train.metrics import MetricsLogger
from mmalign.train.trainer import TrainingError

if TYPE_CHECKING:
    from mmalign.t2i.task import T2ITrainConfig


def save_final_model(cfg: T2ITrainConfig, adapter: T2IAdapter, unet, ema, run_dir: Path,
                     state_dict: dict | None = None) -> dict[str, str]:
    """Full fine-tune: `unet/` in diffusers format (with EMA: the EMA weights, and `unet_non_ema/`). LoRA: `lora/`
    in the format `pipeline.load_lora_weights(folder)` reads.

    `state_dict`: the full weights of a UNet trained sharded (FSDP), gathered by the loop; `unet` then holds only
    this process's shards and cannot be saved itself, so the weights go into a plain UNet of the same config.
    """
    if state_dict is not None:
        if ema is not None:  # the loop refuses this before training (T2ITask.check_sharded)
            raise TrainingError("train.ema is not supported with sharded weights (FSDP / DeepSpeed ZeRO-3)")
        if cfg.model.lora is None:
            from diffusers import UNet2DConditionModel

            with torch.device("meta"):
                plain = UNet2DConditionModel.from_config(unet.config)
            plain.load_state_dict(state_dict, assign=True)
            atomic_dir(run_dir / "unet", lambda d: plain.save_pretrained(str(d)))
            return {"unet": str(run_dir / "unet")}
    if cfg.model.lora is not None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from peft.utils import get_peft_model_state_dict

        # PEFT-format keys, not `convert_state_dict_to_diffusers`: that converts only attention projections, and
        # a mix of old-format attention keys with PEFT-format conv keys loads the attention LoRA wrongly.
        layers = get_peft_model_state_dict(unet, state_dict=state_dict)
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        pipe_cls = StableDiffusionXLPipeline if adapter.c.is_sdxl else StableDiffusionPipeline
        atomic_dir(run_dir / "lora", lambda d: pipe_cls.save_lora_weights(str(d), unet_lora_layers=layers))
        return {"lora": str(run_dir / "lora")}
    if ema is not None:
        atomic_dir(run_dir / "unet_non_ema", lambda d: unet.save_pretrained(str(d)))
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        try:
            atomic_dir(run_dir / "unet", lambda d: unet.save_pretrained(str(d)))
        finally:
            ema.restore(unet.parameters())
    else:
        atomic_dir(run_dir / "unet", lambda d: unet.save_pretrained(str(d)))
    return {"unet": str(run_dir / "unet")}


def build_pipeline(adapter: T2IAdapter, unet, pretrained: str):
    """A diffusers pipeline around the (policy) UNet with the pipeline's own inference scheduler."""
    import diffusers

    index = read_model_index(pretrained)
    sched_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = sched_cls.from_pretrained(pretrained, subfolder="scheduler")
    c = adapter.c
    if index.get("_class_name") == "ToyT2IPipeline":
        from mmalign.toy.pipeline import ToyT2IPipeline

        return ToyT2IPipeline(unet=unet, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                              scheduler=scheduler)
    if c.is_sdxl:
        return diffusers.StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0],
                                                   text_encoder_2=c.text_encoders[1], tokenizer=c.tokenizers[0],
                                                   tokenizer_2=c.tokenizers[1], unet=unet, scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def run_validation(cfg: T2ITrainConfig, adapter: T2IAdapter, unet, run_dir: Path, step: int,
                   logger: MetricsLogger) -> str:
    """Fixed prompts and seeds -> `samples/step-XXXXXX.png` grid (rows = prompts) and TensorBoard."""
    from diffusers.utils import make_image_grid

    v = cfg.validation
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(adapter, unet, cfg.model.pretrained)
    pipe.set_progress_bar_config(disable=True)
    images = []
    res = cfg.data.resolution
    for i, prompt in enumerate(v.prompts):
        for j in range(v.images_per_prompt):
            gen = torch.Generator().manual_seed(v.seed + 1000 * i + j)
            images += pipe(prompt, num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                           height=res, width=res, generator=gen).images
    unet.train(was_training)
    grid = make_image_grid(images, rows=len(v.prompts), cols=v.images_per_prompt)
    path = run_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    logger.image("validation/grid", np.asarray(grid), step)
    return str(path)
