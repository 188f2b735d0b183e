# Shared by the training launchers (scripts/train_sdxl_dpo.sh, scripts/train_wan_flow_dpo.sh); sourced, not run.
# It holds the options every launcher takes (their defaults below), the checks on them, `run` (print a command,
# then run it unless --dry-run) and the start of the `accelerate launch` command. A launcher sets its own defaults
# for shards and config after sourcing, parses its own options first and hands the rest to `parse_common_option`.

die() { echo "${0##*/}: $*" >&2; exit 2; }

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

shards=""
limit=""
config=""
model=""
output_dir=""
accel_config="configs/accelerate/single_gpu.yaml"
num_processes=""
resume=0
python="${PYTHON:-python}"
dry_run=0
overrides=()

# One option every launcher takes, from "$@"; sets `shift_by` to the arguments it used (the rest after `--`: all
# of them). Dies on an option it does not know.
parse_common_option() {
  shift_by=2
  case "$1" in
    --shards) need_value "$@"; shards="$2" ;;
    --limit) need_value "$@"; [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--limit must be a positive integer, got '$2'"
             limit="$2" ;;
    --config) need_value "$@"; config="$2" ;;
    --model) need_value "$@"; model="$2" ;;
    --output-dir) need_value "$@"; output_dir="$2" ;;
    --accelerate-config) need_value "$@"; accel_config="$2" ;;
    --num-processes) need_value "$@"; [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$2'"
                     num_processes="$2" ;;
    --resume) resume=1; shift_by=1 ;;
    --python) need_value "$@"; python="$2" ;;
    --dry-run) dry_run=1; shift_by=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides+=("$@"); shift_by=$(( $# + 1 )) ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
}

# The checks every launcher makes before running anything.
check_common_options() {
  local o
  for o in ${overrides[@]+"${overrides[@]}"}; do
    [[ "$o" == *=* && "$o" != -* ]] || die "override '$o' is not of the form key=value"
  done
  [[ -f "$config" ]] || die "--config $config: no such recipe file"
  [[ -f "$accel_config" ]] || die "--accelerate-config $accel_config: no such file"
}

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

# train = (accelerate launch --config_file F [--num_processes N] -m mmalign.cli train CONFIG); the launcher adds
# its overrides.
start_train_command() {
  train=(accelerate launch --config_file "$accel_config")
  [[ -n "$num_processes" ]] && train+=(--num_processes "$num_processes")
  train+=(-m mmalign.cli train "$config")
}
