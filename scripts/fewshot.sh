#!/usr/bin/env bash
# Few-shot ModelNet40 (Point-BERT's published episodes under data/ModelNetFewshot): for each of
# WAYS x SHOTS, train on the support set of each of the FOLDS episodes and test on its query set;
# the table gives mean +- std over the folds, one row per way/shot. MODEL=point_nn runs the
# training-free Point-NN instead (the support set fills its bank; SOURCE is not used).
# MODEL=any2point (or point_nn) SOURCE=clip_text (or dinov2, imagebind_audio) WAYS="5 10"
# SHOTS="10 20" FOLDS="0 ... 9" SEEDS="0" GPUS=1 EXTRA="key=value ..." OUT=experiments
# bash scripts/fewshot.sh [--dry-run]
SEEDS="${SEEDS:-0}"
source "$(dirname "$0")/lib.sh"
parse_args "$@"
SOURCE="${SOURCE:-clip_text}"
MODEL="${MODEL:-any2point}"
WAYS="${WAYS:-5 10}"
SHOTS="${SHOTS:-10 20}"
FOLDS="${FOLDS:-0 1 2 3 4 5 6 7 8 9}"
case "$MODEL" in
  any2point) config="cfgs/modelnet40_fewshot/any2point_$SOURCE.yaml"; tag="$SOURCE" ;;
  point_nn) config="cfgs/modelnet40_fewshot/point_nn.yaml"; tag=point_nn ;;
  *) echo "error: MODEL must be any2point or point_nn, got '$MODEL'" >&2; exit 2 ;;
esac
if [[ ! -f "$ROOT/$config" ]]; then
  echo "error: no few-shot config $config (SOURCE: clip_text, dinov2 or imagebind_audio)" >&2
  exit 2
fi
for way in $WAYS; do
  for shot in $SHOTS; do
    for fold in $FOLDS; do
      seeds_of "$config" "fewshot_${tag}_${way}way_${shot}shot_fold$fold" \
        "dataset.way=$way" "dataset.shot=$shot" "dataset.fold=$fold" "model.num_classes=$way"
    done
  done
done
collect "fewshot_$tag" --group-by dataset.way,dataset.shot
