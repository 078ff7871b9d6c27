#!/usr/bin/env bash
# End-to-end check of the monai-salm MONAI Label app (apps/monailabel_salm) against a real MONAI Label 0.8.5 server.
#
#   scripts/monailabel_e2e.sh
#
# 1. builds (or reuses) its own virtual environment under $SALM_E2E_DIR (default /tmp/salm_e2e): torch 2.13.0 (CPU
#    wheel, installed first), apps/monailabel_salm/requirements.txt, monailabel 0.8.5 and pydicom-seg 0.4.1 with
#    --no-deps (no sam2, no torchvision), monai-salm from this repository, and the pydicom-3 shim for pydicom-seg;
# 2. trains a small 3D checkpoint (`monai-salm train`, one epoch on generated NIfTI volumes, reused on later runs);
# 3. writes a studies folder of NIfTI volumes (int16 and float32, non-identity affines), a 2D slice, a volume of
#    another size and a corrupt file;
# 4. starts `monailabel start_server --app apps/monailabel_salm --studies ... --conf checkpoint ...` on 127.0.0.1,
#    calls POST /infer/salm_protect?image=<id>&output=image and checks the returned files (shape, affine, header,
#    dtype, |change| <= epsilon in original units, changes only inside the mask recomputed from the checkpoint, and
#    equal to what monai-salm computes locally; a volume of another size is protected at its own size), then checks
#    the REST errors (unknown id, corrupt file, 2D image with a 3D checkpoint, bad class_index, unknown task) and
#    that the server still answers after each;
# 5. stops the server (also on failure or Ctrl-C) and exits 0 only if every check passed.
#
# Environment: SALM_E2E_DIR (work folder, default /tmp/salm_e2e), SALM_E2E_PYTHON (default python3, 3.10 or 3.11),
# SALM_E2E_FRESH=1 (rebuild the venv and retrain), SALM_E2E_TORCH_PIP_ARGS (extra pip arguments for torch, e.g.
# "--index-url https://download.pytorch.org/whl/cpu" where no local CPU wheel is configured).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APP="$REPO/apps/monailabel_salm"
WORK=${SALM_E2E_DIR:-/tmp/salm_e2e}
VENV="$WORK/venv"
PY="$VENV/bin/python"
RUN="$WORK/run"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s)
FAILS=0
SERVER_PID=""

log() { echo "[$(($(date +%s) - T0))s] $*"; }
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
die() { echo "FAIL: $*"; echo "RESULT: FAIL (setup) after $(($(date +%s) - T0))s"; exit 1; }

