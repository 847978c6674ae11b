#!/usr/bin/env bash
# The CPU demo end to end, in a few minutes: train Any2Point on the frozen MiniLM over
# SyntheticShapes (cfgs/demo.yaml, DEMO_EPOCHS epochs), test the best checkpoint, test it again with
# 3-pass voting, classify a sphere mesh and a torus cloud written here, draw every figure, and
# print the results table. Outputs go to $OUT/demo_all/.
# DEMO_EPOCHS=2 EXTRA="key=value ..." OUT=experiments bash scripts/demo_all.sh [--dry-run]
SEEDS="${SEEDS:-0}"
source "$(dirname "$0")/lib.sh"
parse_args "$@"
DEMO_EPOCHS="${DEMO_EPOCHS:-2}"
EXP="$OUT/demo_all"
CKPT="$EXP/ckpt-best.pth"
SHAPES="$EXP/shapes"

train_run cfgs/demo.yaml demo_all "${SEEDS%% *}" "train.epochs=$DEMO_EPOCHS"
# shellcheck disable=SC2046
run $(launcher) main.py --test --ckpt "$CKPT"
# shellcheck disable=SC2046
run $(launcher) main.py --test --ckpt "$CKPT" --vote 3 --results results_vote3.json
run "$PYTHON" -c "import sys, numpy as np, trimesh, pathlib
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
trimesh.creation.icosphere(subdivisions=3, radius=2.0).export(out / 'sphere.stl')
ring = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35)
ring.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
np.savetxt(out / 'torus.xyz', np.asarray(ring.sample(2000, seed=0)))" "$SHAPES"
run "$PYTHON" tools/predict.py --ckpt "$CKPT" "$SHAPES" --top-k 3
run "$PYTHON" tools/visualize.py --ckpt "$CKPT"
collect demo_all
