"""One trainer on accelerate for every text-to-image recipe: config -> adapter + loss + data + optimizer.

The training step is explicit code (`compute_loss`): encode (or read cached) latents and text, noise each pair
or ranked list with one shared timestep and noise, get policy (and reference) errors from the adapter, and hand
them to a pure loss from `mmalign.losses`. The loop around it handles accumulation, mixed precision, clipping,
non-finite steps, logging, validation grids, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmalign.adapters.t2i import T2IAdapter, TextConditioning, load_t2i_components
from mmalign.config import write_resolved_config
from mmalign.losses import diffusion_dpo_loss, dpo_loss, mapo_loss, ranked_dpo_loss
from mmalign.train import checkpoint as ckpt
from mmalign.train.config import TrainConfig
from mmalign.train.metrics import MetricsLogger


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator seeded from (seed, optimizer step, micro-batch, rank): timesteps, noise, latent draws and
    empty-prompt choices depend only on where the run is, which makes resume exact without replaying RNGs."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainState:
    global_step: int = 0
    micro_step: int = 0  # micro-batches consumed from the data stream (data position)
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def build_adapter(cfg: TrainConfig, device: torch.device) -> T2IAdapter:
    """Load components, attach LoRA if asked, and build the reference the method needs."""
    m = cfg.model
    comps = load_t2i_components(m.pretrained, revision=m.revision, variant=m.variant, unet_path=m.unet)
    if comps.is_sdxl and cfg.data.resolution % 16:
        raise TrainingError(f"data.resolution {cfg.data.resolution} is not a multiple of 16, which SDXL needs")
    weight_dtype = _weight_dtype(cfg.train.mixed_precision)
    for module in [comps.vae, *comps.text_encoders]:
        module.to(device, dtype=weight_dtype if weight_dtype != torch.float16 else torch.float32)
    needs_reference = cfg.method.name in ("dpo", "rankdpo")
    unet = comps.unet
    if m.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    if m.lora is not None:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha or m.lora.rank,
                                    lora_dropout=m.lora.dropout, init_lora_weights="gaussian",
                                    target_modules=m.lora.target_modules))
        for p in unet.parameters():  # trainable LoRA params stay float32 under mixed precision
            if p.requires_grad:
                p.data = p.data.float()
        reference = "disabled_adapters" if needs_reference else None
        ref_dtype = None
    else:
        unet.to(device)
        unet.requires_grad_(True)
        reference = "frozen_copy" if needs_reference else None
        ref_dtype = weight_dtype if m.reference_dtype == "auto" else getattr(torch, m.reference_dtype)
    if m.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    adapter = T2IAdapter(comps, reference=reference, reference_dtype=ref_dtype,
                         offload_reference=m.offload_reference)
    if adapter.ref_unet is not None and not m.offload_reference:
        adapter.ref_unet.to(device)
    return adapter


def build_optimizer(cfg: TrainConfig, params: list[Tensor], num_processes: int):
    o = cfg.optim
    lr = o.lr
    if o.scale_lr:
        lr = lr * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * num_processes
    if o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise TrainingError("optim.name 'adamw8bit' needs bitsandbytes: pip install 'mmalign[gpu]'") from err
        opt = bnb.optim.AdamW8bit(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    else:
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                        weight_decay=o.weight_decay)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler(o.lr_scheduler, optimizer=opt, num_warmup_steps=o.lr_warmup_steps,
                          num_training_steps=cfg.train.max_steps)
    return opt, sched, lr


# -- the training step -----------------------------------------------------------------------------------------
def prepare_inputs(cfg: TrainConfig, adapter: T2IAdapter, batch: dict, generator: torch.Generator,
                   empty_cond: TextConditioning | None, device) -> tuple[Tensor, TextConditioning, Tensor | None]:
    """Batch -> grouped latents (K, B, C, h, w), conditioning (B, ...), SDXL time_ids (B, 6) or None.

    Accepts raw batches (`pixel_values`, `captions`) and cached ones (`latent_params`, `prompt_embeds`).
    """
    if "latent_params" in batch:  # cached: (K, B, 2C, h, w) posterior parameters
        posterior = batch["latent_params"].to(device)
        cond = TextConditioning(batch["prompt_embeds"].to(device),
                                batch["pooled"].to(device) if batch.get("pooled") is not None else None)
        k, b = posterior.shape[:2]
    else:
        pixels = batch["pixel_values"]
        if pixels.ndim == 5:  # ranked (B, K, 3, H, W) -> (K, B, ...)
            pixels = pixels.transpose(0, 1)
        else:  # pairs [winners; losers] (2B, 3, H, W)
            pixels = pixels.view(2, -1, *pixels.shape[1:])
        k, b = pixels.shape[:2]
        posterior = adapter.encode_images(pixels.reshape(k * b, *pixels.shape[2:]).to(device))
        posterior = posterior.view(k, b, *posterior.shape[1:])
        cond = adapter.encode_text(list(batch["captions"]))
    p_empty = cfg.data.proportion_empty_prompts
    if p_empty > 0:
        drop = torch.rand(b, generator=generator) < p_empty
        if drop.any():
            assert empty_cond is not None
            cond.prompt_embeds[drop.to(device)] = empty_cond.prompt_embeds.to(cond.prompt_embeds.dtype)
            if cond.pooled is not None:
                cond.pooled[drop.to(device)] = empty_cond.pooled.to(cond.pooled.dtype)
    latents = adapter.sample_latents(posterior, generator)
    time_ids = None
    if adapter.c.is_sdxl:
        res = cfg.data.resolution
        time_ids = adapter.time_ids(batch["original_sizes"], batch["crop_top_lefts"], (res, res)).to(device)
    return latents, cond, time_ids


def compute_loss(cfg: TrainConfig, adapter: T2IAdapter, unet, unwrapped_unet, batch: dict,
                 generator: torch.Generator, empty_cond: TextConditioning | None = None,
                 device="cpu") -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch: surrogates from the adapter, loss from `mmalign.losses`."""
    method = cfg.method
    latents, cond, time_ids = prepare_inputs(cfg, adapter, batch, generator, empty_cond, device)
    with_ref = method.name in ("dpo", "rankdpo")
    policy, ref, _ = adapter.group_errors(unet, latents, cond, time_ids, generator, with_ref, unwrapped_unet)
    beta = method.resolved_beta()
    if method.name == "dpo":
        if method.label_smoothing > 0:
            # Diffusion-DPO is DPO on surrogates -err with beta/2 (see diffusion_dpo_loss).
            loss, metrics = dpo_loss(-policy[0], -policy[1], -ref[0], -ref[1], beta / 2, method.loss_type,
                                     method.label_smoothing)
        else:
            loss, metrics = diffusion_dpo_loss(policy[0], policy[1], ref[0], ref[1], beta, method.loss_type)
    elif method.name == "mapo":
        loss, metrics = mapo_loss(policy[0], policy[1], beta=beta, snr_value=method.mapo_snr_value,
                                  num_train_timesteps=adapter.c.noise_scheduler.config.num_train_timesteps)
    elif method.name == "rankdpo":
        scores = batch["scores"].to(device)
        loss, metrics = ranked_dpo_loss(policy.T, ref.T, scores, beta=beta, weighting=method.rank_weighting)
    elif method.name == "sft":
        loss = policy[0].mean()
        metrics = {}
    else:
        raise TrainingError(f"unknown method.name {method.name!r}")
    metrics = dict(metrics)
    metrics["mse/policy_chosen"] = policy[0].mean().detach()
    if policy.shape[0] > 1:
        metrics["mse/policy_rejected"] = policy[1:].mean().detach()
    if ref is not None:
        metrics["mse/ref_chosen"] = ref[0].mean().detach()
        metrics["mse/ref_rejected"] = ref[1:].mean().detach()
    return loss, metrics


