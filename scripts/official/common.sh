# Shared by scripts/official/eval_<run>.sh (source it; do not run it): convert one released Any2Point
# checkpoint, then evaluate it with the official test protocol of its preset (cfgs/official/<run>.yaml).
#
# Usage: scripts/official/eval_<run>.sh RELEASED.pth [DATA_ROOT] [--dry-run]
#   RELEASED.pth  the file from the official README's "Ckpt Release" table
#   DATA_ROOT     the dataset folder (default: the preset's dataset.root, under data/)
#   --dry-run     print the two commands instead of running them
# Environment:
#   SOURCE  the frozen source's weight file (default: the preset's model.source.pretrained, under ckpts/)
#   OUT     where the converted checkpoint goes, under the repository root unless absolute
#           (default experiments/official)
#   PYTHON  the interpreter (default python)
set -euo pipefail

OFFICIAL_OUT="${OUT:-experiments/official}"
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"   # ROOT, PYTHON and run()
OUT="$OFFICIAL_OUT"

# A path given relative to the caller's folder, made absolute (the commands run from the repository root).
absolute() {
  if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

# eval_official RUN [script arguments ...]
eval_official() {
  local name="$1"
  shift
  local args=()
  DRY_RUN=0
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) awk '/^#/ {print; next} {exit}' "$ROOT/scripts/official/common.sh" | tail -n +4 | sed 's/^# \{0,1\}//'; exit 0 ;;
      -*) echo "error: unknown option '$arg' (only --dry-run)" >&2; exit 2 ;;
      *) args+=("$arg") ;;
    esac
  done
  if [[ ${#args[@]} -lt 1 || ${#args[@]} -gt 2 ]]; then
    echo "error: usage: $0 RELEASED.pth [DATA_ROOT] [--dry-run]" >&2
    exit 2
  fi
  local overrides=() source=()
  if [[ ${#args[@]} == 2 ]]; then overrides+=("dataset.root=$(absolute "${args[1]}")"); fi
  if [[ -n "${SOURCE:-}" ]]; then source=(--source "$(absolute "$SOURCE")"); fi
  run "$PYTHON" tools/convert_ckpt.py --official "$(absolute "${args[0]}")" --run "$name" --out "$OUT/$name.pth" "${source[@]}" \
    "${overrides[@]}"
  run "$PYTHON" main.py --test --ckpt "$OUT/$name.pth"
}
