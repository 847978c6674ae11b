#!/usr/bin/env bash
# Any2Point part segmentation on ShapeNetPart, source imagebind_audio (no published number: the paper's release
# never shipped segmentation), over SEEDS; the table reports instance and class mIoU.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/shapenetpart_imagebind_audio.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/shapenetpart/any2point_imagebind_audio.yaml shapenetpart_imagebind_audio
collect shapenetpart_imagebind_audio
