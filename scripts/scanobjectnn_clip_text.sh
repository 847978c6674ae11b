#!/usr/bin/env bash
# Any2Point on the CLIP ViT-L/14 text tower, ScanObjectNN PB-T50-RS, over SEEDS.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/scanobjectnn_clip_text.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/scanobjectnn/any2point_clip_text.yaml scanobjectnn_clip_text
collect scanobjectnn_clip_text --paper
