#!/usr/bin/env bash
# Fine-tune Wan (or any flow-matching pipeline) with Flow-DPO on VideoAlign-format preference data:
# a VideoAlign CSV (path_A, path_B, prompt, VQ, MQ, TA, ...) -> video_pair shards -> training.
# Run with --help for every knob; --dry-run prints the commands without running them.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/train_wan_flow_dpo.sh [options] [-- key=value ...]

Flow-DPO (or Flow-RWR / SFT: -- method.name=...) on VideoAlign-format pairs, in two steps:
  1. convert the VideoAlign CSV to webdataset shards (mmalign shards convert --from videoalign), unless the shard
     folder is already complete (it has manifest.json) or no --csv is given;
  2. launch training with `accelerate launch -m mmalign.cli train CONFIG ...`.

Options:
  --csv PATH             VideoAlign train CSV (columns path_A, path_B, prompt, VQ, MQ, TA, fps_A, num_frames_A,
                         fps_B, num_frames_B; labels A / B / same). Omit to use existing shards.
  --video-root DIR       folder the CSV's video paths are relative to (default: the CSV's folder).
  --shards DIR           shard folder: written by step 1, read by step 2 (default: data/videoalign/train).
  --limit N              convert only the first N rows (a quick trial run).
  --config FILE          training recipe (default: configs/flow/wan21_t2v_1.3b_flow_dpo_lora.yaml).
  --model ID|DIR         diffusers flow pipeline (hub id or folder); default: the recipe's model.pretrained.
  --output-dir DIR       run folder; default: the recipe's.
  --accelerate-config F  accelerate config (default: configs/accelerate/single_gpu.yaml; multi_gpu.yaml,
                         fsdp.yaml and deepspeed_zero2.yaml are next to it).
  --num-processes N      override the accelerate config's process count (GPUs).
  --resume               continue from the newest checkpoint in the run folder (run.resume=latest).
  --python EXE           Python interpreter with mmalign installed (default: $PYTHON or python).
  --dry-run              print the commands that would run, run nothing.
  -h, --help             this help.
  -- key=value ...       further recipe overrides, e.g. -- method.beta=200 data.num_frames=17

The video latent cache of the T2I recipes is not built for flow models yet: the VAE and text encoder run every
step (their cost is in docs/flow.md).

Examples:
  scripts/train_wan_flow_dpo.sh --csv videoalign/train.csv --video-root videoalign/videos \
      --accelerate-config configs/accelerate/multi_gpu.yaml
  scripts/train_wan_flow_dpo.sh --shards data/my_video_pairs -- method.name=flow_rwr method.temperature=0.5
USAGE
}

# shellcheck source=scripts/_launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"  # die, run, the shared options and their checks

csv=""
video_root=""
shards="data/videoalign/train"
config="configs/flow/wan21_t2v_1.3b_flow_dpo_lora.yaml"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --csv) need_value "$@"; csv="$2"; shift 2 ;;
    --video-root) need_value "$@"; video_root="$2"; shift 2 ;;
    *) parse_common_option "$@"; shift "$shift_by" ;;
  esac
done
check_common_options
[[ -z "$csv" || -f "$csv" ]] || die "--csv $csv: no such file"
[[ -z "$video_root" || -d "$video_root" ]] || die "--video-root $video_root: no such folder"

# 1. shards
if [[ -n "$csv" ]]; then
  if [[ -f "$shards/manifest.json" ]]; then
    echo "shards: $shards is complete (manifest.json); not converting again (delete it to reconvert)"
  else
    convert=("$python" -m mmalign.cli shards convert --from videoalign "$csv" --out "$shards")
    [[ -n "$video_root" ]] && convert+=(--video-root "$video_root")
    [[ -n "$limit" ]] && convert+=(--limit "$limit")
    run "${convert[@]}"
  fi
elif [[ ! -f "$shards/manifest.json" && $dry_run -eq 0 ]]; then
  die "--shards $shards has no manifest.json: pass --csv to convert a VideoAlign CSV, or point --shards at a shard set"
fi

# 2. training
start_train_command
train+=("data.shards=$shards")
[[ -n "$model" ]] && train+=("model.pretrained=$model")
[[ -n "$output_dir" ]] && train+=("run.output_dir=$output_dir")
[[ $resume -eq 1 ]] && train+=("run.resume=latest")
train+=(${overrides[@]+"${overrides[@]}"})
run "${train[@]}"
