"""Make the evaluation copies of the MedMNIST files in ../shared/data (docs/results.md, issue 4).

The two large train splits are cut to a seeded random subset so that every method x victim run fits a 2-core
CPU; val and test splits are kept whole. Usage: ``python benchmarks/eval_data.py OUT_DIR [DATA_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

#: dataset -> (file in ../shared/data, train images kept; 0 = all)
EVAL_DATASETS = {
    "breast": ("breastmnist_28.npz", 0),
    "retina": ("retinamnist_28.npz", 0),
    "pneumonia": ("pneumoniamnist_28_trimmedtrain.npz", 1500),
    "blood": ("bloodmnist_28.npz", 1500),
    "adrenal": ("adrenalmnist3d_28.npz", 0),
}


def make_eval_copy(src: Path, dst: Path, keep: int, seed: int = 0) -> Path:
    """Write ``src`` to ``dst`` with its train split cut to a seeded random ``keep`` images (0: all)."""
    with np.load(src) as data:
        arrays = {key: data[key] for key in data.files}
    if keep and keep < len(arrays["train_images"]):
        index = np.sort(np.random.default_rng(seed).permutation(len(arrays["train_images"]))[:keep])
        arrays["train_images"], arrays["train_labels"] = arrays["train_images"][index], arrays["train_labels"][index]
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **arrays)
    return dst


if __name__ == "__main__":
    out, data = Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data")
    for name, (file, keep) in EVAL_DATASETS.items():
        print(make_eval_copy(data / file, out / name / "data.npz", keep))
