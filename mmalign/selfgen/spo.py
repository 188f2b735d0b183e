"""`mmalign selfgen spo`: SPO's step-wise resampler (Liang et al., CVPR 2025), writing `step_pair` shards.

For each prompt, a DDIM run with eta (`--eta`, SPO's 1) and classifier-free guidance (`--guidance-scale`) starts
from noise seeded by (seed, prompt index). Up to step `--divert-start` (SPO: 4 of 20) it samples as usual. From
there, at every step with a random transition:

1. draw k candidates `x_{t-1}` (`--k`; SD 1.5 4, SDXL 2) from the shared `x_t` with the DDIM transition
   (`mmalign.samplers.ddim`, the one training scores);
2. score each at its own noise level: the one-step clean estimate of the candidate (the generator's guided
   prediction at `t-1`, `predicted_x0`), decoded, scored by the step-aware preference model at `t-1` (or by a plain
   image scorer, SPO's "w/o step-aware" ablation: the same scorer at every step);
3. turn the k scores into probabilities, `softmax(score_scale · scores)`, and keep (best, worst) as a step pair when
   `max p - min p > --threshold` (SPO: 0.3 for SD 1.5, 0.4 for SDXL);
4. continue from a candidate chosen uniformly at random (not always the winner: the pool then covers the states the
   policy actually visits, as SPO's sampler does).

A step whose transition is deterministic (std 0: the last step of a scheduler with `set_alpha_to_one`) has no
density and is never a pair; nor is a step whose next timestep is below 0 (there is no model call at t < 0 to
score it). Rows: `(t, x_t, x_w, x_l, prompt, guidance, eta, scores)` in `step_pair` shards, the latents as the
sampler made them (float32).

Resume: each prompt's rows are staged in OUT/.staging (safetensors + JSON, written atomically) as soon as the
prompt is done; a rerun with the same settings skips staged prompts, another run's staging is refused. Several
processes (`accelerate launch -m mmalign.cli selfgen spo ...`): prompt i goes to process i mod N, and the main
process writes the shards once every process is done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from torch import Tensor

STAGING = ".staging"


@dataclass
class SPOSamplingConfig:
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    k: int = 4
    divert_start: int = 4
    threshold: float = 0.3
    score_scale: float = 1.0
    seed: int = 0
    batch_size: int = 4

    def check(self) -> None:
        if self.k < 2:
            raise ValueError(f"k {self.k}: SPO compares at least 2 candidates per step")
        if not 0 <= self.divert_start < self.num_inference_steps:
            raise ValueError(f"divert_start {self.divert_start}: must be in [0, num_inference_steps "
                             f"{self.num_inference_steps})")
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta {self.eta}: the transition needs noise, eta in (0, 1]")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold {self.threshold}: a probability gap in [0, 1)")


def prompt_seed(seed: int, index: int) -> int:
    """The noise seed of prompt `index`'s run (its candidates draw from the same generator, in order)."""
    return int(hashlib.sha256(f"spo:{seed}:{index}".encode()).hexdigest()[:15], 16)


class StepScorer:
    """`(images (N, 3, H, W) in [0, 1], prompts, t (N,) in [0, 1]) -> (N,)`: a step-aware model's score at the noise
    level t, or a plain image scorer's (which ignores t)."""

    def __init__(self, model):
        self.model = model
        self.step_aware = callable(getattr(model, "score", None)) and "t" in _parameters(model.score)
        self.name = getattr(model, "name", type(model).__name__)
        self.version = getattr(model, "version", "unversioned")

    @classmethod
    def load(cls, spec: str, device) -> "StepScorer":
        """A step-aware model folder (`mmalign_scorer.json` kind step_aware) or any `load_scorer` spec."""
        from mmalign.rewards.clip import read_scorer_card

        card = read_scorer_card(spec) if Path(spec).is_dir() else None
        if card is not None and card.get("kind") == "step_aware":
            from mmalign.rewards.step_aware import StepAwareScorer

            model = StepAwareScorer.from_pretrained(spec)
        else:
            from mmalign.rewards.registry import load_scorer

            model = load_scorer(spec)
        if getattr(model, "dims", None):
            raise ValueError(f"scorer {spec!r} gives several dimensions {list(model.dims)}; SPO needs one score")
        return cls(model.requires_grad_(False).eval().to(device))

    def __call__(self, images: Tensor, prompts: list[str], t: Tensor) -> Tensor:
        import torch

        with torch.no_grad():
            out = self.model.score(images, prompts, t) if self.step_aware else self.model.score(images, prompts)
        return out.float().reshape(-1)


