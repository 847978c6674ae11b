#!/usr/bin/env bash
# The paper's Table 10 (cell pooling and view ensemble): the 6 configs of cfgs/paper/table10/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table10.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 10 "$@"
