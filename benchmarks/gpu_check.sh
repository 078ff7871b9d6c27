#!/usr/bin/env bash
# CUDA path check, one call under 8 minutes on a GPU machine: release/training cost against the floor, a short
# train + protect (AMP, pinned memory, non-blocking copies) on the embedded demo data, and the card that ran it.
# Usage (repository root, package installed): bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
python - <<'EOF' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
EOF
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
python -m monai_salm.cli demo --out "$out/demo" --epochs 2 --device cuda --overwrite --quiet | tee "$out/demo.txt"
python benchmarks/native_cost.py floor sizes --device cuda --json "$out/native_cost.json" | tee "$out/native_cost.txt"
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -gt 1 ]; then  # training and release on every GPU under torchrun (nccl) against one
  python benchmarks/distributed_scaling.py --configs 1x4 "${ngpu}x4" --device cuda --repeats 1 \
    --json "$out/distributed_scaling.json" | tee "$out/distributed_scaling.txt"
fi
