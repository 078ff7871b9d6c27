"""Make the evaluation copies of the MedMNIST files in ../shared/data (docs/results.md).

The two large train splits are cut to a seeded random subset so that every method x victim run fits a 2-core
CPU; val and test splits are kept whole. MedNIST (64 px JPEGs, no official split) becomes a MedMNIST-format
``.npz`` of a seeded, class-balanced subset. Usage: ``python benchmarks/eval_data.py OUT_DIR [DATA_DIR]``.
"""

from __future__ import annotations

import io
import sys
import tarfile
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


#: MedNIST subset per class: train, val, test (classes in MONAI's order, sorted folder names)
MEDNIST_PER_CLASS = (200, 50, 100)


def make_mednist_copy(src: Path, dst: Path, per_class=MEDNIST_PER_CLASS, seed: int = 0) -> Path:
    """A MedMNIST-format ``.npz`` (uint8 64x64, labels ``(N, 1)``) of a seeded, class-balanced MedNIST subset."""
    from PIL import Image

    with tarfile.open(src) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpeg")), key=lambda m: m.name)
        classes = sorted({Path(m.name).parent.name for m in members})
        rng = np.random.default_rng(seed)
        splits = {"train": ([], []), "val": ([], []), "test": ([], [])}
        for label, name in enumerate(classes):
            chosen = [members[i] for i in np.flatnonzero([Path(m.name).parent.name == name for m in members])]
            chosen = [chosen[i] for i in rng.permutation(len(chosen))[: sum(per_class)]]
            start = 0
            for split, count in zip(splits, per_class):
                for member in chosen[start : start + count]:
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L")
                    splits[split][0].append(np.asarray(image, dtype=np.uint8))
                    splits[split][1].append(label)
                start += count
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8)[:, None]
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **arrays)
    return dst


if __name__ == "__main__":
    out, data = Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data")
    for name, (file, keep) in EVAL_DATASETS.items():
        print(make_eval_copy(data / file, out / name / "data.npz", keep))
    print(make_mednist_copy(data / "mednist_64.tar.gz", out / "mednist" / "data.npz"))
