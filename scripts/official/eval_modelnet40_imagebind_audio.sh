#!/usr/bin/env bash
# Convert the released Any2Point checkpoint of the run 'modelnet40_imagebind_audio' and evaluate it
# (the official test protocol of cfgs/official/modelnet40_imagebind_audio.yaml).
# Usage: scripts/official/eval_modelnet40_imagebind_audio.sh RELEASED.pth [DATA_ROOT] [--dry-run]   (see common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
eval_official modelnet40_imagebind_audio "$@"
