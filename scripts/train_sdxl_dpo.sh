#!/usr/bin/env bash
# Fine-tune SDXL with preference pairs (Diffusion-DPO): Pick-a-Pic parquet -> shards -> (latent cache) -> training.
# Run with --help for every knob; --dry-run prints the commands without running them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/train_sdxl_dpo.sh [options] [-- key=value ...]

Fine-tune SDXL with Diffusion-DPO on preference pairs, in up to three steps:
  1. convert Pick-a-Pic parquet files to webdataset shards  (mmalign shards convert --from pickapic), unless the
     shard folder is already complete (it has manifest.json) or no --parquet is given;
  2. optionally encode every image and caption once into the latent + text-embedding cache
     (mmalign train CONFIG --cache-only), so training never runs the VAE or the text encoders;
  3. launch training with `accelerate launch -m mmalign.cli train CONFIG ...`.

Options:
  --parquet PATH         Pick-a-Pic parquet file or folder of them (repeatable). Omit to use existing shards.
  --shards DIR           shard folder: written by step 1, read by steps 2-3 (default: data/pickapic_v2/train).
  --limit N              convert only the first N parquet rows (a quick trial run); default: all rows.
  --config FILE          training recipe (default: configs/sdxl_dpo.yaml; configs/sdxl_dpo_lora.yaml for LoRA,
                         configs/sdxl_mapo.yaml for MaPO). Every key is documented in mmalign/train/config.py.
  --model ID|DIR         diffusers pipeline (hub id or folder); default: the recipe's model.pretrained.
  --output-dir DIR       run folder (config.yaml, metrics, checkpoints, final UNet or LoRA); default: the recipe's.
  --cache                build the latent cache (step 2) and train from it (data.cache=true). The cache holds one
                         encoding per image, so random flips are turned off (data.random_flip=false).
  --accelerate-config F  accelerate config (default: configs/accelerate/single_gpu.yaml; multi_gpu.yaml,
                         fsdp.yaml and deepspeed_zero2.yaml are next to it).
  --num-processes N      override the accelerate config's process count (GPUs). With scale_lr recipes the lr
                         scales with it; keep the total batch with train.gradient_accumulation_steps=...
  --resume               continue from the newest checkpoint in the run folder (run.resume=latest).
  --python EXE           Python interpreter with mmalign installed (default: $PYTHON or python).
  --dry-run              print the commands that would run, run nothing.
  -h, --help             this help.
  -- key=value ...       any further recipe overrides, e.g. -- train.max_steps=100 optim.lr=2e-8

Examples:
  scripts/train_sdxl_dpo.sh --parquet pickapic_v2/data --cache --accelerate-config configs/accelerate/multi_gpu.yaml
  scripts/train_sdxl_dpo.sh --shards data/my_pairs --config configs/sdxl_dpo_lora.yaml -- train.max_steps=500
EOF
}

# shellcheck source=scripts/_launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"  # die, run, the shared options and their checks

parquet=()
shards="data/pickapic_v2/train"
config="configs/sdxl_dpo.yaml"
cache=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --parquet) need_value "$@"; parquet+=("$2"); shift 2 ;;
    --cache) cache=1; shift ;;
    *) parse_common_option "$@"; shift "$shift_by" ;;
  esac
done
check_common_options

# Overrides shared by the cache and training steps: both must describe the same data and model.
common=("data.shards=$shards")
[[ -n "$model" ]] && common+=("model.pretrained=$model")
[[ $cache -eq 1 ]] && common+=("data.random_flip=false")
common+=(${overrides[@]+"${overrides[@]}"})

# 1. shards
if [[ ${#parquet[@]} -gt 0 ]]; then
  if [[ -f "$shards/manifest.json" ]]; then
    echo "shards: $shards is complete (manifest.json); not converting again (delete it to reconvert)"
  else
    convert=("$python" -m mmalign.cli shards convert --from pickapic "${parquet[@]}" --out "$shards" --ties drop)
    [[ -n "$limit" ]] && convert+=(--limit "$limit")
    run "${convert[@]}"
  fi
elif [[ ! -f "$shards/manifest.json" && $dry_run -eq 0 ]]; then
  die "--shards $shards has no manifest.json: pass --parquet to convert Pick-a-Pic, or point --shards at a shard set"
fi

# 2. latent + text-embedding cache
if [[ $cache -eq 1 ]]; then
  run "$python" -m mmalign.cli train "$config" --cache-only "${common[@]}"
fi

# 3. training
start_train_command
train+=("${common[@]}")
[[ $cache -eq 1 ]] && train+=("data.cache=true")
[[ -n "$output_dir" ]] && train+=("run.output_dir=$output_dir")
[[ $resume -eq 1 ]] && train+=("run.resume=latest")
run "${train[@]}"
