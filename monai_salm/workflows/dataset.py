"""The dataset protected by the bundle's inference: every image in original units and scaled to [0, 1]."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_salm.engines import SALMSettings
from monai_salm.io import ImageRecord, IntensityScaling, load_dataset, read_image
from monai_salm.io.utils import full_suffix
from monai_salm.workflows.intensity import parse_intensity

__all__ = ["ProtectionDataset"]

_ALL_SPLITS = ("training", "validation", "test")


class ProtectionDataset(torch.utils.data.Dataset):
    """Every image of a dataset, read in original units and scaled to [0, 1] for protection.

    Items are ``{"image": (C, *spatial) float tensor in [0, 1], "label": int tensor, "index": int}``. The original
    array and its :class:`~monai_salm.io.ImageMeta` (needed to write the copy) are kept in a small cache and
    handed over by :meth:`take`.

    Args:
        source: datalist JSON (its ``training``, ``validation`` and ``test`` lists) or class folder. ``.npz``
            datasets are protected whole with ``monai-salm protect``.
        scaling: the checkpoint's intensity scaling (fitted).
        settings: when given, every image is checked against the checkpoint (dimensions, channels,
            label range) with an error naming the file. Images may have any size: they are protected at their own.
        splits: datalist keys to protect.
        cache_size: originals kept for :meth:`take` (use at least the loader's batch size).

    Raises:
        ValueError: naming the file, for an unreadable dataset or an image that does not fit the checkpoint.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        scaling: IntensityScaling | dict | str,
        settings: SALMSettings | None = None,
        splits: Sequence[str] = _ALL_SPLITS,
        cache_size: int = 8,
    ) -> None:
        self.source = Path(source)
        if full_suffix(self.source) == ".npz":
            raise ValueError(
                f"{self.source}: protect .npz datasets whole with `monai-salm protect --data {self.source.name} "
                "--out protected.npz`; the bundle's inference protects image files."
            )
        scaling = parse_intensity(scaling)
        if scaling is None or not scaling.fitted:
            raise ValueError("ProtectionDataset needs a fitted intensity scaling (the checkpoint's).")
        self.scaling = scaling
        self.settings = settings
        records = load_dataset(self.source, tuple(splits))  # a datalist listing an image twice is refused there
        if not records:
            raise ValueError(f"{self.source}: no images found (the lists {list(splits)} are empty).")
        self.records: list[ImageRecord] = records
        for r in records:
            r.relpath  # noqa: B018 - raises, naming the file, when an image lies outside the dataset root
        if settings is not None:
            for r in records:
                if r.spatial_dims != settings.spatial_dims:
                    raise ValueError(
                        f"{r.path}: image is {r.spatial_dims}D but the checkpoint is {settings.spatial_dims}D."
                    )
                if not 0 <= r.label < settings.num_classes:
                    raise ValueError(
                        f"{r.path}: label {r.label} is outside the checkpoint's {settings.num_classes} classes."
                    )
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
        record = self.records[index]
        array, meta = read_image(record)
        if not np.isfinite(array).all():
            raise ValueError(f"{record.path}: the image contains NaN or infinite values.")
        s = self.settings
        if s is not None:
            if array.shape[0] != s.in_channels:
                raise ValueError(
                    f"{record.path}: has {array.shape[0]} channel(s), the checkpoint expects {s.in_channels}."
                )
        scaling = self.scaling
        if scaling.kind == "range" and array.size and (array.max() > scaling.hi or array.min() < scaling.lo):
            # e.g. a 16-bit scan against an 8-bit checkpoint: clipped to the range, then changed by a few units of a
            # much wider range, it would be released effectively unprotected
            raise ValueError(
                f"{record.path}: values span [{array.min():g}, {array.max():g}], outside the checkpoint's intensity "
                f"range [{scaling.lo:g}, {scaling.hi:g}] (trained on other data, e.g. 8-bit); train a checkpoint on "
                "images like this one (or with an --intensity that covers them)."
            )
        return array, scaling.to_unit(array), meta

    def __getitem__(self, index: int) -> dict[str, Any]:
        array, unit, meta = self._load(index)
        self._cache[index] = (array, unit, meta)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return {"image": torch.from_numpy(unit), "label": torch.tensor(self.records[index].label), "index": index}

    def take(self, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """``(original, clean_unit, meta)`` of an item read by ``__getitem__`` (read again if not cached)."""
        item = self._cache.pop(index, None)
        return item if item is not None else self._load(index)
