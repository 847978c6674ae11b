#!/usr/bin/env bash
# The paper's Table 8 (2D virtual projection: views): the 5 configs of cfgs/paper/table8/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table8.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 8 "$@"
