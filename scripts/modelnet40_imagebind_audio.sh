#!/usr/bin/env bash
# Any2Point on the ImageBind audio encoder, ModelNet40, over SEEDS.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/modelnet40_imagebind_audio.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/modelnet40/any2point_imagebind_audio.yaml modelnet40_imagebind_audio
collect modelnet40_imagebind_audio --paper
