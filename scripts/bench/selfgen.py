"""Benchmark: STIC pairs per second, batched generation vs one prompt at a time, in one run on the same model.

Both variants are mmalign's own `stic_pairs` (chosen + rejected answer per image, corruptions applied) on the same
images with the same seed; only `batch_size` differs: (a) 1 = one prompt per `generate` call, (b) `--batch` prompts
per call with left padding and the KV cache. Greedy decoding and a fixed `max_new_tokens` (EOS disabled with
EOS suppressed unless `--eos`, so both variants generate exactly the same number of tokens). Prints pairs/s and the
ratio b / a (target >= 3x).

    python scripts/bench/selfgen.py                          # the shipped toy VLM (or a tiny LLaVA), on CPU
    python scripts/bench/selfgen.py --model llava-hf/llava-v1.6-mistral-7b-hf --device cuda --dtype bfloat16 \
        --images 64 --batch 16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "assets" / "toy" / "vlm"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="VLM folder / hub id; default: assets/toy/vlm, else a tiny LLaVA")
    ap.add_argument("--images", type=int, default=48, help="toy scenes to make pairs from")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--eos", action="store_true", help="stop at EOS (token counts may then differ per variant)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per variant (the best is reported)")
    args = ap.parse_args(argv)

    import torch

    from mmalign.vlm.adapter import load_vlm
    from mmalign.vlm.stic import STICConfig, stic_pairs, toy_image_items

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        if (TOY / "config.json").is_file():
            model = str(TOY)
        else:
            from mmalign.vlm.tiny import build_tiny_vlm

            model = str(build_tiny_vlm(Path(tempfile.mkdtemp()) / "llava", "llava"))
    adapter = load_vlm(model, dtype=args.dtype, device=args.device)
    if not args.eos:
        # EOS is suppressed until max_new_tokens (transformers' min_new_tokens), so both variants make the same tokens.
        adapter.model.generation_config.min_new_tokens = args.max_new_tokens
    items = toy_image_items(args.images, seed=0)

    def run(batch_size: int) -> tuple[float, int]:
        best, pairs = float("inf"), 0
        for _ in range(args.repeats):
            cfg = STICConfig(batch_size=batch_size, max_new_tokens=args.max_new_tokens, seed=0)
            t = time.perf_counter()
            out = list(stic_pairs(adapter, items, cfg))
            best = min(best, time.perf_counter() - t)
            pairs = len(out) + sum(v for k, v in cfg.counts.items() if k.startswith("skipped"))
        return best, pairs

    run(min(args.batch, 4))  # warm-up (first calls pay one-off costs)
    t_single, n = run(1)
    t_batched, n_b = run(args.batch)
    assert n == n_b == args.images
    result = {"model": model, "device": args.device, "images": args.images, "batch": args.batch,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              "one_at_a_time_pairs_per_s": round(n / t_single, 2), "batched_pairs_per_s": round(n / t_batched, 2),
              "ratio": round(t_single / t_batched, 2)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
