#!/usr/bin/env bash
# Any2Point on the ImageBind audio encoder, ScanObjectNN PB-T50-RS, over SEEDS.
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/scanobjectnn_imagebind_audio.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
seeds_of cfgs/scanobjectnn/any2point_imagebind_audio.yaml scanobjectnn_imagebind_audio
collect scanobjectnn_imagebind_audio --paper
