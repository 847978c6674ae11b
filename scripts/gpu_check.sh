#!/usr/bin/env bash
# One command for a machine with CUDA: the CUDA tests, the training bench at batch 32 in bf16 (eager
# and compiled) for the three paper configs, the demo on CUDA and, with two GPUs, a DDP run; every
# figure and failure goes to one JSON file (default gpu_check.json). Steps and limits: scripts/gpu_check.py.
# Without CUDA it prints one line and exits 2.
#   bash scripts/gpu_check.sh [OUT.json]
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
