#!/usr/bin/env bash
# The paper's Table 4 (positional embedding of the 3D tokens): the 8 configs of cfgs/paper/table4/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table4.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 4 "$@"
