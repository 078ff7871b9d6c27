"""Read a labelled dataset (datalist JSON, class folders, MedMNIST ``.npz``) into [0, 1] tensors for training.

Every image is checked (readable, finite, one channel count) with an error naming the file, and resampled onto one
working grid (the work size, or the images' own size, which they must then share).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from monai_salm.data.medmnist import is_rgb, load_npz, split_arrays
from monai_salm.io import ImageRecord, IntensityScaling, load_dataset, read_image
from monai_salm.io.utils import full_suffix
from monai_salm.transforms.functional import resize_images
from monai_salm.workflows.intensity import _auto_scaling, parse_intensity

__all__ = ["TrainingArrays", "load_training_arrays", "parse_work_size"]

_TRAIN_SPLITS = ("training",)
_NPZ_SPLITS = {"training": "train", "validation": "val", "test": "test", "train": "train", "val": "val"}


class TrainingArrays(NamedTuple):
    """Images of a dataset scaled to [0, 1], with their labels, records and the scaling used.

    Attributes:
        images: ``(N, C, *spatial)`` float32 in [0, 1].
        labels: ``(N,)`` int64 class indices.
        records: the :class:`~monai_salm.io.ImageRecord` of each image.
        scaling: the fitted :class:`~monai_salm.io.IntensityScaling` (original units -> [0, 1]).
    """

    images: torch.Tensor
    labels: torch.Tensor
    records: list[ImageRecord]
    scaling: IntensityScaling

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> list[int]:
        return [int(s) for s in self.images.shape[2:]]

    @property
    def num_classes(self) -> int:
        """``max(label) + 1`` (0 for no images)."""
        return int(self.labels.max()) + 1 if self.labels.numel() else 0

    def subset(self, indices: Sequence[int]) -> TrainingArrays:
        """The images at ``indices``, in that order."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TrainingArrays(self.images[idx], self.labels[idx], [self.records[i] for i in idx.tolist()], self.scaling)


def _to_unit_tensor(images: np.ndarray, scaling: IntensityScaling, chunk: int = 1024) -> torch.Tensor:
    """``scaling.to_unit`` of a stack of images as float32, without a float64 copy of the whole stack.

    A ``range`` scaling starting at 0 (the MedMNIST ``uint8 / 255`` case) is computed as ``x.float() / hi`` in
    float32, bit-identical to :func:`monai_salm.data.to_tensor`.
    """
    if scaling.kind == "range" and scaling.lo == 0.0:
        unit = torch.from_numpy(np.ascontiguousarray(images)).float() / scaling.hi
        return unit.clamp_(0.0, 1.0) if scaling.clip else unit
    out = torch.empty(images.shape, dtype=torch.float32)
    for start in range(0, images.shape[0], chunk):
        out[start : start + chunk] = torch.from_numpy(scaling.to_unit(images[start : start + chunk]))
    return out


def parse_work_size(value: int | str | Sequence[int] | None, spatial_dims: int | None = None) -> tuple[int, ...] | None:
    """A working grid from ``64``, ``"64"``, ``"128,128,64"`` or ``[128, 128, 64]`` (``None`` stays ``None``).

    A single value is used on every axis (``spatial_dims`` of them, once known).

    Raises:
        ValueError: for a size that is not one or ``spatial_dims`` positive integers.
    """
    if value is None:
        return None
    try:
        parts = [int(v) for v in str(value).replace("x", ",").split(",")] if isinstance(value, (int, str)) else [
            int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"work size must be positive integers such as 64 or 128,128,64, got {value!r}.") from None
    if not parts or any(v < 1 for v in parts) or len(parts) > 3:
        raise ValueError(f"work size must be one to three positive integers such as 64 or 128,128,64, got {value!r}.")
    if spatial_dims is not None:
        if len(parts) == 1:
            parts = parts * spatial_dims
        elif len(parts) != spatial_dims:
            raise ValueError(f"work size {tuple(parts)} has {len(parts)} values but the images are {spatial_dims}D.")
    return tuple(parts)


def _resized(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """One ``(C, *spatial)`` image resampled onto ``size`` (:func:`resize_images`), as float32."""
    if tuple(array.shape[1:]) == tuple(size):
        return array
    return resize_images(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None], size)[0].numpy()


def _npz_arrays(path: Path, intensity: IntensityScaling | None, splits: Sequence[str], limit: int | None,
                work_size: Sequence[int] | None) -> TrainingArrays:
    wanted = list(dict.fromkeys(_NPZ_SPLITS.get(s, s) for s in splits))
    arrays = load_npz(path, require=(wanted[0],))
    images, labels, records = [], [], []
    for split in wanted:
        if f"{split}_images" not in arrays:
            continue
        x, y = split_arrays(arrays, split)
        x = np.moveaxis(x, -1, 1) if is_rgb(x) else x[:, None]
        dims = x.ndim - 2
        images.append(x)
        labels.append(y)
        records += [ImageRecord(path, int(y[i]), "npz", path.parent, split=split, index=i, spatial_dims=dims)
                    for i in range(len(y))]
    stacked = np.concatenate(images) if len(images) > 1 else images[0]
    label_array = np.concatenate(labels)
    if limit:
        stacked, label_array, records = stacked[:limit], label_array[:limit], records[:limit]
    if intensity is None:
        # MedMNIST convention: uint8 0-255, float already in [0, 1] (load_npz checks both)
        if stacked.dtype == np.uint8:
            intensity = _auto_scaling([stacked.dtype], str(path))
        else:
            intensity = IntensityScaling("range", lo=0.0, hi=1.0)
    scaling = intensity.fit([stacked]) if not intensity.fitted else intensity
    images = _to_unit_tensor(stacked, scaling)
    work = parse_work_size(work_size, images.ndim - 2)
    if work is not None and tuple(images.shape[2:]) != work:
        images = torch.cat([resize_images(images[i : i + 256], work) for i in range(0, len(images), 256)])
    return TrainingArrays(images, torch.from_numpy(label_array).long(), records, scaling)


