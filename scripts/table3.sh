#!/usr/bin/env bash
# The paper's Table 3 (contribution of each component): the 8 configs of cfgs/paper/table3/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table3.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 3 "$@"
