"""Pretrain the toy VLM shipped in `assets/toy/vlm/`: a tiny LLaVA that captions toy scenes and hallucinates colour.

    nice -n 15 python scripts/pretrain_toy_vlm.py --out assets/toy/vlm

What it does (seeded; the same command gives the same weights on the same machine and library versions):
a tiny `LlavaForConditionalGeneration` (`mmalign.vlm.tiny.tiny_llava`: CLIP tower 64 wide with 64 image tokens,
Llama 128 wide, 2 + 2 layers, byte-level BPE vocabulary of 400) is trained with the response-only SFT loss on a
small *fixed* set of scenes (default 2,000) whose captions name the true colour with probability 0.6
(`mmalign.toy.scenes.noisy_caption`), for many epochs. Because the true colour stays the most frequent label, a model
that generalised would rarely hallucinate under greedy decoding; memorising the fixed noisy labels is what makes it
name a wrong colour on held-out scenes (see shared/TOY-NOTES.md). The script ends with an evaluation on held-out
scenes and writes `pretrain_info.json` (arguments, runtime, metrics) beside the weights.

Runtime at the defaults (1,813 steps of batch 64, one torch thread): 0.15-0.4 s/step on an idle core; the shipped
weights took 31 minutes (1,838 s) under `nice -n 15` on a 2-core machine shared with other jobs (load ~10).
Shipped result (256 held-out scenes, `pretrain_info.json`): greedy colour hallucination 10.5% (SE 1.9),
sampling-based 36.2%, shape 99.6%, position 99.2%, well-formed captions 100%.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="assets/toy/vlm", help="output folder (model + processor + pretrain_info.json)")
    ap.add_argument("--num-scenes", type=int, default=2000, help="size of the fixed noisy training set")
    ap.add_argument("--p-true", type=float, default=0.6, help="probability a caption names the true colour")
    ap.add_argument("--epochs", type=float, default=58.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-scenes", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from mmalign.vlm.adapter import load_vlm
    from mmalign.vlm.tiny import build_tiny_vlm
    from mmalign.vlm.toy import evaluate_toy, heldout_scenes, toy_training_data

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_vlm(tmp, "llava", seed=args.seed)
    # Train through the same loading and tokenisation code every VLM recipe uses.
    adapter = load_vlm(str(tmp), train_vision=True, train_projector=True, train_llm=True)
    model = adapter.model
    data = toy_training_data(args.num_scenes, seed=args.seed, p_true=args.p_true)
    inputs = adapter.encode(data.prompts, [[im] for im in data.images], data.captions)
    n = args.num_scenes
    steps = math.ceil(args.epochs * n / args.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    bar = tqdm(range(steps), desc="pretrain toy VLM")
    for step in bar:
        if pos + args.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos: pos + args.batch_size]
        pos += args.batch_size
        batch = {k: v[idx] for k, v in inputs.model_inputs.items()}
        mask = inputs.labels_mask[idx]
        # Trim the batch's right padding.
        length = int(batch["attention_mask"].sum(1).max())
        batch = {k: (v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}
        mask = mask[:, :length]
        logits = model(**batch, use_cache=False).logits
        from mmalign.vlm.logprobs import response_logps

        lp = response_logps(logits, batch["input_ids"], mask)
        loss = -lp.sum.sum() / lp.count.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    train_seconds = time.perf_counter() - t0
    metrics = evaluate_toy(adapter, heldout_scenes(args.eval_scenes))
    train_metrics = evaluate_toy(adapter, data.scenes[: args.eval_scenes])
    model.save_pretrained(tmp)
    info = {"args": vars(args), "steps": steps, "final_loss": float(loss.item()), "train_seconds": train_seconds,
            "heldout": metrics, "train_subset": train_metrics,
            "command": "python scripts/pretrain_toy_vlm.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__}
    (tmp / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"heldout": metrics, "train_seconds": round(train_seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
