#!/usr/bin/env bash
# The paper's Table 2 (PEFT methods, ScanObjectNN PB-T50-RS): the 10 configs of cfgs/paper/table2/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table2.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 2 "$@"
