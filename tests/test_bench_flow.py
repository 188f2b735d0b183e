"""The flow step benchmark's smoke run (`scripts/bench/flow_step.py`, tiny configuration, 1 warm-up + 1 timed step):
the three variants run through mmalign's flow task and their numbers hang together. Wall-clock times are not
asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flow_step_benchmark_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "flow_step.py"), "--configs", "tiny",
                           "--steps", "1", "--warmup", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "flow_step.md").read_text()
    assert text in proc.stdout
    [result] = json.loads((tmp_path / "flow_step.json").read_text())["results"]
    naive, cached, lora = result["variants"]
    assert [r["variant"] for r in (naive, cached, lora)] == ["naive", "cached", "lora"]
    for r, label in zip((naive, cached, lora), ("(a) naive", "(b) cached", "(c) LoRA")):
        assert sum(line.startswith(f"| {label}") for line in text.splitlines()) == 1, label
        assert r["s_per_step"] > 0 and r["flops_per_step"] > 0 and r["params_with_grad"] > 0, r
    assert naive["x_naive_time"] == 1.0
    # The cache replaces the VAE and text encoder inside the step (fewer counted FLOPs) and changes nothing else:
    # the same batches and generator give the same loss after the same AdamW step, bit for bit.
    assert naive["flops_per_step"] > cached["flops_per_step"]
    assert cached["loss"] == naive["loss"] and abs(naive["loss"] - 0.693147) < 1e-3
    assert cached["trainable"] == naive["trainable"] == naive["transformer_parameters"]
    assert 0 < lora["trainable"] < 0.2 * cached["trainable"]  # rank 4 on the attention projections
