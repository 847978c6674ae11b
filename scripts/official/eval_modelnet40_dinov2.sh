#!/usr/bin/env bash
# Convert the released Any2Point checkpoint of the run 'modelnet40_dinov2' and evaluate it
# (the official test protocol of cfgs/official/modelnet40_dinov2.yaml).
# Usage: scripts/official/eval_modelnet40_dinov2.sh RELEASED.pth [DATA_ROOT] [--dry-run]   (see common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
eval_official modelnet40_dinov2 "$@"
