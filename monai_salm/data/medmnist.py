"""MedMNIST-format ``.npz`` arrays: validated reading and atomic writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["SPLITS", "load_npz", "split_arrays", "is_rgb", "changed_pixel_fraction", "structural_similarity", "to_tensor", "from_tensor", "save_npz"]

SPLITS = ("train", "val", "test")


def load_npz(path: str | os.PathLike, require: tuple[str, ...] = ("train",)) -> dict[str, np.ndarray]:
    """Read and validate a MedMNIST-style file.

    Keys are ``{split}_images`` / ``{split}_labels``. Images are ``(N, H, W)`` (grey), ``(N, H, W, 3)``
    (RGB) or ``(N, D, H, W)`` (3D), uint8 (0-255) or float (already in [0, 1]); labels ``(N,)`` or
    ``(N, 1)`` non-negative integers.

    Args:
        path: the ``.npz`` file.
        require: splits that must be present.

    Returns:
        a dict with every array of the file.

    Raises:
        ValueError: naming the file and the problem (missing keys, shapes, dtypes, NaN, labels).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found.") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}).") from None
    for split in require:
        for suffix in ("images", "labels"):
            if f"{split}_{suffix}" not in arrays:
                raise ValueError(f"{path}: missing key '{split}_{suffix}' (found: {', '.join(sorted(arrays)) or 'none'}).")
    ndim = None
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            continue
        images, labels = arrays[f"{split}_images"], arrays.get(f"{split}_labels")
        if labels is None:
            raise ValueError(f"{path}: '{split}_images' has no '{split}_labels'.")
        if images.ndim not in (3, 4):
            raise ValueError(f"{path}: '{split}_images' must be (N,H,W), (N,H,W,3) or (N,D,H,W), got {images.shape}.")
        if ndim is not None and images.ndim != ndim:
            raise ValueError(f"{path}: '{split}_images' has {images.ndim} dims but another split has {ndim}.")
        ndim = images.ndim
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{path}: '{split}_images' must be uint8 or float, got {images.dtype}.")
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise ValueError(f"{path}: '{split}_images' contains NaN or infinite values.")
        if np.issubdtype(images.dtype, np.floating) and images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{path}: float '{split}_images' must lie in [0, 1].")
        if labels.ndim == 2 and labels.shape[1] != 1 or labels.ndim > 2:
            raise ValueError(f"{path}: '{split}_labels' must be (N,) or (N,1) class indices, got {labels.shape}.")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{path}: {images.shape[0]} '{split}_images' but {labels.shape[0]} '{split}_labels'.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: '{split}_labels' must be integers, got {labels.dtype}.")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{path}: '{split}_labels' has negative values.")
    return arrays


def split_arrays(arrays: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split, labels flattened to ``(N,)`` int64."""
    return arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1).astype(np.int64)


def is_rgb(images: np.ndarray) -> bool:
    """MedMNIST convention: a trailing axis of 3 on 4-D arrays is colour, otherwise 4-D is 3D grey."""
    return images.ndim == 4 and images.shape[-1] == 3


def structural_similarity(clean: np.ndarray, protected: np.ndarray, batch_size: int | None = None) -> float:
    """Mean SSIM (MONAI ``SSIMMetric``, Gaussian window of 7, sigma 1.5) between two MedMNIST arrays, in [0, 1] units.

    Args:
        clean: original array (``(N,H,W)``, ``(N,H,W,3)`` or ``(N,D,H,W)``; uint8 or float in [0, 1]).
        protected: the protected copy, same shape and dtype.
        batch_size: images per metric call; by default as many as make up about 16 million pixels/voxels (at most
            512), so the metric's intermediate maps stay near 1 GB whatever the image size.

    Returns:
        the SSIM averaged over channels and images (1.0 for identical arrays).
    """
    from monai.metrics import SSIMMetric

    a, b = to_tensor(clean), to_tensor(protected)
    if batch_size is None:
        batch_size = max(1, min(512, (1 << 24) // max(1, a[0].numel())))
    metric = SSIMMetric(spatial_dims=a.ndim - 2, data_range=1.0, win_size=7)
    values = [metric(b[i : i + batch_size], a[i : i + batch_size]).flatten() for i in range(0, len(a), batch_size)]
    return float(torch.cat(values).mean()) if values else 1.0


def changed_pixel_fraction(clean: np.ndarray, protected: np.ndarray) -> float:
    """Fraction of pixel/voxel positions where any channel differs between two MedMNIST arrays."""
    diff = clean != protected
    return float((diff.any(-1) if is_rgb(clean) else diff).mean())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """MedMNIST images -> float ``(N, C, *spatial)`` in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if images.dtype == np.uint8 else x.float()
    if is_rgb(images):
        return x.permute(0, 3, 1, 2).contiguous()
    return x.unsqueeze(1)


def from_tensor(x: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_tensor`, back to the layout and dtype of ``like`` (uint8 rounds)."""
    if is_rgb(like):
        x = x.permute(0, 2, 3, 1)
    else:
        x = x[:, 0]
    arr = x.detach().cpu().numpy()
    if like.dtype == np.uint8:
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return arr.astype(like.dtype)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write a compressed ``.npz`` atomically (temporary file + rename)."""
    from monai_salm.io.utils import atomic_path  # io.readers imports this module

    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return path
