#!/usr/bin/env bash
# Convert the released Any2Point checkpoint of the run 'scanobjectnn_clip_text' and evaluate it
# (the official test protocol of cfgs/official/scanobjectnn_clip_text.yaml).
# Usage: scripts/official/eval_scanobjectnn_clip_text.sh RELEASED.pth [DATA_ROOT] [--dry-run]   (see common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
eval_official scanobjectnn_clip_text "$@"
