#!/usr/bin/env bash
# Any2Point on the DINOv2 ViT-B/14, ModelNet40, over SEEDS.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/modelnet40_dinov2.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/modelnet40/any2point_dinov2.yaml modelnet40_dinov2
collect modelnet40_dinov2 --paper
