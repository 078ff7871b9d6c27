"""Protect a MedMNIST-style ``.npz`` release: every split (or the chosen ones) in one file, same keys and dtypes."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_salm.api import protect_tensor, protection_stats
from monai_salm.data import (
    SPLITS,
    changed_pixel_fraction,
    from_tensor,
    load_npz,
    save_npz,
    split_arrays,
    structural_similarity,
    to_tensor,
)
from monai_salm.engines import SALMSettings, load_protection
from monai_salm.engines.distributed import barrier, gather, is_main, rank, world_size
from monai_salm.workflows.intensity import scaling_from_settings

__all__ = ["npz_output", "check_npz_scaling", "release_stats", "unselected", "protect_npz"]


def npz_output(out: str | os.PathLike, data: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output file of a ``.npz`` release, refused if it exists (without ``overwrite``) or is the input.

    Raises:
        ValueError: naming the file.
    """
    out = Path(out)
    if out.suffix.lower() != ".npz":
        raise ValueError(f"{out}: a .npz release is written to a .npz file; give --out a .npz name.")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; a .npz release is written to a .npz file.")
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{out}: is a broken symbolic link; give --out a file path.")
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: already exists (pass --overwrite to replace it).")
    if out.resolve() == Path(data).resolve():
        raise ValueError(f"{out}: refusing to overwrite the input file.")
    return out


def check_npz_scaling(checkpoint: str | os.PathLike, data: str | os.PathLike, settings: SALMSettings,
                      dtype: np.dtype) -> None:
    """A ``.npz`` is protected in the MedMNIST scaling (uint8 / 255, float as is): the checkpoint must use it too.

    Raises:
        ValueError: naming the checkpoint, when its intensity scaling is another one.
    """
    scaling = scaling_from_settings(settings)
    expected = (0.0, 255.0) if dtype == np.uint8 else (0.0, 1.0)
    if scaling.kind != "range" or (scaling.lo, scaling.hi) != expected:
        raise ValueError(
            f"{checkpoint}: trained with intensity scaling {scaling.to_dict()}, but {data} is protected in "
            f"the .npz scaling range:{expected[0]:g}:{expected[1]:g}; train on it with --intensity auto."
        )


def release_stats(clean: np.ndarray, protected: np.ndarray) -> dict:
    """PSNR, SSIM, maximum change and changed-pixel fraction of a released split (uint8: 0-255, float: 0-1)."""
    stats = protection_stats(clean, protected, 255.0 if clean.dtype == np.uint8 else 1.0)
    stats["changed_pixel_fraction"] = changed_pixel_fraction(clean, protected)
    stats["ssim"] = structural_similarity(clean, protected)
    return stats


def unselected(labels: np.ndarray, classes: Sequence[int] | None, fraction: float, seed: int) -> torch.Tensor:
    """Images left clean: those outside ``classes``, and outside a seeded random ``fraction`` of each class."""
    labels = torch.from_numpy(labels).long()
    keep = torch.zeros(len(labels), dtype=torch.bool)
    if classes:
        keep |= ~torch.isin(labels, torch.as_tensor(list(classes)))
    if fraction < 1.0:
        generator = torch.Generator().manual_seed(seed)
        for c in labels.unique():
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=generator)]
            keep[idx[round(fraction * len(idx)):]] = True
    return keep


def protect_npz(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    fraction: float = 1.0,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    amp: bool | None = None,
    progress: bool = False,
) -> dict:
    """Protect the splits of a MedMNIST-format ``.npz`` and write the release (same keys, dtypes and shapes).

    Args:
        checkpoint: a monai-salm checkpoint trained on this scaling (uint8 / 255, or float in [0, 1]).
        data: the ``.npz``; its images may have any size (see :func:`~monai_salm.api.protect_tensor`).
        out: the release ``.npz`` (not ``data``; replaced only with ``overwrite``).
        splits: splits to protect (default: every split in the file, the whole release); the others are copied.
        classes: protect only the images of these classes (the others are copied unchanged).
        fraction: protect a seeded random fraction of each class's images.
        overwrite: replace an existing ``out``.
        device, seed, amp, progress: see :func:`~monai_salm.api.protect_tensor`.

    Returns:
        per split: :func:`release_stats` and ``protected_images``; plus ``protect_seconds`` and ``out``.

    Raises:
        ValueError: naming the file, for a bad checkpoint, split, scaling, fraction or output; nothing is written.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}.")
    out = npz_output(out, data, overwrite)
    settings, generator, surrogate, class_scores = load_protection(checkpoint, device)
    arrays = load_npz(data, require=())
    splits = list(splits) if splits else [split for split in SPLITS if f"{split}_images" in arrays]
    if classes:
        outside = sorted({int(c) for c in classes if not 0 <= int(c) < settings.num_classes})
        if outside:
            raise ValueError(f"--classes {outside}: not classes of this checkpoint (0..{settings.num_classes - 1}).")
        labels = [arrays[f"{split}_labels"] for split in splits if f"{split}_labels" in arrays]
        present = {int(v) for values in labels for v in np.unique(values)}
        if not present & {int(c) for c in classes}:
            raise ValueError(f"{data}: no image of the classes {sorted(set(classes))} in the splits {splits}.")
    result, report = dict(arrays), {}
    start = time.perf_counter()
    for split in splits:
        if f"{split}_images" not in arrays:
            raise ValueError(f"{data}: no split '{split}' to protect.")
        images, labels = split_arrays(arrays, split)
        check_npz_scaling(checkpoint, data, settings, images.dtype)
        x = to_tensor(images)
        try:
            protected = _protect_shared(x, torch.from_numpy(labels), settings, generator, surrogate, class_scores,
                                        device=device, seed=seed, progress=progress, amp=amp)
        except ValueError as e:
            raise ValueError(f"{data}: {e}") from None
        keep_clean = unselected(labels, classes, fraction, seed)
        protected[keep_clean] = x[keep_clean]
        result[f"{split}_images"] = from_tensor(protected, images)
        report[split] = {**release_stats(images, result[f"{split}_images"]),
                         "protected_images": int((~keep_clean).sum())}
    report["protect_seconds"] = round(time.perf_counter() - start, 2)
    if is_main():
        save_npz(out, result)
    barrier()
    return {"out": str(out), **report}


def _protect_shared(images: torch.Tensor, labels: torch.Tensor, *args, batch_size: int = 256, **kwargs) -> torch.Tensor:
    """:func:`~monai_salm.api.protect_tensor` over all processes under ``torch.distributed``: each protects every
    N-th batch, and all receive the whole result, identical to one process's."""
    count = world_size()
    if count <= 1:
        return protect_tensor(images, labels, *args, batch_size=batch_size, **kwargs)[0]
    mine, _ = protect_tensor(images, labels, *args, batch_size=batch_size, shard=(rank(), count), **kwargs)
    parts = [part.split(batch_size) for part in gather(mine)]
    batches = [parts[b % count][b // count] for b in range(-(-images.shape[0] // batch_size))]
    return torch.cat(batches) if batches else images[:0].float()
