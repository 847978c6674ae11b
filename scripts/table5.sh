#!/usr/bin/env bash
# The paper's Table 5 (guidance of the adapter's local aggregation): the 6 configs of cfgs/paper/table5/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table5.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 5 "$@"
