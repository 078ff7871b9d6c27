"""A flat class code on the region whose brightness says least about the class: a measurement of form, not a method.

A victim that has fitted a release's shortcut answers clean images by whatever it reads where the shortcut was.
If the release adds a flat value per class over a region, what the victim reads on clean images is that region's
brightness, so the region is chosen among flip-symmetric unions of ``--cell``-pixel cells (every attacker flip maps
it onto itself) as the one whose brightness, averaged over the attacker's shifts, separates the classes least on the
training and validation splits (AUC closest to 0.5 on each). Class 0 gets ``-eps``, class 1 ``+eps`` there, with
epsilon set for ``--psnr`` over the region; every split is protected, so the output is a release ``evaluate`` reads.
Binary 2D greyscale ``.npz`` only (``benchmarks/eval_data.py`` layout).

    python benchmarks/flat_region.py RUN/pneumonia/data.npz flat.npz [--cells 4-9] [--psnr 32.5]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from shortcut_energy import shifted  # run from benchmarks/, as the usage line shows


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (1 positive)."""
    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(labels)))


def flip_orbits(rows: int, cols: int) -> list[tuple[tuple[int, int], ...]]:
    """The cells of a ``rows x cols`` grid grouped into the sets that the flips along both axes map onto themselves."""
    return sorted({tuple(sorted({(i, j), (rows - 1 - i, j), (i, cols - 1 - j), (rows - 1 - i, cols - 1 - j)}))
                   for i in range(rows) for j in range(cols)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clean", help="clean .npz with train/val/test images and labels")
    parser.add_argument("out", help="release .npz to write")
    parser.add_argument("--cells", default="4-9", help="range of region sizes, in cells")
    parser.add_argument("--cell", type=int, default=4, help="cell side in pixels")
    parser.add_argument("--shift", type=int, default=2, help="the attacker's largest shift in pixels")
    parser.add_argument("--psnr", type=float, default=32.5, help="PSNR the flat code is sized for, before clipping")
    args = parser.parse_args()

    data = dict(np.load(args.clean))
    labels = {s: data[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")}
    if data["train_images"].ndim != 3 or any(set(np.unique(v)) - {0, 1} for v in labels.values()):
        raise SystemExit(f"{args.clean}: binary 2D greyscale splits expected")
    lo, hi = (int(v) for v in args.cells.split("-"))
    c = args.cell
    height, width = data["train_images"].shape[1:]
    rows, cols = height // c, width // c

    def cell_means(split: str) -> np.ndarray:
        images = shifted(torch.from_numpy(data[f"{split}_images"].astype(np.float32) / 255.0), args.shift).numpy()
        return images[:, :rows * c, :cols * c].reshape(len(images), rows, c, cols, c).mean((2, 4))

    means = {s: cell_means(s) for s in ("train", "val")}
    best = None
    orbits = flip_orbits(rows, cols)
    for size in range(1, len(orbits) + 1):
        for combo in itertools.combinations(orbits, size):
            cells = [cell for orbit in combo for cell in orbit]
            if not lo <= len(cells) <= hi:
                continue
            aucs = [auc(np.mean([means[s][:, i, j] for i, j in cells], axis=0), labels[s]) for s in means]
            score = sum(abs(a - 0.5) for a in aucs)
            if best is None or score < best[0]:
                best = (score, aucs, cells)
    _, aucs, cells = best
    mask = np.zeros((height, width), bool)
    for i, j in cells:
        mask[i * c:(i + 1) * c, j * c:(j + 1) * c] = True
    eps = 255.0 * np.sqrt(10 ** (-args.psnr / 10) / mask.mean())
    release = {}
    for split in ("train", "val", "test"):
        images = data[f"{split}_images"].astype(np.float32)
        change = np.where(labels[split] == 1, 1.0, -1.0)[:, None, None] * eps * mask
        protected = np.clip(np.rint(images + change), 0, 255)
        if split == "train":
            psnr = 10 * np.log10(1 / np.mean(((protected - images) / 255.0) ** 2))
        release[f"{split}_images"] = protected.astype(data[f"{split}_images"].dtype)
        release[f"{split}_labels"] = data[f"{split}_labels"]
    np.savez_compressed(args.out, **release)
    test = data["test_images"].astype(np.float32)[:, mask].mean(1)
    print(json.dumps({
        "cells": cells, "eps": round(float(eps), 2), "changed_percent": round(100 * float(mask.mean()), 2),
        "psnr_train_db": round(float(psnr), 2),
        "region_auc_train_val": [round(a, 4) for a in aucs],
        "region_auc_test": round(auc(test, labels["test"]), 4),
    }))


if __name__ == "__main__":
    main()
