"""Training and validation images of the bundle: the dataset's own validation split or a stratified hold-out."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monai_salm.io import IntensityScaling
from monai_salm.io.utils import full_suffix
from monai_salm.workflows.arrays import _TRAIN_SPLITS, TrainingArrays, load_training_arrays

__all__ = ["has_validation", "split_validation", "SALMData", "load_train_val"]

logger = logging.getLogger(__name__)

_VAL_SPLITS = ("validation",)


def has_validation(source: str | os.PathLike) -> bool:
    """Whether a datalist has a non-empty ``"validation"`` list or a ``.npz`` a ``val`` split (class folders: no)."""
    source = Path(source)
    if not source.is_file():
        return False
    suffix = full_suffix(source)
    try:
        if suffix == ".json":
            data = json.loads(source.read_text())
            return isinstance(data, dict) and isinstance(data.get("validation"), list) and bool(data["validation"])
        if suffix == ".npz":
            with np.load(source, allow_pickle=False) as f:
                return "val_images" in f.files
    except (OSError, ValueError):
        return False
    return False


def split_validation(data: TrainingArrays, fraction: float, seed: int = 0) -> tuple[TrainingArrays, TrainingArrays]:
    """Hold out a stratified fraction of the images for validation.

    Each class keeps at least one training image; ``round(n * fraction)`` of its ``n`` images go to validation.
    When nothing is held out (``fraction`` 0 or tiny classes), the validation set is the training set itself and
    the validation accuracy is the surrogate's accuracy on the protected training images.

    Returns:
        ``(train, val)``.

    Raises:
        ValueError: for ``fraction`` outside [0, 1).
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    train_idx, val_idx = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_val = min(int(round(len(members) * float(fraction))), len(members) - 1)
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()
    if not val_idx:
        logger.warning("no validation images held out: validating on the (protected) training images.")
        return data, data
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


@dataclass
class SALMData:
    """Training and validation images of the bundle, with the shapes the networks need.

    Attributes:
        source: the dataset given.
        train: training images.
        val: validation images (the datalist's ``"validation"`` list, the ``.npz`` ``val`` split, or a held-out
            part of the training images).
    """

    source: Path
    train: TrainingArrays
    val: TrainingArrays

    @property
    def scaling(self) -> IntensityScaling:
        return self.train.scaling

    @property
    def spatial_dims(self) -> int:
        return self.train.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    @property
    def image_size(self) -> list[int]:
        return self.train.image_size

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.val.num_classes)


def load_train_val(
    source: str | os.PathLike,
    intensity: str | dict | IntensityScaling | None = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    work_size: int | str | Sequence[int] | None = None,
) -> SALMData:
    """Training and validation images of a dataset (see :func:`load_training_arrays`).

    The validation images are the datalist's ``"validation"`` entries or the ``.npz`` ``val`` split when present,
    otherwise a stratified ``val_fraction`` of the training images (:func:`split_validation`), which are then
    not used for training. The intensity scaling is fitted on the training images only. Both sets are resampled
    onto the working grid ``work_size`` (``None``: the training images' own size; see :func:`load_training_arrays`).
    """
    source = Path(source)
    if has_validation(source):
        train = load_training_arrays(source, intensity, _TRAIN_SPLITS, work_size=work_size)
        val = load_training_arrays(source, train.scaling, _VAL_SPLITS, reference=train)
    else:
        train = load_training_arrays(source, intensity, _TRAIN_SPLITS, work_size=work_size)
        train, val = split_validation(train, val_fraction, seed)
    logger.info(
        f"{source}: {len(train.labels)} training and {len(val.labels)} validation images, "
        f"{train.in_channels} x {tuple(train.image_size)}, intensity {train.scaling.to_dict()}."
    )
    return SALMData(source, train, val)
