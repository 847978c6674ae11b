#!/usr/bin/env bash
# Any2Point on the CLIP ViT-L/14 text tower, ModelNet40, over SEEDS.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/modelnet40_clip_text.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/modelnet40/any2point_clip_text.yaml modelnet40_clip_text
collect modelnet40_clip_text --paper