pip_install() {  # quiet pip install into the venv (this machine's pip config warns about every local index entry)
    "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
        log "server stopped"
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'echo "interrupted"; exit 130' INT TERM

mkdir -p "$WORK" || die "cannot create $WORK"

# ------------------------------------------------------------------------------------------ 1. virtual environment
RECIPE="torch==2.13.0 first; requirements.txt; --no-deps requirements-nodeps.txt; pytest"  # change to rebuild
STAMP=$( (echo "$RECIPE"; cat "$APP/requirements.txt" "$APP/requirements-nodeps.txt") | sha256sum | cut -c1-16)
if [ "${SALM_E2E_FRESH:-0}" = 1 ] || [ ! -x "$PY" ] || [ "$(cat "$VENV/.salm_e2e_stamp" 2>/dev/null)" != "$STAMP" ]; then
    log "building the virtual environment $VENV"
    rm -rf "$VENV" "$WORK/ckpt"
    "${SALM_E2E_PYTHON:-python3}" -m venv "$VENV" || die "python -m venv failed"
    # torch first, pinned: a bare torch requirement pulls a multi-GB CUDA build
    # shellcheck disable=SC2086
    pip_install "torch==2.13.0" ${SALM_E2E_TORCH_PIP_ARGS:-} || die "pip install torch==2.13.0 failed"
    pip_install -r "$APP/requirements.txt" || die "pip install -r requirements.txt failed"
    pip_install --no-deps -r "$APP/requirements-nodeps.txt" || die "pip install monailabel failed"
    pip_install pytest || die "pip install pytest failed"  # for tests/test_monailabel_app.py's monailabel tests
    echo "$STAMP" > "$VENV/.salm_e2e_stamp"
else
    log "reusing the virtual environment $VENV"
fi
log "installing monai-salm from $REPO (working tree, built from a copy so the repository gets no build/ folder)"
rm -rf "$WORK/src" && mkdir -p "$WORK/src" || die "cannot create $WORK/src"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/monai_salm" "$WORK/src/" || die "cannot copy the sources"
pip_install "$WORK/src" || die "pip install monai-salm failed"  # a local path is always reinstalled; new deps come along
PYDICOM_DIR=$("$PY" -c "import os, pydicom; print(os.path.dirname(pydicom.__file__))") || die "pydicom missing"
cp "$APP/compat/_storage_sopclass_uids.py" "$PYDICOM_DIR/" || die "cannot install the pydicom shim"
"$PY" - <<'EOF' || die "environment check failed"
import importlib.metadata as md
import numpy, pydicom, torch
for name in ("monailabel", "monai", "monai-salm", "torch", "numpy", "pydicom", "pydicom-seg", "fastapi", "starlette"):
    print(f"  {name} {md.version(name)}")
for name in ("sam2", "torchvision"):
    try:
        md.version(name)
        raise SystemExit(f"{name} is installed; this environment is meant to run without it")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
assert numpy.__version__.startswith("1."), numpy.__version__
import pydicom_seg  # the server imports it at start; needs the shim under pydicom 3
EOF
pass "environment: monailabel 0.8.5 without sam2/torchvision, numpy<2, pydicom 3 + shim"
log "tests/test_monailabel_app.py with monailabel installed (the SALMProtect task's info, output and HTTP errors)"
OUT=$(cd "$REPO" && PYTHONDONTWRITEBYTECODE=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_monailabel_app.py 2>&1)
RC=$?
echo "$OUT" | tail -n 3 | sed 's/^/  /'
if [ "$RC" -eq 0 ] && ! echo "$OUT" | tail -n 1 | grep -q skipped; then
    pass "tests/test_monailabel_app.py (monailabel installed: nothing skipped)"
else
    fail "tests/test_monailabel_app.py"
fi

# ------------------------------------------------------------------------------------- 2. checkpoint and studies
rm -rf "$RUN" && mkdir -p "$RUN" || die "cannot create $RUN"
CKPT="$WORK/ckpt/salm.pt"
STUDIES="$RUN/studies"
export SALM_E2E_WORK="$WORK" SALM_E2E_RUN="$RUN" SALM_E2E_CKPT="$CKPT" SALM_E2E_STUDIES="$STUDIES"
"$PY" - <<'EOF' || die "cannot write the data"
"""Training volumes (two classes, CT-like HU values), and the studies folder the server serves."""
import os
from pathlib import Path

import nibabel as nib
import numpy as np

rng = np.random.default_rng(0)
SIZE = (16, 16, 16)


def volume(label):
    hu = rng.normal(-200.0, 150.0, SIZE)
    hu[4:12, 4:12, 4:12] += 300.0 + 400.0 * label  # a brighter "organ" for class 1
    return np.clip(hu, -1000, 1000)


def affine(seed):
    r = np.random.default_rng(seed)
    a, b = r.uniform(-0.4, 0.4, 2)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    out[:3, 3] = r.uniform(-120, 120, 3)
    return out


train = Path(os.environ["SALM_E2E_RUN"]) / "train"
for label in (0, 1):
    (train / f"class{label}").mkdir(parents=True)
    for i in range(8):
        nib.save(nib.Nifti1Image(volume(label).astype(np.int16), affine(i)), train / f"class{label}" / f"v{i}.nii.gz")

studies = Path(os.environ["SALM_E2E_STUDIES"])
studies.mkdir(parents=True)
nib.save(nib.Nifti1Image(volume(1).astype(np.int16), affine(101)), studies / "ct_int16.nii.gz")
nib.save(nib.Nifti1Image(volume(0).astype(np.float32), affine(102)), studies / "ct_float32.nii.gz")
nib.save(nib.Nifti1Image(volume(0)[:, :, 8].astype(np.int16), affine(103)), studies / "slice_2d.nii.gz")
nib.save(nib.Nifti1Image(rng.normal(0, 100, (20, 16, 16)).astype(np.int16), affine(104)), studies / "ct_20x16x16.nii.gz")
(studies / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file" + bytes(range(256)) * 4)
print(f"  studies: {sorted(p.name for p in studies.iterdir())}")
EOF
if [ -f "$CKPT" ]; then
    log "reusing the checkpoint $CKPT"
else
    log "training a small 3D checkpoint (1 epoch)"
    mkdir -p "$WORK/ckpt"
    "$VENV/bin/monai-salm" train --data "$RUN/train" --out "$CKPT" --intensity window:-1000:1000 \
        --epochs 1 --warmup-epochs 0 --batch-size 8 --threads 1 --quiet || die "monai-salm train failed"
fi
[ -f "$CKPT" ] && pass "checkpoint $CKPT" || die "no checkpoint"

# ------------------------------------------------------------------------------------------------ 3. the server
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL="http://127.0.0.1:$PORT"
export MONAI_LABEL_SESSION_PATH="$RUN/sessions"
log "starting monailabel start_server on $URL"
# the monailabel launcher runs `python -m monailabel.main` with the first python on PATH: the venv's
PATH="$VENV/bin:$PATH" "$VENV/bin/monailabel" start_server --app "$APP" --studies "$STUDIES" --host 127.0.0.1 --port "$PORT" \
    --conf checkpoint "$CKPT" > "$RUN/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 240); do
    curl -sf "$URL/info/" -o "$RUN/info.json" && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 40 "$RUN/server.log"; die "the server exited while starting"; }
    sleep 0.5
done
[ -s "$RUN/info.json" ] || { tail -n 40 "$RUN/server.log"; die "the server did not answer within 120 s"; }
log "server up (pid $SERVER_PID)"

"$PY" - <<'EOF' && pass "GET /info/ lists salm_protect with epsilon, k, value range and checkpoint" || fail "GET /info/"
import json, os
info = json.load(open(os.path.join(os.environ["SALM_E2E_RUN"], "info.json")))
salm = info["models"]["salm_protect"]["salm"]
print(f"  info: epsilon={salm['epsilon']:.4f} ({salm['epsilon_original_units']:.1f} HU), k={salm['k']}, "
      f"value_range={salm['value_range']}, mask_mode={salm['mask_mode']}, checkpoint={salm['checkpoint']}")
assert salm["checkpoint"] == os.path.realpath(os.environ["SALM_E2E_CKPT"])
assert {"epsilon", "k", "value_range", "intensity"} <= set(salm)
EOF

alive() {  # the server still answers
    curl -sf "$URL/info/" -o /dev/null && kill -0 "$SERVER_PID" 2>/dev/null
}

# infer IMAGE OUTPUT FILE [PARAMS]: POST /infer/salm_protect, the body to FILE, prints the HTTP status
infer() {
    local params=${4:-}
    [ -n "$params" ] || params='{}'
    curl -s -o "$3" -w "%{http_code}" -X POST "$URL/infer/${5:-salm_protect}?image=$1&output=$2" -F "params=$params"
}

# ------------------------------------------------------------------------------------------- 4. protected images
check_image() {  # ID PARAMS: protect with output=image and check the file
    local id=$1 params=$2 out="$RUN/$1.protected.nii.gz" t code
    t=$(date +%s%N)
    code=$(infer "$id" image "$out" "$params")
    log "POST /infer/salm_protect?image=$id&output=image params=$params -> HTTP $code ($((($(date +%s%N) - t) / 1000000)) ms)"
    if [ "$code" != 200 ]; then fail "$id: HTTP $code: $(head -c 300 "$out")"; return; fi
    code=$(infer "$id" json "$RUN/$id.json" "$params")
    [ "$code" = 200 ] || { fail "$id (output=json): HTTP $code: $(head -c 300 "$RUN/$id.json")"; return; }
    SALM_E2E_ID=$id SALM_E2E_OUT=$out "$PY" - <<'EOF' && pass "$id: returned file checked" || fail "$id: returned file"
"""Check the returned file against the original and against what monai-salm computes here."""
import json, os
import nibabel as nib
import numpy as np
import torch
from monai_salm.api import protect_tensor
from monai_salm.io import read_image
from monai_salm.transforms.functional import resolve_k
from monai_salm.workflows import load_checkpoint

run, name = os.environ["SALM_E2E_RUN"], os.environ["SALM_E2E_ID"]
src = os.path.join(os.environ["SALM_E2E_STUDIES"], f"{name}.nii.gz")
orig, prot = nib.load(src), nib.load(os.environ["SALM_E2E_OUT"])
summary = json.load(open(os.path.join(run, f"{name}.json")))
p = load_checkpoint(os.environ["SALM_E2E_CKPT"])
eps_units = p.scaling.epsilon_in_units(p.settings.epsilon)
a = np.asanyarray(orig.dataobj).astype(np.float64)
b = np.asanyarray(prot.dataobj).astype(np.float64)
integer = np.issubdtype(orig.get_data_dtype(), np.integer)
tol = 0.5 if integer else 1e-4 * eps_units  # integer files store the change rounded to the nearest unit

checks = {}
checks["shape"] = prot.shape == orig.shape
checks["affine"] = np.array_equal(prot.affine, orig.affine)
checks["sform/qform codes"] = (int(prot.header["sform_code"]), int(prot.header["qform_code"])) == (
    int(orig.header["sform_code"]), int(orig.header["qform_code"]))
checks["dtype"] = prot.get_data_dtype() == orig.get_data_dtype()
diff = np.abs(b - a)
checks[f"max |change| {diff.max():.2f} <= eps {eps_units:.2f} (+{tol:g})"] = diff.max() <= eps_units + tol

# the mask, recomputed from the checkpoint for the class the server used
label = summary["class_index"]
if summary["class_source"] == "surrogate":
    x = torch.from_numpy(p.scaling.to_unit(read_image(src)[0]))[None]
    with torch.no_grad():
        checks["class = surrogate prediction"] = int(p.surrogate(x).argmax(1)[0]) == label
array, _ = read_image(src)
clean = p.scaling.to_unit(array)
expected, masks = protect_tensor(torch.from_numpy(clean)[None], torch.tensor([label]), p.settings, p.generator,
                                 p.surrogate, p.class_scores, batch_size=1)
mask = masks[0, 0].numpy()
changed = diff > 0
checks[f"{int(changed.sum())} changed voxels, all inside the mask"] = changed.sum() > 0 and not changed[~mask].any()
if tuple(mask.shape) == tuple(p.settings.image_size):
    checks[f"mask size {int(mask.sum())} = k * N"] = mask.sum() == resolve_k(p.settings.k, mask.size)
else:  # another size: the working grid's mask mapped onto the image, about k of its voxels
    checks[f"mask {mask.mean():.3f} of the voxels, about k = {p.settings.k}"] = abs(mask.mean() - p.settings.k) < 0.05
want = p.scaling.apply_delta(array, clean, expected[0].numpy())[0].astype(np.float64)
checks["values equal monai-salm's here"] = np.abs(b - want).max() <= tol
checks["summary"] = (summary["shape"] == [1, *orig.shape] and abs(summary["max_abs_change"] - diff.max()) < 1e-3
                     and abs(summary["epsilon_original_units"] - eps_units) < 1e-6)
print(f"  {name}: class {label} ({summary['class_source']}), changed {summary['changed_fraction']:.4f}, "
      f"max change {diff.max():.2f} of eps {eps_units:.2f} ({orig.get_data_dtype()})")
for what, ok in checks.items():
    print(f"    {'ok  ' if ok else 'BAD '} {what}")
raise SystemExit(0 if all(checks.values()) else 1)
EOF
}
check_image ct_int16 '{"class_index": 1}'
check_image ct_float32 '{"save_label": true}'
check_image ct_20x16x16 '{"class_index": 1}'  # another size than the checkpoint's grid: protected at its own
if [ -z "$(find "$STUDIES/labels" -type f 2>/dev/null)" ]; then
    pass "no protected copy saved as a label in the datastore (save_label ignored)"
else
    fail "protected copies were saved as labels: $(find "$STUDIES/labels" -type f)"
fi

# an uploaded file instead of a datastore id (MONAI Label's `file` form field)
code=$(curl -s -o "$RUN/upload.protected.nii.gz" -w "%{http_code}" -X POST "$URL/infer/salm_protect?output=image" \
    -F 'params={"class_index": 1}' -F "file=@$STUDIES/ct_int16.nii.gz")
if [ "$code" = 200 ] && "$PY" - <<'EOF'
import os
import nibabel as nib
import numpy as np
run, studies = os.environ["SALM_E2E_RUN"], os.environ["SALM_E2E_STUDIES"]
a, b = nib.load(f"{studies}/ct_int16.nii.gz"), nib.load(f"{run}/upload.protected.nii.gz")
c = nib.load(f"{run}/ct_int16.protected.nii.gz")  # the same image protected by id, same class
assert b.shape == a.shape and np.array_equal(b.affine, a.affine) and b.get_data_dtype() == a.get_data_dtype()
assert np.array_equal(np.asanyarray(b.dataobj), np.asanyarray(c.dataobj))
EOF
then
    pass "uploaded file (no image id): protected, identical to the copy made by id"
else
    fail "uploaded file: HTTP $code: $(head -c 300 "$RUN/upload.protected.nii.gz")"
fi

# ----------------------------------------------------------------------------------------------- 5. REST errors
check_error() {  # WHAT ID WANT_CODE PATTERN [PARAMS] [TASK]
    local what=$1 id=$2 want=$3 pattern=$4 body="$RUN/error.json" code
    code=$(infer "$id" image "$body" "${5:-}" "${6:-salm_protect}")
    local detail
    detail=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['detail'])" "$body" 2>/dev/null \
        || head -c 300 "$body")
    echo "  $what: HTTP $code: $detail"
    if [ "$code" = "$want" ] && echo "$detail" | grep -qiE "$pattern"; then
        pass "$what -> HTTP $want naming the problem"
    else
        fail "$what: wanted HTTP $want and a message matching /$pattern/"
    fi
    alive && pass "server still answers after: $what" || fail "server down after: $what"
}
check_error "unknown image id" no_such_image 404 "no_such_image.*not in the datastore"
check_error "corrupt file" corrupt 422 "corrupt.nii.gz.*cannot read"
check_error "2D image, 3D checkpoint" slice_2d 422 "slice_2d.nii.gz: image is 2D but the checkpoint .* is 3D"
check_error "bad class_index" ct_int16 422 "class_index" '{"class_index": 7}'
check_error "unknown task" ct_int16 400 "no model 'no_such_task'" '{}' no_such_task

# ---------------------------------------------------------------------------------------------------- 6. result
stop_server
if grep -q "Traceback" "$RUN/server.log"; then
    fail "traceback in the server log ($RUN/server.log)"
else
    pass "no traceback in the server log"
fi
if [ "$FAILS" -eq 0 ]; then
    echo "RESULT: PASS (all checks) in $(($(date +%s) - T0))s; server log: $RUN/server.log"
    exit 0
fi
echo "RESULT: FAIL ($FAILS check(s) failed) in $(($(date +%s) - T0))s; server log: $RUN/server.log"
exit 1