def _parameters(fn) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(fn).parameters)


# -- the resampler -------------------------------------------------------------------------------------------------
def resample(adapter, scorer: Callable, prompts: Sequence[str], seeds: Sequence[int], cfg: SPOSamplingConfig,
             scheduler=None) -> list[dict[str, Any]]:
    """Step pairs of one batch of prompts (module docstring): a list of row dicts (latents on the CPU)."""
    import torch

    with torch.no_grad():
        return _resample(adapter, scorer, prompts, seeds, cfg, scheduler)


def _resample(adapter, scorer, prompts, seeds, cfg, scheduler, reuse_picked: bool = True) -> list[dict[str, Any]]:
    """`resample`'s loop. The candidates' predictions at `prev_t` (computed to score them) are also the next step's
    prediction of the candidate the trajectory continues from, so the next step reuses them (`reuse_picked`: one
    UNet pass of n prompts saved per branching step; off only to test that reuse changes nothing)."""
    import torch
    from mmalign.samplers.ddim import ddim_step_with_logprob
    from mmalign.samplers.diffusion import predicted_x0
    from mmalign.t2i.spo import ddim_scheduler, guided_prediction

    a, unet = adapter, adapter.c.unet
    device = next(unet.parameters()).device
    sched = scheduler or ddim_scheduler(a.c.pretrained, cfg.num_inference_steps)
    n, k = len(prompts), cfg.k
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = _latent_shape(a)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    cond = a.encode_text(list(prompts))
    cfg_on = cfg.guidance_scale > 1
    uncond = a.encode_text([""] * n) if cfg_on else None
    g_vec = torch.full((n,), float(cfg.guidance_scale))
    time_ids = _time_ids(a, n, shape)
    stride = sched.config.num_train_timesteps // cfg.num_inference_steps
    rows: list[dict[str, Any]] = []
    picked: tuple[int, Tensor] | None = None  # (its timestep, the picked candidates' prediction there)
    for i, t in enumerate(sched.timesteps):
        t_vec = t.expand(n).to(device)
        if picked is not None and picked[0] == int(t):
            pred = picked[1]
        else:
            pred = guided_prediction(a, unet, x, t_vec, cond, uncond, g_vec, time_ids)
        picked = None
        prev_t = int(t) - stride
        step = ddim_step_with_logprob(sched, pred, t_vec, x, eta=cfg.eta, generator=_cpu_draws(gens))
        deterministic = bool((step.std == 0).any())
        if i < cfg.divert_start or prev_t < 0 or deterministic:
            x = step.prev_sample
            continue
        cands = [step.prev_sample] + [ddim_step_with_logprob(sched, pred, t_vec, x, eta=cfg.eta,
                                                             generator=_cpu_draws(gens)).prev_sample
                                      for _ in range(k - 1)]
        flat = torch.cat(cands)  # (k·n, ...), candidate-major
        prev_vec = torch.full((k * n,), prev_t, device=device)
        pred_c = guided_prediction(a, unet, flat, prev_vec, cond.repeat(k), uncond.repeat(k) if cfg_on else None,
                                   g_vec.repeat(k), None if time_ids is None else time_ids.repeat(k, 1))
        abar = sched.alphas_cumprod[prev_t].item()
        x0 = predicted_x0(pred_c, flat.float(), abar, sched.config.prediction_type)
        images = _decode(a, x0)
        t_level = torch.full((k * n,), prev_t / sched.config.num_train_timesteps, device=device)
        scores = scorer(images, list(prompts) * k, t_level).view(k, n).cpu()
        probs = torch.softmax(cfg.score_scale * scores, dim=0)
        gap = probs.max(0).values - probs.min(0).values
        best, worst = scores.argmax(0), scores.argmin(0)
        stacked = torch.stack(cands)  # (k, n, ...)
        for b in range(n):
            if gap[b] > cfg.threshold:
                rows.append({"prompt_index": b, "x_t": x[b].float().cpu(), "x_w": stacked[best[b], b].float().cpu(),
                             "x_l": stacked[worst[b], b].float().cpu(), "timestep": int(t), "prev_timestep": prev_t,
                             "step_index": i, "scores_w": float(scores[best[b], b]),
                             "scores_l": float(scores[worst[b], b]), "gap": float(gap[b])})
        pick = torch.stack([torch.randint(k, (1,), generator=g) for g in gens]).view(-1)  # uniform, per prompt
        x = stacked[pick, torch.arange(n)]
        if reuse_picked:
            picked = (prev_t, pred_c.view(k, n, *pred_c.shape[1:])[pick, torch.arange(n)])
    return rows


