#!/usr/bin/env bash
# Real-data proof behind docs/results.md. Usage:
#   benchmarks/proof.sh blood  RUN_DIR     # BloodMNIST: SALM on 3,000 train images, protect all 11,959, victims
#   benchmarks/proof.sh adrenal RUN_DIR    # AdrenalMNIST3D: SALM on all 1,188 train volumes, victims
# Each stage is one monai-salm command, run single-threaded (--threads 1) so two chains can share 2 cores.
# Extra training options go in TRAIN_ARGS, e.g. TRAIN_ARGS="--k 0.18 --eps 20/255" for the AdrenalMNIST3D row
# that meets its target (docs/results.md).
set -euo pipefail
DATA=${DATA:-../shared/data}
what=$1; out=$2; mkdir -p "$out"
case $what in
  blood)
    src=$DATA/bloodmnist_28.npz
    monai-salm evaluate --train "$src" --test "$src" --epochs 20 --threads 1 --quiet --out "$out/clean"
    monai-salm train --data "$src" --limit 3000 --epochs 6 ${TRAIN_ARGS:-} --threads 1 --quiet --out "$out/salm.pt"
    ;;
  adrenal)
    src=$DATA/adrenalmnist3d_28.npz
    monai-salm evaluate --train "$src" --test "$src" --epochs 20 --threads 1 --quiet --out "$out/clean"
    monai-salm train --data "$src" --epochs 8 ${TRAIN_ARGS:-} --threads 1 --quiet --out "$out/salm.pt"
    ;;
  *) echo "usage: $0 blood|adrenal RUN_DIR" >&2; exit 2;;
esac
monai-salm protect --checkpoint "$out/salm.pt" --data "$src" --out "$out/protected.npz" --threads 1 --quiet --overwrite
monai-salm evaluate --train "$out/protected.npz" --test "$src" --epochs 20 --threads 1 --quiet --out "$out/protected"
