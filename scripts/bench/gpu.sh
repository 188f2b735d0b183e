#!/usr/bin/env bash
# The prepared GPU benchmark suite: one H100 / H200, random weights, nothing downloaded, under 12 minutes (the rows
# before wan under 8; wan runs last: `--rows wan` runs it alone).
# Prints one table (T2I Diffusion-DPO steps for SDXL at 1024 px and SD 1.5 at 512 px, three ways each; Wan-2.1-1.3B
# Flow-DPO steps on 33-frame 480 px clips, the same three ways; HPS-sized scoring batched vs one at a time; a
# LLaVA-1.5-7B-shaped VLM DPO step): s/step or images/s, peak GB, counted TFLOP and MFU. See
# scripts/bench/gpu_suite.py for what each row measures.
#
#   bash scripts/bench/gpu.sh --out runs/gpu_bench      # also writes gpu_bench.md, gpu_bench.json, logs/
#   bash scripts/bench/gpu.sh --tiny                    # the same rows, tiny models on the CPU (the CI dry run)
#   bash scripts/bench/gpu.sh --help                    # rows, deadline, peak FLOP/s override, sizes
#
# Works from a checkout without installing mmalign: the repository root goes on PYTHONPATH. The interpreter is
# $PYTHON, else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$ROOT/scripts/bench/gpu_suite.py" "$@"