def _cpu_draws(gens: list):
    return gens if len(gens) > 1 else gens[0]


def _latent_shape(adapter) -> tuple[int, ...]:
    unet, res = adapter.c.unet, adapter.resolution
    if res is None:
        raise ValueError("the adapter needs its resolution (T2IAdapter(resolution=...))")
    factor = 1 if adapter.c.vae is None else 2 ** (len(adapter.c.vae.config.block_out_channels) - 1)
    return (unet.config.in_channels, res // factor, res // factor)


def _time_ids(adapter, n: int, shape) -> Tensor | None:
    import torch

    if not adapter.c.is_sdxl:
        return None
    size = adapter.resolution
    sizes = torch.tensor([[size, size]] * n)
    return adapter.time_ids(sizes, torch.zeros_like(sizes), (size, size))


def _decode(adapter, x0: Tensor) -> Tensor:
    """Clean latents -> images (N, 3, H, W) in [0, 1]."""
    vae = adapter.c.vae
    if vae is None:
        x = x0
    else:
        z = x0 / adapter.vae_scale + adapter.vae_shift
        x = vae.decode(z.to(vae.device, vae.dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


# -- the command ---------------------------------------------------------------------------------------------------
def build_step_pairs(pretrained: str, scorer_spec: str, prompts: Sequence[str], out_dir: str | Path,
                     cfg: SPOSamplingConfig, *, resolution: int, device: str | None = None, overwrite: bool = False,
                     max_count: int = 1000, progress: bool = True) -> dict:
    """Run the resampler over `prompts` (resumable, multi-process under accelerate) and write `step_pair`
    shards to `out_dir`; returns a summary {"prompts", "rows", "rows_per_step"}."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from mmalign.selfgen.common import open_stage
    from mmalign.t2i.adapter import T2IAdapter, load_t2i_components
    from mmalign.t2i.spo import ddim_scheduler

    cfg.check()
    state = PartialState(cpu=device == "cpu")
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds a shard set; pass --overwrite to replace it")
    stage = out / STAGING
    key = {"model": pretrained, "scorer": scorer_spec, "resolution": resolution, "settings": asdict(cfg),
           "prompts": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()}
    if state.is_main_process:
        open_stage(stage, key, overwrite, _key_changes, "prompts", "mmalign.selfgen.spo")
    state.wait_for_everyone()
    comps = load_t2i_components(pretrained, resolution=resolution)
    dev = state.device
    for module in [m for m in (comps.unet, comps.vae, *comps.text_encoders) if m is not None]:
        module.to(dev).requires_grad_(False).eval()
    adapter = T2IAdapter(comps, reference="none", resolution=resolution)
    scorer = StepScorer.load(scorer_spec, dev)
    sched = ddim_scheduler(pretrained, cfg.num_inference_steps)
    mine = [i for i in range(len(prompts)) if i % state.num_processes == state.process_index
            and not (stage / f"{i:09d}.json").is_file()]
    bar = tqdm(total=len(mine), desc=f"selfgen spo [{state.process_index}]", disable=not progress, unit="prompt")
    for start in range(0, len(mine), cfg.batch_size):
        chunk = mine[start:start + cfg.batch_size]
        rows = resample(adapter, scorer, [prompts[i] for i in chunk], [prompt_seed(cfg.seed, i) for i in chunk],
                        cfg, scheduler=sched)
        for b, i in enumerate(chunk):
            _stage_prompt(stage, i, prompts[i], [r for r in rows if r["prompt_index"] == b])
        bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    summary = {}
    if state.is_main_process:
        summary = _write_shards(stage, prompts, out, cfg, pretrained, scorer, overwrite, max_count)
        shutil.rmtree(stage)
    state.wait_for_everyone()
    return summary


def _key_changes(staged: Any, now: dict) -> list[str]:
    """What differs between a staged run's key and this run's, in words."""
    if not isinstance(staged, dict):
        return ["settings (its run.json is missing or unreadable)"]
    return ["settings (" + ", ".join(f"{k}: {staged.get(k)} -> {now.get(k)}" for k in now
                                     if staged.get(k) != now.get(k)) + ")"]


def _stage_prompt(stage: Path, index: int, prompt: str, rows: list[dict]) -> None:
    """One prompt's rows: the latents in a safetensors file, the rest in JSON (the JSON is written last and marks
    the prompt done)."""
    from safetensors.torch import save_file

    from mmalign.config import atomic_write_text

    if rows:
        tensors = {f"{j}.{name}": r[name].contiguous() for j, r in enumerate(rows) for name in ("x_t", "x_w", "x_l")}
        tmp = stage / f"{index:09d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(stage / f"{index:09d}.safetensors")
    meta = [{k: v for k, v in r.items() if k not in ("x_t", "x_w", "x_l", "prompt_index")} for r in rows]
    atomic_write_text(stage / f"{index:09d}.json", json.dumps({"prompt": prompt, "rows": meta}))


def _write_shards(stage: Path, prompts: Sequence[str], out: Path, cfg: SPOSamplingConfig, pretrained: str,
                  scorer: StepScorer, overwrite: bool, max_count: int) -> dict:
    from safetensors.torch import load_file

    from mmalign.data.schemas import step_pair_sample
    from mmalign.data.writer import ShardSetWriter

    per_step: dict[int, int] = {}
    total = 0
    with ShardSetWriter(out, "step_pair", max_count=max_count, overwrite=overwrite) as writer:
        for i, prompt in enumerate(prompts):
            record = json.loads((stage / f"{i:09d}.json").read_text())
            if record["prompt"] != prompt:
                raise ValueError(f"{stage}: prompt {i} was staged as {record['prompt']!r}, now {prompt!r}")
            tensors = load_file(str(stage / f"{i:09d}.safetensors")) if record["rows"] else {}
            for j, row in enumerate(record["rows"]):
                writer.write(step_pair_sample(
                    f"{i:09d}-{row['step_index']:03d}", tensors[f"{j}.x_t"], tensors[f"{j}.x_w"], tensors[f"{j}.x_l"],
                    prompt=prompt, timestep=row["timestep"], prev_timestep=row["prev_timestep"],
                    step_index=row["step_index"], num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale, eta=cfg.eta, scores_w=row["scores_w"],
                    scores_l=row["scores_l"], seed=prompt_seed(cfg.seed, i),
                    provenance={"origin": "self", "dataset": "selfgen spo"}))
                per_step[row["step_index"]] = per_step.get(row["step_index"], 0) + 1
                total += 1
        writer.set_conversion({"from": "selfgen spo", "model": pretrained, "scorer": scorer.name,
                               "scorer_version": scorer.version, "step_aware": scorer.step_aware, **asdict(cfg),
                               "num_prompts": len(prompts), "rows": total})
        writer.close()
    return {"prompts": len(prompts), "rows": total, "rows_per_step": dict(sorted(per_step.items()))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers SD / SDXL pipeline folder or hub id (or the toy's)")
    parser.add_argument("--scorer", required=True, help="step-aware model folder (kind step_aware) or any scorer "
                                                        "spec of `mmalign score` (the same score at every step)")
    parser.add_argument("--prompts", required=True, help="prompt file (one per line, or JSONL with 'prompt')")
    parser.add_argument("--out", required=True, help="output shard folder (step_pair)")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (SPO: 20)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=4, help="candidates per step (SPO: 4 for SD 1.5, 2 for SDXL)")
    parser.add_argument("--divert-start", type=int, default=4, help="first step that branches (SPO: 4 of 20)")
    parser.add_argument("--threshold", type=float, default=0.3, help="softmax gap to keep a pair (SPO: 0.3 SD 1.5, "
                                                                     "0.4 SDXL)")
    parser.add_argument("--score-scale", type=float, default=1.0,
                        help="multiplies scores before the softmax (1 for CLIP-style scores with their logit scale; "
                             "larger for rewards in [0, 1])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per batch")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu to force the CPU")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def run(args: argparse.Namespace) -> int:
    from mmalign.data.prompts import read_prompt_rows

    try:
        prompts = [p for p, _ in read_prompt_rows(args.prompts, limit=args.max_prompts)]
        cfg = SPOSamplingConfig(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                                k=args.k, divert_start=args.divert_start, threshold=args.threshold,
                                score_scale=args.score_scale, seed=args.seed, batch_size=args.batch_size)
        cfg.check()
    except (OSError, ValueError) as err:
        print(f"mmalign selfgen spo: {err}", file=sys.stderr)
        return 2
    summary = build_step_pairs(args.model, args.scorer, prompts, args.out, cfg, resolution=args.resolution,
                               device=args.device, overwrite=args.overwrite, progress=args.progress)
    if summary:
        print(json.dumps(summary))
    return 0
