#!/usr/bin/env bash
# The paper's Table 7 (where the adapter sits in the block): the 6 configs of cfgs/paper/table7/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table7.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 7 "$@"