def _read_checked(records: Sequence[ImageRecord], reference: tuple[Path, int] | None = None,
                  work_size: Sequence[int] | None = None):
    """Read every image (each resampled onto ``work_size`` as it is read, when given); all must share the channel
    count (of ``reference`` when given), and without ``work_size`` the spatial size."""
    arrays, dtypes = [], []
    ref_path, ref_channels = reference if reference is not None else (None, None)
    work = first = None
    for record in records:
        array, meta = read_image(record)
        if not np.isfinite(array).all():
            raise ValueError(f"{record.path}: the image contains NaN or infinite values.")
        if ref_channels is None:
            ref_path, ref_channels = record.path, array.shape[0]
        elif array.shape[0] != ref_channels:
            raise ValueError(f"{record.path}: has {array.shape[0]} channel(s) but {ref_path} has {ref_channels}; "
                             "all images of a dataset need the same number of channels.")
        if work_size is not None:
            work = work or parse_work_size(work_size, array.ndim - 1)
            array = _resized(array, work)
        elif first is None:
            first = (record.path, array.shape[1:])
        elif array.shape[1:] != first[1]:
            raise ValueError(
                f"{record.path}: image size {tuple(array.shape[1:])} differs from {tuple(first[1])} of {first[0]}. "
                "Images of different sizes are read onto one working grid: set its size (monai-salm train "
                "--work-size, evaluate --victim-size, the bundle's work_size); a checkpoint protects every image at "
                "its own size."
            )
        arrays.append(array)
        dtypes.append(meta.dtype)
    return arrays, dtypes


def load_training_arrays(
    source: str | os.PathLike,
    intensity: str | dict | IntensityScaling | None = "auto",
    splits: Sequence[str] = _TRAIN_SPLITS,
    reference: TrainingArrays | None = None,
    limit: int | None = None,
    work_size: int | str | Sequence[int] | None = None,
) -> TrainingArrays:
    """Read a labelled dataset into memory, scaled to [0, 1].

    Args:
        source: a MONAI datalist ``.json`` (``{"training": [{"image": path, "label": int}], "validation": [...]}``),
            a folder with one subfolder per class, or a MedMNIST ``.npz`` (see :func:`monai_salm.io.load_dataset`).
        intensity: see :func:`parse_intensity`. ``"auto"``: the stored type's range for 8-bit data
            (``range:0:255``), ``range:0:1`` for a float ``.npz`` (MedMNIST convention), otherwise
            ``percentile:0.5:99.5`` fitted on these images. A percentile scaling is fitted here; a fitted scaling
            (e.g. the training set's, for its validation set) is used as is.
        splits: datalist keys / ``.npz`` splits to read (class folders have only ``"training"``).
        reference: images must also match this set's channels, and are resampled onto its size (e.g. the training
            set for a validation set).
        limit: use only the first ``limit`` images (and fit a percentile scaling on them).
        work_size: the working grid SALM trains on (``64``, ``"128,128,64"``): every image is resampled onto it as it
            is read (:func:`~monai_salm.transforms.functional.resize_images`), so memory and training cost follow
            the grid, not the native size. ``None``: the images' own size, which they must then share.

    Returns:
        :class:`TrainingArrays`.

    Raises:
        ValueError: naming the file: missing source, unsupported or unreadable file, missing or invalid label, mixed
            2D/3D images, NaN values, a bad work size, or an image whose channel count (or, without a work size,
            spatial size) differs from the others.
    """
    source = Path(source)
    scaling = parse_intensity(intensity)
    if work_size is None and reference is not None:
        work_size = reference.image_size
    if full_suffix(source) == ".npz":
        data = _npz_arrays(source, scaling, splits, limit, work_size)
        records = data.records
        if not len(data.labels):
            raise ValueError(f"{source}: the {'/'.join(splits)} split has no images.")
    else:
        records = load_dataset(source, tuple(splits))[: limit or None]
        if not records:
            raise ValueError(f"{source}: no images found.")
        ref = None if reference is None else (reference.records[0].path, reference.in_channels)
        arrays, dtypes = _read_checked(records, ref, work_size)
        if scaling is None:
            scaling = _auto_scaling(dtypes, str(source))
        if not scaling.fitted:
            scaling = scaling.fit(arrays)
        images = torch.stack([torch.from_numpy(scaling.to_unit(a)) for a in arrays])
        data = TrainingArrays(images, torch.as_tensor([r.label for r in records], dtype=torch.long), records, scaling)
    if reference is not None and (data.in_channels, *data.image_size) != (reference.in_channels, *reference.image_size):
        raise ValueError(
            f"{records[0].path}: images are {data.in_channels} x {tuple(data.image_size)} but the training images are "
            f"{reference.in_channels} x {tuple(reference.image_size)}."
        )
    return data
