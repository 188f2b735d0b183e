"""Text-to-image outputs: the trained model in the format diffusers reads, and validation grids.

Full fine-tune: `unet/` (`UNet2DConditionModel.from_pretrained`); LoRA: `lora/`, the format
`pipeline.load_lora_weights(folder)` reads, with its peft config (alpha, rank, targets) in the file's header; the
model card `README.md` and the Hub upload (`run.push_to_hub`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmalign.models.loading import read_model_index
from mmalign.models.lora import LORA_METADATA_KEYS, lora_metadata  # noqa: F401 (LORA_METADATA_KEYS: re-exported)
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
        # The adapter's peft LoraConfig (rank, alpha, targets, ...) goes into the safetensors header, which
        # `load_lora_weights` reads back: without it diffusers infers alpha = rank (scale 1), and a LoRA trained
        # with alpha != rank would load scaled by rank / alpha.
        metadata = lora_metadata(unet)
        atomic_dir(run_dir / "lora", lambda d: pipe_cls.save_lora_weights(str(d), unet_lora_layers=layers,
                                                                          unet_lora_adapter_metadata=metadata))
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


def build_pipeline(adapter: T2IAdapter, unet, pretrained: str, revision: str | None = None):
    """A diffusers pipeline around the (policy) UNet with the pipeline's own inference scheduler."""
    import diffusers

    index = read_model_index(pretrained, revision)
    sched_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = sched_cls.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
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
    """Fixed prompts and seeds -> `samples/step-XXXXXX.png` grid (rows = prompts, each image captioned with its
    prompt and seed, the step as title) and TensorBoard."""
    from mmalign.grids import captioned_grid

    v = cfg.validation
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(adapter, unet, cfg.model.pretrained, cfg.model.revision)
    pipe.set_progress_bar_config(disable=True)
    images, captions = [], []
    res = cfg.data.resolution
    for i, prompt in enumerate(v.prompts):
        for j in range(v.images_per_prompt):
            seed = v.seed + 1000 * i + j
            gen = torch.Generator().manual_seed(seed)
            images += pipe(prompt, num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                           height=res, width=res, generator=gen).images
            captions.append(f"{prompt}\nseed {seed}")
    unet.train(was_training)
    grid = captioned_grid(np.stack([np.asarray(im.convert("RGB")) for im in images]), captions,
                          cols=v.images_per_prompt, scale=max(1, 128 // res), title=f"step {step}")
    path = run_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    logger.image("validation/grid", np.asarray(grid), step)
    return str(path)


# -- model card and hub upload -----------------------------------------------------------------------------------------
CARD_GRID = "validation_grid.png"
METHOD_TITLES = {"dpo": "Diffusion-DPO", "mapo": "MaPO", "rankdpo": "RankDPO", "sft": "supervised fine-tuning"}


def _metric_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _base_model_line(pretrained: str) -> list[str]:
    """The card's `base_model:` line: only a Hub id (the Hub refuses a commit whose card names a local folder as
    base_model), quoted so YAML reads it as a string."""
    import json

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(pretrained).exists():
        return []
    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        return []
    return [f"base_model: {json.dumps(pretrained)}"]


def write_model_card(cfg: T2ITrainConfig, run_dir: Path, grid: str | None = None) -> Path:
    """`run_dir/README.md`, a Hugging Face model card as diffusers' training scripts write it: YAML front matter
    (base model, tags) and what was trained on what, how, with the final metrics and the last validation grid
    (copied next to the card as `validation_grid.png`)."""
    import shutil

    from mmalign.config import atomic_write_text
    from mmalign.train.metrics import read_metrics

    m, meth, d, t = cfg.model, cfg.method, cfg.data, cfg.train
    lora = m.lora
    index = read_model_index(m.pretrained, m.revision)
    sdxl = "text_encoder_2" in index
    pipe_name = index.get("_class_name", "")
    if not pipe_name.startswith("StableDiffusion"):
        pipe_name = "DiffusionPipeline"
    title = METHOD_TITLES.get(meth.name, meth.name)
    tags = ["text-to-image", "diffusers", "diffusers-training", "lora" if lora else "full-fine-tune", "mmalign",
            meth.name, "stable-diffusion-xl" if sdxl else "stable-diffusion"]
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    steps = int(last.get("step", t.max_steps))
    if grid:
        shutil.copyfile(grid, run_dir / CARD_GRID)
    try:
        from accelerate import PartialState

        processes = PartialState().num_processes
    except Exception:  # noqa: BLE001 - no accelerate state outside a run
        processes = 1
    beta = f"{meth.resolved_beta():g}" if meth.name in ("dpo", "rankdpo", "mapo") else "n/a"
    if lora:
        what = (f"LoRA: rank {lora.rank}, alpha {lora.alpha if lora.alpha is not None else lora.rank:g} "
                f"(scale {(lora.alpha or lora.rank) / lora.rank:g}), "
                + (f"dropout {lora.dropout:g} (training only), " if lora.dropout else "")
                + "targets " + ", ".join(f"`{x}`" for x in lora.target_modules))
    else:
        what = "full fine-tune of the UNet" + (f", EMA weights (decay {t.ema_decay:g}; the raw weights are in "
                                               "`unet_non_ema/`)" if t.ema else "")
    if lora:
        lora_at = cfg.run.hub_model_id or str(run_dir / "lora")
        use = f"pipe = {pipe_name}.from_pretrained({m.pretrained!r})\npipe.load_lora_weights({lora_at!r})"
    else:
        unet_at = (f"{cfg.run.hub_model_id!r}, subfolder='unet'" if cfg.run.hub_model_id
                   else repr(str(run_dir / "unet")))
        use = (f"unet = UNet2DConditionModel.from_pretrained({unet_at})\n"
               f"pipe = {pipe_name}.from_pretrained({m.pretrained!r}, unet=unet)")
    lines = ["---", *_base_model_line(m.pretrained), "library_name: diffusers", "pipeline_tag: text-to-image",
             "tags:", *[f"- {x}" for x in tags], "---", "",
             f"# {title} {'LoRA' if lora else 'fine-tune'} of {m.pretrained}", "",
             f"Trained with mmalign ({title}, `method.name: {meth.name}`); the resolved config is the run's "
             "`config.yaml`.",
             "", "## Training", "", "| | |", "|---|---|",
             f"| base model | `{m.pretrained}`" + (f" (revision `{m.revision}`)" if m.revision else "") + " |",
             f"| method | `{meth.name}`, loss_type `{meth.loss_type}`, β {beta}"
             + (f", label smoothing {meth.label_smoothing:g}" if meth.label_smoothing else "") + " |",
             f"| weights | {what} |",
             f"| data | `{d.shards}` (schema `{d.schema_name}`), resolution {d.resolution} |",
             f"| steps | {steps} optimizer steps, batch {t.batch_size} x {t.gradient_accumulation_steps} accumulation "
             f"x {processes} processes |",
             f"| optimizer | {cfg.optim.name}, lr {cfg.optim.lr:g} ({cfg.optim.lr_scheduler}) |",
             f"| precision | {t.mixed_precision} |", f"| seed | {cfg.run.seed} |", ""]
    if last:
        lines += [f"## Final metrics (step {steps})", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {_metric_value(v)} |" for k, v in last.items() if k != "step"], ""]
    if grid:
        v = cfg.validation
        lines += ["## Samples", "", f"![validation grid]({CARD_GRID})", "",
                  f"Rows: {'; '.join(repr(p) for p in v.prompts)}; {v.images_per_prompt} seeds each, "
                  f"{v.num_inference_steps} steps, guidance {v.guidance_scale:g}.", ""]
    lines += ["## Use", "", "```python", f"from diffusers import {pipe_name}"
              + ("" if lora else ", UNet2DConditionModel"), "", use, "```", ""]
    path = run_dir / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def push_to_hub(repo_id: str, run_dir: Path, outputs: dict[str, str]) -> str:
    """Upload the trained model and its card to the Hub repo `repo_id` in one commit: a LoRA's files at the repo
    root (`pipe.load_lora_weights(repo_id)`), a full fine-tune's `unet/` (and `unet_non_ema/`) as folders, with
    `README.md` and the validation grid. Returns the commit URL; any failure is a TrainingError naming the repo and
    the local folder (the run's outputs stay on disk either way)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = []
    for name in ("README.md", CARD_GRID):
        if (run_dir / name).is_file():
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run_dir / name)))
    folders = [("lora", "")] if "lora" in outputs else [("unet", "unet/"), ("unet_non_ema", "unet_non_ema/")]
    for folder, prefix in folders:
        root = run_dir / folder
        if root.is_dir():
            ops += [CommitOperationAdd(path_in_repo=prefix + f.relative_to(root).as_posix(),
                                       path_or_fileobj=str(f)) for f in sorted(root.rglob("*")) if f.is_file()]
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message="mmalign: trained model and model card",
                                 repo_type="model")
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode: one clear message
        raise TrainingError(f"run.push_to_hub: uploading {run_dir} to the Hub repo {repo_id!r} failed "
                            f"({type(err).__name__}: {err}). The trained model and README.md are saved in {run_dir}: "
                            "upload them later (`hf upload`), or check network, token (`hf auth login`, HF_TOKEN) "
                            "and HF_HUB_OFFLINE") from err
    return str(getattr(info, "commit_url", info))
