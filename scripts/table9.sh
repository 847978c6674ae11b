#!/usr/bin/env bash
# The paper's Table 9 (1D virtual projection: lines): the 4 configs of cfgs/paper/table9/, over SEEDS, then the table.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table9.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 9 "$@"
