#!/usr/bin/env bash
# Any2Point part segmentation on ShapeNetPart, source dinov2 (no published number: the paper's release
# never shipped segmentation), over SEEDS; the table reports instance and class mIoU.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/shapenetpart_dinov2.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/shapenetpart/any2point_dinov2.yaml shapenetpart_dinov2
collect shapenetpart_dinov2
