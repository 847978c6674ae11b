#!/usr/bin/env bash
# Any2Point part segmentation on ShapeNetPart, source clip_text (no published number: the paper's release
# never shipped segmentation), over SEEDS; the table reports instance and class mIoU.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/shapenetpart_clip_text.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/shapenetpart/any2point_clip_text.yaml shapenetpart_clip_text
collect shapenetpart_clip_text