# -- the loop --------------------------------------------------------------------------------------------------
def _check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    if cfg.run.resume is None and ckpt.list_checkpoints(run_dir) and not cfg.run.overwrite:
        raise TrainingError(f"run.output_dir {run_dir} already has checkpoints; resume with run.resume=latest, "
                            "choose another run.output_dir, or set run.overwrite=true")


@dataclass
class TrainResult:
    global_step: int
    metrics: dict[str, float]  # the last logged row
    run_dir: str
    outputs: dict[str, str]  # "unet" / "lora" / "grid" -> path
    skipped_samples: int
    nonfinite_steps: int
    unet: torch.nn.Module  # the trained (unwrapped) UNet of this process
    keys_seen: list[str]  # sample keys this process consumed, in order


def train(cfg: TrainConfig) -> TrainResult:
    """Run a recipe (the library entry point behind `mmalign train`)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir = Path(cfg.run.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              mixed_precision=cfg.train.mixed_precision,
                              cpu=not torch.cuda.is_available())
    device = accelerator.device
    if accelerator.is_main_process:
        _check_run_dir(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, run_dir)
    torch.manual_seed(cfg.run.seed)

    adapter = build_adapter(cfg, device)
    unet = adapter.c.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_scheduler, lr = build_optimizer(cfg, params, accelerator.num_processes)
    ema = None
    if cfg.train.ema:
        if cfg.model.lora is not None:
            raise TrainingError("train.ema is for full fine-tunes; with LoRA keep ema false")
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay)
        ema.to(device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    unwrapped = accelerator.unwrap_model(unet)

    state = TrainState()
    resume_from = ckpt.resolve_resume(run_dir, cfg.run.resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        saved = ckpt.read_state(resume_from)
        state = TrainState(**saved)
        accelerator.print(f"resumed from {resume_from} at step {state.global_step}")
    elif cfg.run.resume not in (None, "latest"):
        raise TrainingError(f"run.resume {cfg.run.resume}: no checkpoint found")

    empty_cond = None
    if cfg.data.proportion_empty_prompts > 0:
        empty_cond = adapter.encode_text([""])
        empty_cond = TextConditioning(empty_cond.prompt_embeds[0], None if empty_cond.pooled is None
                                      else empty_cond.pooled[0])

    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, start_step=state.global_step)
    from mmalign.train.data import iterate_batches

    batches = iterate_batches(cfg, accelerator.process_index, accelerator.num_processes, skip=state.micro_step)
    progress = tqdm(total=cfg.train.max_steps, initial=state.global_step, desc="train",
                    disable=not (cfg.train.progress and accelerator.is_local_main_process))
    last_metrics: dict[str, float] = {}
    window_samples, window_start = 0, time.perf_counter()
    micro_in_step = 0
    keys_seen: list[str] = []
    while state.global_step < cfg.train.max_steps:
        batch = next(batches)
        keys_seen.extend(batch.get("keys", []))
        state.micro_step += 1
        state.skipped_samples += int(batch.get("skipped", 0))
        gen = step_generator(cfg.run.seed, state.global_step, micro_in_step, accelerator.process_index)
        micro_in_step += 1
        with accelerator.accumulate(unet):
            with accelerator.autocast():
                loss, metrics = compute_loss(cfg, adapter, unet, unwrapped, batch, gen, empty_cond, device)
            finite = torch.tensor(float(torch.isfinite(loss).item()), device=device)
            all_finite = bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)
            if all_finite:
                accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                if all_finite and cfg.optim.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                if all_finite:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        window_samples += len(batch["keys"]) * accelerator.num_processes
        if not all_finite:
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            if state.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise TrainingError(f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss "
                                    f"(last at step {state.global_step}); lower optim.lr, check the data, or "
                                    "use mixed_precision=bf16 instead of fp16")
        else:
            state.consecutive_nonfinite = 0
        if not accelerator.sync_gradients:
            continue
        micro_in_step = 0
        state.global_step += 1
        if ema is not None and all_finite:
            ema.step(unwrapped.parameters())
        progress.update(1)
        if state.global_step % cfg.train.log_every == 0 or state.global_step == cfg.train.max_steps:
            elapsed = time.perf_counter() - window_start
            row = {k: float(accelerator.reduce(v.detach().float().to(device), reduction="mean").item())
                   for k, v in sorted(metrics.items())}
            row["loss"] = float(accelerator.reduce(loss.detach().float(), reduction="mean").item()) \
                if all_finite else float("nan")
            row["lr"] = lr_scheduler.get_last_lr()[0]
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row["samples_per_s"] = window_samples / max(elapsed, 1e-9)
            row["skipped_samples"] = state.skipped_samples
            row["nonfinite_steps"] = state.nonfinite_steps
            logger.log(state.global_step, row)
            last_metrics = row
            progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}")
            window_samples, window_start = 0, time.perf_counter()
        every = cfg.train.checkpoint_every
        if every and state.global_step % every == 0 and state.global_step < cfg.train.max_steps:
            save_training_checkpoint(cfg, accelerator, run_dir, state)
        vevery = cfg.validation.every
        if vevery and state.global_step % vevery == 0 and cfg.validation.prompts \
                and state.global_step < cfg.train.max_steps:
            run_validation(cfg, adapter, unwrapped, run_dir, state.global_step, accelerator, logger)
    progress.close()
    save_training_checkpoint(cfg, accelerator, run_dir, state)
    outputs = save_final_model(cfg, adapter, unwrapped, ema, run_dir, accelerator)
    if cfg.validation.prompts:
        outputs["grid"] = run_validation(cfg, adapter, unwrapped, run_dir, state.global_step, accelerator, logger)
    logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(state.global_step, last_metrics, str(run_dir), outputs, state.skipped_samples,
                       state.nonfinite_steps, unwrapped, keys_seen)


def save_training_checkpoint(cfg: TrainConfig, accelerator, run_dir: Path, state: TrainState) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_checkpoint(run_dir, state.global_step, lambda tmp: accelerator.save_state(str(tmp)),
                             state.__dict__.copy(), cfg.train.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def save_final_model(cfg: TrainConfig, adapter: T2IAdapter, unet, ema, run_dir: Path, accelerator) -> dict:
    """Full fine-tune: `unet/` in diffusers format. LoRA: `lora/` in the format `load_lora_weights` reads."""
    out: dict[str, str] = {}
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out
    if cfg.model.lora is not None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        pipe_cls = StableDiffusionXLPipeline if adapter.c.is_sdxl else StableDiffusionPipeline
        _atomic_dir(run_dir / "lora", lambda d: pipe_cls.save_lora_weights(str(d), unet_lora_layers=layers))
        out["lora"] = str(run_dir / "lora")
    else:
        if ema is not None:
            _atomic_dir(run_dir / "unet_non_ema", lambda d: unet.save_pretrained(str(d)))
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            try:
                _atomic_dir(run_dir / "unet", lambda d: unet.save_pretrained(str(d)))
            finally:
                ema.restore(unet.parameters())
        else:
            _atomic_dir(run_dir / "unet", lambda d: unet.save_pretrained(str(d)))
        out["unet"] = str(run_dir / "unet")
    return out


def _atomic_dir(final: Path, write) -> None:
    import shutil

    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_pipeline(adapter: T2IAdapter, unet, pretrained: str):
    """A diffusers pipeline around the (policy) UNet with the pipeline's own inference scheduler."""
    import diffusers

    from mmalign.adapters.t2i import read_model_index

    index = read_model_index(pretrained)
    sched_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = sched_cls.from_pretrained(pretrained, subfolder="scheduler")
    c = adapter.c
    if c.is_sdxl:
        return diffusers.StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0],
                                                   text_encoder_2=c.text_encoders[1], tokenizer=c.tokenizers[0],
                                                   tokenizer_2=c.tokenizers[1], unet=unet, scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def run_validation(cfg: TrainConfig, adapter: T2IAdapter, unet, run_dir: Path, step: int, accelerator,
                   logger: MetricsLogger) -> str | None:
    """Fixed prompts and seeds -> `samples/step-XXXXXX.png` grid (rows = prompts) and TensorBoard."""
    if not accelerator.is_main_process:
        return None
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
