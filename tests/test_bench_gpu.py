"""The GPU benchmark suite's CPU dry run: `bash scripts/bench/gpu.sh --tiny` runs every row with tiny models, so a
row that breaks (an API moved, a config key renamed) fails here before anyone spends GPU time on it. Wall-clock
numbers are not asserted, only that every cell holds a number and the numbers hang together."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^-?[\d,]*\.?\d+(e[-+]?\d+)?")


def number(cell: str) -> float:
    match = NUMBER.match(cell.strip())
    assert match, f"not a number: {cell!r}"
    return float(match.group(0).replace(",", ""))


def test_gpu_suite_tiny_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bench" / "gpu.sh"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"

    text = (tmp_path / "gpu_bench.md").read_text()
    assert text in proc.stdout  # the printed table is the written one
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| row ")]
    labels = [r[0] for r in rows]
    expected = [("SDXL 32 px", v) for v in ("(a) naive", "(b) cached", "(c) LoRA")]
    expected += [("SD 1.5 32 px", v) for v in ("(a) naive", "(b) cached", "(c) LoRA")]
    expected += [("Wan 32 px, 9 frames", v) for v in ("(a) naive", "(b) cached", "(c) LoRA")]
    expected += [("HPS", "one image at a time"), ("HPS", "batches of 8"), ("VLM DPO", "LoRA r 128")]
    expected += [(f"guidance {pipe}", v) for pipe in ("toy", "tiny SD 1.5")
                 for v in ("unguided", "latent", "pixel, x0", "pixel, model")]
    for head, variant in expected:
        assert sum(head in label and variant in label for label in labels) == 1, (head, variant, labels)
    assert len(rows) == len(expected)
    for label, speed, ratio, peak, tflop, mfu in rows:
        assert not speed.startswith(("failed", "skipped")), (label, speed)
        if label.startswith("guidance"):
            # Cost against unguided sampling of the same pipeline, no FLOP count.
            assert speed.endswith("s/img") and number(speed) > 0 and number(ratio) > 0, (label, speed)
            assert (number(ratio) == 1.0) == label.endswith("unguided"), label
            continue
        assert speed.endswith("s/step" if "VLM" in label or " px" in label else "img/s"), (label, speed)
        assert number(speed) > 0 and number(peak) >= 0 and number(tflop) > 0 and number(mfu) >= 0, label
        if "VLM" not in label:
            assert number(ratio) > 0, label
        if "(a) naive" in label or "one image at a time" in label:
            assert number(ratio) == 1.0, label

    raw = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert raw["meta"]["tiny"] and raw["meta"]["peak_tflops"] > 0
    results = {(r["row"], r["variant"]): r for r in raw["results"]}
    assert all(r["status"] == "ok" and (r["row"] == "guide" or r["mfu"] > 0) for r in results.values())
    for row in ("sdxl", "sd15", "wan"):
        naive, cached, lora = (results[row, v] for v in ("naive", "cached", "lora"))
        # (a) runs the VAE and text encoders inside the step: more counted FLOPs than the cached step (b).
        assert naive["flops"] > cached["flops"], row
        # LoRA trains a small fraction of the UNet's / transformer's parameters; the full fine-tunes train all.
        assert cached["extra"]["trainable"] == naive["extra"]["trainable"]
        assert lora["extra"]["trainable"] < 0.2 * cached["extra"]["trainable"]
        for r in (naive, cached, lora):
            assert r["mfu"] == pytest.approx(r["flops"] / r["value"] / (raw["meta"]["peak_tflops"] * 1e12))
    # Scoring a batch encodes each distinct prompt once: fewer FLOPs per image than one at a time.
    assert results["hps", "batched"]["flops"] < results["hps", "one"]["flops"]
    vlm = results["vlm", "lora"]["extra"]
    assert vlm["params_with_grad"] > 0 and 0 < vlm["trainable"] < vlm["parameters"]
    # 2 pairs: their prompts hold the image's 64 tokens (32 px / 4 px patches) before the 8-word answers.
    assert vlm["tokens_per_sequence"] > 64 + 8
