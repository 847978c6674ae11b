# Shared by the experiment scripts in this folder (source it; do not run it).
#
# Environment:
#   SEEDS   seeds to run, space-separated (default "0 1 2")
#   GPUS    processes per run: 1 = plain python, N > 1 = torchrun --standalone --nproc_per_node=N
#   EXTRA   config overrides added to every run, e.g. EXTRA="train.epochs=10 train.batch_size=16"
#   OUT     experiments folder (default experiments)
#   VOTE    N > 1: also test each run's best checkpoint with N-pass voting (results_voteN.json)
#   PYTHON  the interpreter (default python)
# Arguments: --dry-run prints the commands instead of running them.
# A run whose folder already holds ckpt-last.pth is continued with --resume (a finished run is only
# tested again), so a killed script can simply be started again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="${SEEDS:-0 1 2}"
GPUS="${GPUS:-1}"
EXTRA="${EXTRA:-}"
OUT="${OUT:-experiments}"
VOTE="${VOTE:-1}"
PYTHON="${PYTHON:-python}"
DRY_RUN=0
RUNS=()

parse_args() {
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) grep '^#' "$0" | tail -n +2 | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "error: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
    esac
  done
  if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then echo "error: GPUS must be a positive integer, got '$GPUS'" >&2; exit 2; fi
  if ! [[ "$VOTE" =~ ^[1-9][0-9]*$ ]]; then echo "error: VOTE must be a positive integer, got '$VOTE'" >&2; exit 2; fi
}

# Print a command (shell-quoted), or run it from the repository root.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    (cd "$ROOT" && "$@")
  fi
}

launcher() {
  if [[ $GPUS == 1 ]]; then echo "$PYTHON"; else echo "torchrun --standalone --nproc_per_node=$GPUS"; fi
}

# train_run CONFIG NAME SEED [override ...]: train (or resume) one run, then vote if VOTE > 1.
train_run() {
  local config="$1" name="$2" seed="$3"
  shift 3
  local resume=()
  local folder="$OUT/$name"
  [[ "$OUT" == /* ]] || folder="$ROOT/$folder"
  [[ -f "$folder/ckpt-last.pth" ]] && resume=(--resume)
  # shellcheck disable=SC2046,SC2086
  run $(launcher) main.py --config "$config" "${resume[@]}" "experiment.name=$name" "experiment.output_dir=$OUT" \
    "experiment.seed=$seed" "$@" $EXTRA
  if [[ $VOTE -gt 1 ]]; then
    # shellcheck disable=SC2046
    run $(launcher) main.py --test --ckpt "$OUT/$name/ckpt-best.pth" --vote "$VOTE" --results "results_vote$VOTE.json"
  fi
  RUNS+=("$OUT/$name")
}

# seeds_of CONFIG NAME [override ...]: train_run for every seed, named NAME_seed<S>.
seeds_of() {
  local config="$1" name="$2"
  shift 2
  for seed in $SEEDS; do
    train_run "$config" "${name}_seed$seed" "$seed" "$@"
  done
}

# collect TABLE [collect_results args ...]: the table of this script's runs, into $OUT/tables/TABLE.{md,csv}.
collect() {
  local table="$1"
  shift
  local file=results.json
  [[ $VOTE -gt 1 ]] && file="results_vote$VOTE.json"
  run "$PYTHON" tools/collect_results.py "${RUNS[@]}" --file "$file" --markdown "$OUT/tables/$table.md" \
    --csv "$OUT/tables/$table.csv" "$@"
}
