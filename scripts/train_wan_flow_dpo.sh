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

die() { echo "train_wan_flow_dpo.sh: $*" >&2; exit 2; }

csv=""
video_root=""
shards="data/videoalign/train"
limit=""
config="configs/flow/wan21_t2v_1.3b_flow_dpo_lora.yaml"
model=""
output_dir=""
accel_config="configs/accelerate/single_gpu.yaml"
num_processes=""
resume=0
python="${PYTHON:-python}"
dry_run=0
overrides=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --csv) need_value "$@"; csv="$2"; shift 2 ;;
    --video-root) need_value "$@"; video_root="$2"; shift 2 ;;
    --shards) need_value "$@"; shards="$2"; shift 2 ;;
    --limit) need_value "$@"; [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--limit must be a positive integer, got '$2'"
             limit="$2"; shift 2 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --model) need_value "$@"; model="$2"; shift 2 ;;
    --output-dir) need_value "$@"; output_dir="$2"; shift 2 ;;
    --accelerate-config) need_value "$@"; accel_config="$2"; shift 2 ;;
    --num-processes) need_value "$@"; [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$2'"
                     num_processes="$2"; shift 2 ;;
    --resume) resume=1; shift ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

for o in ${overrides[@]+"${overrides[@]}"}; do
  [[ "$o" == *=* && "$o" != -* ]] || die "override '$o' is not of the form key=value"
done
[[ -f "$config" ]] || die "--config $config: no such recipe file"
[[ -f "$accel_config" ]] || die "--accelerate-config $accel_config: no such file"
[[ -z "$csv" || -f "$csv" ]] || die "--csv $csv: no such file"
[[ -z "$video_root" || -d "$video_root" ]] || die "--video-root $video_root: no such folder"

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

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
train=(accelerate launch --config_file "$accel_config")
[[ -n "$num_processes" ]] && train+=(--num_processes "$num_processes")
train+=(-m mmalign.cli train "$config" "data.shards=$shards")
[[ -n "$model" ]] && train+=("model.pretrained=$model")
[[ -n "$output_dir" ]] && train+=("run.output_dir=$output_dir")
[[ $resume -eq 1 ]] && train+=("run.resume=latest")
train+=(${overrides[@]+"${overrides[@]}"})
run "${train[@]}"
