#!/usr/bin/env bash
# Does the frozen source help? On one dataset, over SEEDS: Point-NN (training-free, no parameter;
# deterministic, so one run, with the first seed), Point-PN (the 3D-only network of the same size,
# trained from scratch), the tokenizer-and-head-only baseline (Any2Point's tokenizer and head with
# the source frozen and nothing inserted, no virtual-projection PE: Table 3's first row) and
# Any2Point with SOURCE; one table: OA and mAcc (mean ± std over seeds), trainable parameters, time.
# DATASET=scanobjectnn (or modelnet40, or demo: the synthetic CPU demo of cfgs/demo.yaml, whose
# source is the demo's MiniLM) SOURCE=clip_text (or dinov2, imagebind_audio, ...) SEEDS="0 1 2"
# GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/does_the_source_help.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
DATASET="${DATASET:-scanobjectnn}"
SOURCE="${SOURCE:-clip_text}"
case "$DATASET" in
  demo)
    point_nn=cfgs/demo_point_nn.yaml; point_pn=cfgs/demo_point_pn.yaml; any2point=cfgs/demo.yaml; tag=demo ;;
  scanobjectnn|modelnet40)
    point_nn="cfgs/$DATASET/point_nn.yaml"; point_pn="cfgs/$DATASET/point_pn.yaml"
    any2point="cfgs/$DATASET/any2point_$SOURCE.yaml"; tag="${DATASET}_$SOURCE" ;;
  *) echo "error: DATASET must be scanobjectnn, modelnet40 or demo, got '$DATASET'" >&2; exit 2 ;;
esac
if [[ ! -f "$ROOT/$any2point" ]]; then
  echo "error: no config $any2point (SOURCE: one of cfgs/$DATASET/any2point_<source>.yaml)" >&2
  exit 2
fi
read -r first_seed _ <<< "$SEEDS"
train_run "$point_nn" "source_help_${DATASET}_point_nn_seed$first_seed" "$first_seed"
seeds_of "$point_pn" "source_help_${DATASET}_point_pn"
seeds_of "$any2point" "source_help_${tag}_frozen_source" "model.projection.pe=none" "model.tuner={type: FrozenSource}"
seeds_of "$any2point" "source_help_${tag}_any2point"
collect "source_help_$tag" --cost
