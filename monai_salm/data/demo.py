"""Embedded default dataset built offline from real scans shipped inside pydicom and nibabel.

Three classes of 28x28 uint8 patches: 0 = CT (pydicom ``CT_small.dcm``), 1 = MR (pydicom
``MR_small.dcm``), 2 = brain MR (nibabel ``tests/data/anatomical.nii``, axial slices). Patches are
random crops with flips/rot90, intensities windowed to the 0.5-99.5 percentiles of each source.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["DEMO_CLASSES", "demo_sources", "build_demo_arrays"]

DEMO_CLASSES = ("CT", "MR", "brain MR")


def demo_sources() -> list[np.ndarray]:
    """The three source scans as float arrays ``(slices, H, W)``.

    Raises:
        FileNotFoundError: when the installed pydicom/nibabel do not ship their sample files.
    """
    import nibabel as nib
    import pydicom
    from pydicom.data import get_testdata_file

    sources = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"pydicom sample file {name} is not installed.")
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        sources.append(arr[None])
    nii = Path(os.path.dirname(nib.__file__)) / "tests" / "data" / "anatomical.nii"
    if not nii.exists():
        raise FileNotFoundError(f"nibabel sample file {nii} is not installed.")
    vol = np.asarray(nib.load(str(nii)).dataobj, dtype=np.float32)
    sources.append(np.moveaxis(vol, 2, 0)[4:-4])  # axial slices, skipping the emptiest ends
    return sources


def _window(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)


def build_demo_arrays(n_train: int = 120, n_val: int = 30, n_test: int = 30, size: int = 28, seed: int = 0) -> dict:
    """MedMNIST-format arrays of the demo dataset (per class counts).

    Returns:
        ``{split}_images`` uint8 ``(N, size, size)`` and ``{split}_labels`` uint8 ``(N, 1)``.
    """
    rng = np.random.default_rng(seed)
    sources = [_window(s) for s in demo_sources()]
    arrays = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        images, labels = [], []
        for label, src in enumerate(sources):
            for _ in range(count):
                sl = src[rng.integers(src.shape[0])]
                crop = min(size * 2, sl.shape[0], sl.shape[1])
                side = int(rng.integers(min(size, crop), crop + 1))
                r, c = rng.integers(0, sl.shape[0] - side + 1), rng.integers(0, sl.shape[1] - side + 1)
                patch = sl[r : r + side, c : c + side]
                idx = np.linspace(0, side - 1, size).round().astype(int)  # nearest resize to size x size
                patch = np.rot90(patch[np.ix_(idx, idx)], int(rng.integers(4)))
                if rng.random() < 0.5:
                    patch = patch[:, ::-1]
                images.append(np.rint(patch * 255).astype(np.uint8))
                labels.append(label)
        order = rng.permutation(len(images))
        arrays[f"{split}_images"] = np.stack(images)[order]
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8)[order, None]
    return arrays
