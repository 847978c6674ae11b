#!/usr/bin/env bash
# An ablation table of the paper: every config in cfgs/paper/table<N>/, over SEEDS, then its table
# (one row per config, named table<N>_<config name>), beside the paper's numbers.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/ablation.sh N [--dry-run]
source "$(dirname "$0")/lib.sh"
TABLE="${1:-}"
if ! [[ "$TABLE" =~ ^[0-9]+$ ]]; then
  echo "error: give the table number first, e.g. bash scripts/ablation.sh 4 [--dry-run]; tables:" \
    $(cd "$ROOT/cfgs/paper" 2>/dev/null && ls -d table* 2>/dev/null | sed 's/table//') >&2
  exit 2
fi
shift
parse_args "$@"
shopt -s nullglob
configs=("$ROOT"/cfgs/paper/table"$TABLE"/*.yaml)
if [[ ${#configs[@]} == 0 ]]; then
  echo "error: no configs in cfgs/paper/table$TABLE/" >&2
  exit 2
fi
for config in "${configs[@]}"; do
  stem="$(basename "$config" .yaml)"
  seeds_of "cfgs/paper/table$TABLE/$stem.yaml" "table${TABLE}_$stem"
done
collect "table$TABLE" --paper
