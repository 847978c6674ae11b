#!/usr/bin/env bash
# The paper's Table 5: every row of cfgs/paper/table5/ (one config per row and source), over SEEDS,
# then ours (mean ± std over seeds, n) beside the paper's numbers (cfgs/paper/paper_results.csv).
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/table5.sh [--dry-run]
exec bash "$(dirname "$0")/ablation.sh" 5 "$@"
