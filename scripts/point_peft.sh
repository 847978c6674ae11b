#!/usr/bin/env bash
# Point-PEFT (prompt + geometry-aware adapter on a frozen 3D-pretrained encoder) and the full
# fine-tuning baseline of each encoder, over DATASETS x SOURCES, SEEDS each; one table with the
# released figures as references (Point-PEFT 89.1 / 85.0 on ScanObjectNN, 94.2 / 93.4 on ModelNet40;
# full fine-tuning 88.1 / 83.1 and 93.2 / 92.7, Point-MAE / Point-BERT). The memory bank of each
# Point-PEFT config is built first (tools/build_memory_bank.py) unless its file exists.
# DATASETS="scanobjectnn modelnet40" SOURCES="point_mae point_bert"
# SEEDS="0 1 2" GPUS=1 EXTRA="key=value ..." VOTE=1 OUT=experiments bash scripts/point_peft.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
parse_args "$@"
DATASETS="${DATASETS:-scanobjectnn modelnet40}"
SOURCES="${SOURCES:-point_mae point_bert}"
declare -A REF=([scanobjectnn_point_mae]=89.1 [scanobjectnn_point_bert]=85.0 [modelnet40_point_mae]=94.2
                [modelnet40_point_bert]=93.4 [scanobjectnn_point_mae_full]=88.1 [scanobjectnn_point_bert_full]=83.1
                [modelnet40_point_mae_full]=93.2 [modelnet40_point_bert_full]=92.7)
refs=()
for dataset in $DATASETS; do
  for source in $SOURCES; do
    name="${dataset}_${source}"
    config="cfgs/point_peft/$name.yaml"
    if [[ ! -f "$ROOT/$config" ]]; then
      echo "error: no config $config (DATASETS: scanobjectnn, modelnet40; SOURCES: point_mae, point_bert)" >&2
      exit 2
    fi
    bank="ckpts/point_peft/bank_$name.pt"
    # shellcheck disable=SC2086
    [[ -f "$ROOT/$bank" ]] || run "$PYTHON" tools/build_memory_bank.py --config "$config" $EXTRA
    seeds_of "$config" "point_peft_$name"
    seeds_of "cfgs/point_peft/${name}_full.yaml" "point_peft_${name}_full"
    refs+=(--ref "point_peft_$name=${REF[$name]}" --ref "point_peft_${name}_full=${REF[${name}_full]}")
  done
done
collect point_peft "${refs[@]}"
