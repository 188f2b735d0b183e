"""Benchmark: images/s of the batched scorer (text encoded once per distinct prompt of a batch) against a loop
that scores one image at a time and re-encodes its prompt each time (how the reference HPSv2 package scores:
`model(preprocess(image), tokenizer([prompt]))` per image). Same tiny CLIP model, same images, same run.

    python scripts/bench/score.py                         # tiny model on CPU
    python scripts/bench/score.py --device cuda --n 1024 --batch-size 64

Prints both throughputs and their ratio (target >= 3x). The images mimic a ranked set: `--k` images per prompt.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images to score (256)")
    parser.add_argument("--k", type=int, default=4, help="images per prompt (4)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batched call (32)")
    parser.add_argument("--image-size", type=int, default=64, help="model input side (64)")
    parser.add_argument("--width", type=int, default=64, help="transformer width of both towers (64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks per tower (2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the best is reported (3)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from mmalign.rewards.clip import pickscore
    from mmalign.rewards.tiny import build_tiny_clip
    from mmalign.toy import all_prompts

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_clip(tmp, image_size=args.image_size, patch_size=16, width=args.width, layers=args.layers,
                        embed_dim=args.width // 2)
        scorer = pickscore(tmp).to(args.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)) for _ in range(args.n)]
    prompts = [all_prompts()[i // args.k % len(all_prompts())] for i in range(args.n)]

    def batched() -> torch.Tensor:
        return torch.cat([scorer.score(images[i:i + args.batch_size], prompts[i:i + args.batch_size])
                          for i in range(0, args.n, args.batch_size)])

    def one_at_a_time() -> torch.Tensor:
        return torch.cat([scorer.score([im], [p]) for im, p in zip(images, prompts)])

    results = {}
    with torch.inference_mode():
        reference = one_at_a_time()  # warm-up, and the two variants must agree
        if not torch.allclose(batched(), reference, atol=1e-4, rtol=1e-4):
            raise SystemExit("batched and one-at-a-time scores differ: the benchmark compares different work")
        for name, fn in (("one image at a time, prompt re-encoded", one_at_a_time),
                         (f"batched ({args.batch_size}), text once per distinct prompt", batched)):
            best = float("inf")
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            results[name] = args.n / best
    base, fast = results.values()
    print(f"tiny CLIP scorer ({args.image_size}px, width {args.width}, {args.layers} blocks) on {args.device}, "
          f"{args.n} images, {args.k} per prompt")
    for name, ips in results.items():
        print(f"  {name:<48} {ips:9.1f} images/s")
    print(f"  ratio batched / one-at-a-time: {fast / base:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
