#!/usr/bin/env bash
# The bundle README's commands in a fresh virtual environment with only what the README installs for them:
# torch 2.13.0 CPU, then `pip install ".[bundle]"`. Trains one epoch on a small PNG class folder with
# configs/train.json (its TensorBoardStatsHandler included) and protects it with configs/inference.json.
# Usage: scripts/bundle_extra_check.sh [WORK_DIR]   (CI runs it after the tests)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$(mktemp -d)}
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/monai_salm" "$WORK/" && mkdir -p "$WORK/src"
mv "$WORK/pyproject.toml" "$WORK/README.md" "$WORK/monai_salm" "$WORK/src/"
pip install -q "$WORK/src[bundle]"
python - "$WORK/data" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for label, name in enumerate(("benign", "malignant")):
    folder = Path(sys.argv[1]) / name
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.clip(rng.integers(0, 120, (16, 16)) + 100 * label, 0, 255).astype(np.uint8)).save(
            folder / f"img{i}.png")
PY
B="$REPO/bundles/salm_protect"
cd "$WORK"
python -m monai.bundle run --config_file "$B/configs/train.json" --meta_file "$B/configs/metadata.json" \
    --logging_file "$B/configs/logging.conf" --bundle_root "$WORK/bundle" --dataset_dir "$WORK/data" \
    --max_epochs 1 --batch_size 4 --warmup_epochs 0
python -m monai.bundle run --config_file "$B/configs/inference.json" --meta_file "$B/configs/metadata.json" \
    --logging_file "$B/configs/logging.conf" --bundle_root "$WORK/bundle" --dataset_dir "$WORK/data" \
    --output_dir "$WORK/protected"
test -s "$WORK/protected/manifest.csv" && test "$(find "$WORK/protected" -name '*.png' | wc -l)" = 8
echo "RESULT: PASS: the bundle README commands run with pip install \".[bundle]\""
