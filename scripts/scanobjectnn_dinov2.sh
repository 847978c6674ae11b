#!/usr/bin/env bash
# Any2Point on the DINOv2 ViT-B/14, ScanObjectNN PB-T50-RS, over SEEDS.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/scanobjectnn_dinov2.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/scanobjectnn/any2point_dinov2.yaml scanobjectnn_dinov2
collect scanobjectnn_dinov2 --paper
