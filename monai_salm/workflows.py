"""Dataset-to-protected-copy workflows shared by the ``monai-salm`` command line and the bundle.

Both ``monai-salm train|protect`` and ``bundles/salm_protect`` (``python -m monai.bundle run``) go through the
functions and classes here, so a dataset is read, scaled, checked, protected and written the same way:

- :func:`load_training_arrays` / :func:`load_train_val`: a MONAI datalist JSON, a folder with one subfolder per
  class, or a MedMNIST ``.npz`` -> ``(N, C, *spatial)`` tensors in [0, 1] with an explicit
  :class:`~monai_salm.io.IntensityScaling` (stored in the checkpoint, it defines what epsilon means in original
  units);
- :class:`BundleNoiseGenerator`, :func:`make_settings`, :class:`ProtectedValidationInferer`,
  :class:`SaveProtection`: the pieces of the bundle's training config around
  :class:`~monai_salm.engines.SALMTrainer`;
- :func:`load_checkpoint`, :class:`ProtectionDataset`, :class:`ProtectInferer`, :class:`ProtectedCopySaver`,
  :func:`protect_evaluator`, :func:`protect_files`: protect every image of a dataset with a checkpoint and write
  the copy in the same formats and layout, with a manifest.

The SALM math itself lives in :mod:`monai_salm.api`, :mod:`monai_salm.engines` and
:mod:`monai_salm.transforms.functional`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator
from monai.inferers import Inferer

from monai_salm.api import protect_tensor
from monai_salm.data.medmnist import is_rgb, load_npz, split_arrays
from monai_salm.engines import SALMSettings, load_protection, save_protection
from monai_salm.io import (
    DEFAULT_DESCRIPTION,
    ImageRecord,
    IntensityScaling,
    ProtectedCopyWriter,
    load_dataset,
    read_image,
    read_manifest,
)
from monai_salm.io.utils import full_suffix
from monai_salm.networks import NoiseGenerator

__all__ = [
    "TrainingArrays",
    "SALMData",
    "Protection",
    "parse_intensity",
    "scaling_from_settings",
    "has_validation",
    "load_training_arrays",
    "split_validation",
    "load_train_val",
    "NetworkShape",
    "network_shape",
    "BundleNoiseGenerator",
    "make_settings",
    "ProtectedValidationInferer",
    "SaveProtection",
    "load_checkpoint",
    "ProtectionDataset",
    "ProtectInferer",
    "ProtectedCopySaver",
    "protect_evaluator",
    "protect_files",
    "log_checkpoint",
    "log_manifest",
]

logger = logging.getLogger(__name__)

_TRAIN_SPLITS = ("training",)
_VAL_SPLITS = ("validation",)
_ALL_SPLITS = ("training", "validation", "test")
_NPZ_SPLITS = {"training": "train", "validation": "val", "test": "test", "train": "train", "val": "val"}
_PERCENTILE_DEFAULT = (0.5, 99.5)


# ---------------------------------------------------------------------------------------------- intensity


def parse_intensity(spec: str | dict | IntensityScaling | None) -> IntensityScaling | None:
    """Read an intensity-scaling specification.

    Args:
        spec: ``"auto"`` or None (decided from the data, see :func:`load_training_arrays`), ``"window:LO:HI"``
            (e.g. a CT Hounsfield window ``window:-1000:1000``), ``"range:LO:HI"`` (e.g. ``range:0:255``),
            ``"percentile:LOWER:UPPER"`` (e.g. ``percentile:0.5:99.5``, fitted on the training images), an
            :meth:`IntensityScaling.to_dict` dictionary, or an :class:`IntensityScaling`.

    Returns:
        the scaling, or None for ``"auto"``.

    Raises:
        ValueError: for anything else.
    """
    if spec is None or isinstance(spec, IntensityScaling):
        return spec
    if isinstance(spec, dict):
        return IntensityScaling.from_dict(spec)
    if not isinstance(spec, str):
        raise ValueError(f"intensity must be 'auto', 'window:LO:HI', 'range:LO:HI' or 'percentile:P:Q', got {spec!r}.")
    text = spec.strip()
    if text.lower() == "auto":
        return None
    parts = text.split(":")
    if len(parts) != 3 or parts[0].lower() not in ("window", "range", "percentile"):
        raise ValueError(
            f"intensity must be 'auto', 'window:LO:HI', 'range:LO:HI' or 'percentile:P:Q', got {spec!r}."
        )
    try:
        a, b = float(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(f"intensity {spec!r}: the two bounds must be numbers.") from None
    kind = parts[0].lower()
    if kind == "percentile":
        return IntensityScaling("percentile", lower=a, upper=b)
    return IntensityScaling(kind, lo=a, hi=b)


def scaling_from_settings(settings: SALMSettings) -> IntensityScaling:
    """The :class:`IntensityScaling` stored in a checkpoint's ``settings.intensity``.

    Raises:
        ValueError: for an unknown or unfitted scaling.
    """
    data = dict(settings.intensity or {})
    scaling = IntensityScaling.from_dict(data)
    if not scaling.fitted:
        raise ValueError(f"the checkpoint's intensity scaling {data} has no lo/hi.")
    return scaling


def _auto_scaling(dtypes: Sequence[np.dtype], what: str) -> IntensityScaling:
    """Default scaling: the stored type's range for 8-bit data, percentiles 0.5-99.5 otherwise."""
    kinds = {np.dtype(d) for d in dtypes}
    if len(kinds) == 1:
        dtype = kinds.pop()
        if dtype.kind in "iu" and dtype.itemsize == 1:
            info = np.iinfo(dtype)
            return IntensityScaling("range", lo=float(info.min), hi=float(info.max))
    lower, upper = _PERCENTILE_DEFAULT
    logger.info(f"{what}: not 8-bit data, intensity scaling percentile:{lower}:{upper}.")
    return IntensityScaling("percentile", lower=lower, upper=upper)


# ---------------------------------------------------------------------------------------------- training data


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


def _npz_arrays(path: Path, intensity: IntensityScaling | None, splits: Sequence[str], limit: int | None
                ) -> TrainingArrays:
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
    return TrainingArrays(_to_unit_tensor(stacked, scaling), torch.from_numpy(label_array).long(), records, scaling)


def _read_checked(records: Sequence[ImageRecord], reference: tuple[Path, tuple[int, ...]] | None = None):
    """Read every image; all must share the channel count and spatial size (of ``reference`` when given)."""
    arrays, dtypes = [], []
    ref_path, ref_shape = reference if reference is not None else (None, None)
    for record in records:
        array, meta = read_image(record)
        if not np.isfinite(array).all():
            raise ValueError(f"{record.path}: the image contains NaN or infinite values.")
        if ref_shape is None:
            ref_path, ref_shape = record.path, tuple(array.shape)
        elif tuple(array.shape) != ref_shape:
            if array.shape[0] != ref_shape[0]:
                raise ValueError(f"{record.path}: has {array.shape[0]} channel(s) but {ref_path} has {ref_shape[0]}; "
                                 "all images of a dataset need the same number of channels.")
            raise ValueError(
                f"{record.path}: image size {tuple(array.shape[1:])} differs from {tuple(ref_shape[1:])} of "
                f"{ref_path}. "
                "SALM's class masks and patterns are per position, so all training images must share one spatial "
                "size: resample or crop them beforehand (e.g. monai.transforms.Resize / ResizeWithPadOrCrop)."
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
        reference: images must also match this set's channels and spatial size (e.g. the training set for a
            validation set).
        limit: use only the first ``limit`` images (and fit a percentile scaling on them).

    Returns:
        :class:`TrainingArrays`.

    Raises:
        ValueError: naming the file: missing source, unsupported or unreadable file, missing or invalid label, mixed
            2D/3D images, NaN values, or an image whose channels or spatial size differ from the others (SALM
            needs one size; resample beforehand).
    """
    source = Path(source)
    scaling = parse_intensity(intensity)
    if full_suffix(source) == ".npz":
        data = _npz_arrays(source, scaling, splits, limit)
        records = data.records
    else:
        records = load_dataset(source, tuple(splits))[: limit or None]
        if not records:
            raise ValueError(f"{source}: no images found.")
        ref = None if reference is None else (reference.records[0].path, (reference.in_channels, *reference.image_size))
        arrays, dtypes = _read_checked(records, ref)
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
) -> SALMData:
    """Training and validation images of a dataset (see :func:`load_training_arrays`).

    The validation images are the datalist's ``"validation"`` entries or the ``.npz`` ``val`` split when present,
    otherwise a stratified ``val_fraction`` of the training images (:func:`split_validation`), which are then
    not used for training. The intensity scaling is fitted on the training images only.
    """
    source = Path(source)
    if has_validation(source):
        train = load_training_arrays(source, intensity, _TRAIN_SPLITS)
        val = load_training_arrays(source, train.scaling, _VAL_SPLITS, reference=train)
    else:
        train, val = split_validation(load_training_arrays(source, intensity, _TRAIN_SPLITS), val_fraction, seed)
    logger.info(
        f"{source}: {len(train.labels)} training and {len(val.labels)} validation images, "
        f"{train.in_channels} x {tuple(train.image_size)}, intensity {train.scaling.to_dict()}."
    )
    return SALMData(source, train, val)


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class NetworkShape:
    """What the bundle's networks are built for: image dimensions, channels, spatial size and classes."""

    spatial_dims: int
    in_channels: int
    image_size: list[int]
    num_classes: int


def network_shape(source: str | os.PathLike, reference: dict | None = None) -> NetworkShape:
    """Network shapes for a dataset, without loading it: from the data when ``source`` exists, else ``reference``.

    With an existing ``source``, the headers of every image are probed (:func:`monai_salm.io.load_dataset`) and the
    first image is read: dimensions, channels and size come from it, the class count is ``max(label) + 1`` over the
    training and validation entries. :func:`load_training_arrays` later checks that every image has that size.

    Without it (e.g. ``python -m monai.bundle verify_net_in_out``, which has no dataset), the bundle metadata's
    ``network_data_format`` is used: ``inputs#image`` gives channels and spatial shape, ``inputs#label#value_range``
    ``[0, C - 1]`` the class count.

    Args:
        source: the dataset (datalist JSON, class folder or ``.npz``).
        reference: the metadata's ``network_data_format``.

    Raises:
        ValueError: when ``source`` is missing and no reference is given, or the dataset cannot be read.
    """
    path = Path(source)
    if not path.exists():
        if not reference:
            raise ValueError(f"{path}: not found.")
        image = reference["inputs"]["image"]
        label = reference["inputs"].get("label", {})
        num_classes = int(label.get("value_range", [0, 1])[-1]) + 1
        logger.info(f"{path} not found: network shapes from the metadata's network_data_format.")
        return NetworkShape(len(image["spatial_shape"]), int(image["num_channels"]),
                            [int(v) for v in image["spatial_shape"]], num_classes)
    if full_suffix(path) == ".npz":
        arrays = load_npz(path, require=("train",))
        x = arrays["train_images"]
        labels = [arrays[f"{s}_labels"] for s in ("train", "val") if f"{s}_labels" in arrays]
        x = np.moveaxis(x, -1, 1) if is_rgb(x) else x[:, None]
        num_classes = max(int(v.max()) for v in labels if v.size) + 1
        return NetworkShape(x.ndim - 2, int(x.shape[1]), [int(v) for v in x.shape[2:]], num_classes)
    records = load_dataset(path, ("training", "validation"))
    if not records:
        raise ValueError(f"{path}: no images found.")
    first, _ = read_image(records[0])
    return NetworkShape(first.ndim - 1, int(first.shape[0]), [int(v) for v in first.shape[1:]],
                        max(r.label for r in records) + 1)


class BundleNoiseGenerator(NoiseGenerator):
    """:class:`~monai_salm.networks.NoiseGenerator` that can also be called the way bundle tools call a network.

    SALM always calls a label-conditioned generator as ``G(x, y)`` with a ``(B,)`` label tensor. Bundle tools
    such as ``python -m monai.bundle verify_net_in_out`` call ``net(x)`` or pass plain values, so:

    - ``y`` may be a Python int or list (``--extra_forward_args "{'y': 0}"``); a single label is used for every
      image of the batch;
    - ``y=None`` on a label-conditioned generator returns its label-free part: the UNet with all-zero label maps
      and no class pattern (same shape and dtype as the conditioned output, which adds the class pattern).

    Weights are those of ``NoiseGenerator``: checkpoints load into either class.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor | int | Sequence[int] | None = None) -> torch.Tensor:
        if y is None and self.label_conditioned:
            spatial = x.shape[2:]
            x = torch.cat([x, x.new_zeros(x.shape[0], self.num_classes, *spatial)], dim=1)
            pad = []
            for size in reversed(spatial):
                pad += [0, (-size) % self.divisor]
            padded = torch.nn.functional.pad(x, pad, mode="replicate") if any(pad) else x
            return self.net(padded)[(..., *[slice(0, s) for s in spatial])]
        if y is not None and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y, dtype=torch.long, device=x.device).reshape(-1)
            if y.numel() == 1:
                y = y.expand(x.shape[0])
        return super().forward(x, y)


def _generator_kwargs(generator: NoiseGenerator) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"channels": [int(c) for c in generator.net.channels],
                              "strides": [int(s) for s in generator.net.strides]}
    if generator.pattern_size is not None:
        kwargs["pattern_size"] = list(generator.pattern_size)
    return kwargs


def make_settings(
    generator: NoiseGenerator,
    data: SALMData | TrainingArrays,
    k: float | int,
    epsilon: float,
    mask_mode: str,
    surrogate: str = "resnet18",
    num_classes: int | None = None,
) -> SALMSettings:
    """The :class:`~monai_salm.engines.SALMSettings` of a bundle training run (stored in ``models/model.pt``).

    Args:
        generator: the bundle's ``network_def``.
        data: the training data (its shapes and intensity scaling are recorded).
        k, epsilon, mask_mode: the trainer's settings.
        surrogate: the surrogate's architecture name (:func:`monai_salm.networks.build_classifier`).
        num_classes: default: ``data.num_classes``.

    Raises:
        ValueError: when the generator does not match the data (dimensions, channels, class pattern size).
    """
    if generator.spatial_dims != data.spatial_dims or generator.in_channels != data.in_channels:
        raise ValueError(
            f"network_def is {generator.spatial_dims}D with {generator.in_channels} channel(s) but the data is "
            f"{data.spatial_dims}D with {data.in_channels}."
        )
    num_classes = int(num_classes or data.num_classes)
    if generator.label_conditioned and generator.num_classes != num_classes:
        raise ValueError(f"network_def has {generator.num_classes} classes but the data has {num_classes}.")
    if generator.pattern_size is not None and list(generator.pattern_size) != list(data.image_size):
        raise ValueError(
            f"network_def's class pattern is {generator.pattern_size} but the images are {tuple(data.image_size)}."
        )
    return SALMSettings(
        spatial_dims=data.spatial_dims,
        in_channels=data.in_channels,
        num_classes=num_classes,
        image_size=tuple(data.image_size),
        epsilon=float(epsilon),
        k=k,
        value_range=(0.0, 1.0),
        intensity=data.scaling.to_dict(),
        mask_mode=mask_mode,
        label_conditioned=generator.label_conditioned,
        surrogate=surrogate,
        generator=_generator_kwargs(generator),
    )


class ProtectedValidationInferer(Inferer):
    """Validation inferer of the bundle: the surrogate's logits on PROTECTED validation images.

    Each validation batch is protected exactly as released images are (:func:`monai_salm.api.protect_tensor`)
    with the bound :class:`~monai_salm.engines.SALMTrainer`'s current generator and masks (class masks in
    ``"class"`` mode, the surrogate's saliency in ``"sample"`` mode), then classified by ``network`` (the
    surrogate). Use with ``PrepareBatchExtraInput({"labels": "label"})``.

    Args:
        settings: the run's settings (epsilon, k, mask mode, value range).
    """

    def __init__(self, settings: SALMSettings) -> None:
        super().__init__()
        self.settings = settings
        self.trainer = None

    def bind(self, trainer: Engine) -> ProtectedValidationInferer:
        """Use ``trainer``'s generator and masks; returns ``self``."""
        self.trainer = trainer
        return self

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, labels: torch.Tensor, *args, **kwargs):
        if self.trainer is None:
            raise RuntimeError("ProtectedValidationInferer is not bound to a SALMTrainer: call bind(trainer) first.")
        protected, _ = protect_tensor(
            inputs, labels, self.settings, self.trainer.generator, network, self.trainer.class_scores,
            batch_size=max(1, inputs.shape[0]), device=inputs.device, seed=self.trainer.seed,
        )
        network.eval()
        return network(protected.to(inputs.device))


class SaveProtection:
    """Handler writing the monai-salm checkpoint (:func:`monai_salm.engines.save_protection`) when training ends.

    At ``COMPLETED`` it recomputes the final masks (and clean batch-norm statistics) of the
    :class:`~monai_salm.engines.SALMTrainer`, as :func:`monai_salm.api.train_salm` does, and saves generator,
    surrogate, class score maps and settings to ``path`` (atomically).

    Args:
        path: the checkpoint file (the bundle's ``models/model.pt``).
        settings: from :func:`make_settings`.
        extra: more values to store under ``"extra"`` (the data source, ...).
    """

    def __init__(self, path: str | os.PathLike, settings: SALMSettings, extra: dict | None = None) -> None:
        self.path = Path(path)
        self.settings = settings
        self.extra = dict(extra or {})
        self._start = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        engine.refresh_masks()
        extra = {
            **{k: str(v) if isinstance(v, os.PathLike) else v for k, v in self.extra.items()},
            "epochs_run": int(engine.state.epoch),
            "protected_accuracy": engine.state.metrics.get("protected_accuracy"),
            "train_seconds": None if self._start is None else time.perf_counter() - self._start,
        }
        save_protection(self.path, self.settings, engine.generator, engine.surrogate, engine.class_scores, extra=extra)
        engine.logger.info(f"saved the monai-salm checkpoint to {self.path}.")


def log_checkpoint(path: str | os.PathLike) -> dict:
    """Log (and return) a one-line summary of a checkpoint: epochs run, protected accuracy, budget, intensity."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    s, extra = payload["settings"], payload.get("extra", {})
    summary = {
        "checkpoint": str(path),
        "epochs_run": extra.get("epochs_run"),
        "protected_accuracy": extra.get("protected_accuracy"),
        "k": s["k"],
        "epsilon": s["epsilon"],
        "epsilon_in_original_units": scaling_from_settings(SALMSettings(**s)).epsilon_in_units(s["epsilon"]),
        "intensity": s["intensity"],
        "image_size": list(s["image_size"]),
        "num_classes": s["num_classes"],
    }
    logger.info(f"monai-salm checkpoint: {json.dumps(summary)}")
    return summary


# ---------------------------------------------------------------------------------------------- protection


class Protection(NamedTuple):
    """A loaded checkpoint: what :func:`monai_salm.api.protect_tensor` needs, plus the intensity scaling."""

    settings: SALMSettings
    generator: torch.nn.Module
    surrogate: torch.nn.Module
    class_scores: torch.Tensor | None
    scaling: IntensityScaling


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Protection:
    """Load a monai-salm checkpoint (:func:`monai_salm.engines.load_protection`) with its intensity scaling.

    Raises:
        ValueError: for a missing or invalid checkpoint.
    """
    if not Path(path).is_file():
        raise ValueError(f"{path}: checkpoint not found.")
    settings, generator, surrogate, class_scores = load_protection(path, device)
    return Protection(settings, generator, surrogate, class_scores, scaling_from_settings(settings))


class ProtectionDataset(torch.utils.data.Dataset):
    """Every image of a dataset, read in original units and scaled to [0, 1] for protection.

    Items are ``{"image": (C, *spatial) float tensor in [0, 1], "label": int tensor, "index": int}``. The original
    array and its :class:`~monai_salm.io.ImageMeta` (needed to write the copy) are kept in a small cache and
    handed over by :meth:`take`.

    Args:
        source: datalist JSON (its ``training``, ``validation`` and ``test`` lists) or class folder. ``.npz``
            datasets are protected whole with ``monai-salm protect``.
        scaling: the checkpoint's intensity scaling (fitted).
        settings: when given, every image is checked against the checkpoint (dimensions, channels, class-mask
            size, label range) with an error naming the file.
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
        records, seen = [], set()
        for record in load_dataset(self.source, tuple(splits)):
            key = Path(record.path).resolve()
            if key not in seen:
                seen.add(key)
                records.append(record)
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
            if s.mask_mode == "class" and tuple(array.shape[1:]) != tuple(s.image_size):
                raise ValueError(f"{record.path}: image size {tuple(array.shape[1:])} differs from the checkpoint's "
                                 f"{tuple(s.image_size)} (class masks are per position; resample beforehand).")
        return array, self.scaling.to_unit(array), meta

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


class ProtectInferer(Inferer):
    """Inference inferer: ``network`` is the generator; returns the protected images (in [0, 1]).

    One saliency gradient (or the class mask) and one generator pass per image, via
    :func:`monai_salm.api.protect_tensor`. Use with ``PrepareBatchExtraInput({"labels": "label"})``.

    Args:
        settings, surrogate, class_scores: from the checkpoint (:func:`load_checkpoint`).
        seed: seed of the random-mask ablation.
    """

    def __init__(self, settings: SALMSettings, surrogate: torch.nn.Module, class_scores: torch.Tensor | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.settings, self.surrogate, self.class_scores, self.seed = settings, surrogate, class_scores, seed

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, labels: torch.Tensor, *args, **kwargs):
        protected, _ = protect_tensor(
            inputs, labels, self.settings, network, self.surrogate, self.class_scores,
            batch_size=max(1, inputs.shape[0]), device=inputs.device, seed=self.seed,
        )
        return protected.to(inputs.device)


class ProtectedCopySaver:
    """Evaluator handler writing each protected image as a copy of its file, and the manifest at the end.

    The change made in [0, 1] is carried back onto the original values with
    :meth:`IntensityScaling.apply_delta` and written by :class:`~monai_salm.io.ProtectedCopyWriter` (same format,
    metadata and relative layout; temporary name then rename). If the run fails, the files written so far (and
    the folders it created) are removed, so a failed run leaves no partial output.

    Args:
        dataset: the :class:`ProtectionDataset` the evaluator reads.
        output_dir: where the copy goes (must be outside the input, and empty unless ``overwrite``).
        overwrite: allow a non-empty ``output_dir``.
        manifest_name: manifest file name inside ``output_dir`` (``.csv`` or ``.json``).
        description: DICOM DerivationDescription.
    """

    def __init__(self, dataset: ProtectionDataset, output_dir: str | os.PathLike, overwrite: bool = False,
                 manifest_name: str = "manifest.csv", description: str = DEFAULT_DESCRIPTION) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.manifest_name = manifest_name
        self.description = description
        self.writer: ProtectedCopyWriter | None = None
        self.manifest_path: Path | None = None
        self._created: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def started(self, engine: Engine) -> None:
        missing = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        self.writer = ProtectedCopyWriter(self.output_dir, self.dataset.records, overwrite=self.overwrite,
                                          description=self.description)
        self._created = missing  # folders this run made (removed again if it fails)

    def iteration_completed(self, engine: Engine) -> None:
        protected = engine.state.output["pred"].detach().cpu().numpy()
        indices = engine.state.batch["index"]
        for j, index in enumerate(torch.as_tensor(indices).reshape(-1).tolist()):
            original, clean_unit, meta = self.dataset.take(index)
            array = self.dataset.scaling.apply_delta(original, clean_unit, protected[j])
            self.writer.write(self.dataset.records[index], meta, array, original=original)

    def completed(self, engine: Engine) -> None:
        self.manifest_path = self.writer.write_manifest(self.output_dir / self.manifest_name)
        engine.logger.info(f"wrote {len(self.writer.entries)} protected file(s) and the manifest {self.manifest_path}.")

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        self.cleanup()
        raise e

    def cleanup(self) -> None:
        """Remove the files written so far and the folders this run created, if empty."""
        if self.writer is not None:
            folders = set()
            for entry in self.writer.entries:
                out = Path(entry.output_path)
                out.unlink(missing_ok=True)
                folders.update(p for p in out.parents if self.output_dir in (p, *p.parents))
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                if folder != self.output_dir and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            self.writer.entries.clear()
        for folder in self._created:  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def protect_evaluator(
    protection: Protection,
    dataset: ProtectionDataset,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    handlers: Sequence | None = None,
    seed: int = 0,
) -> tuple[SupervisedEvaluator, ProtectedCopySaver]:
    """The evaluator of ``bundles/salm_protect/configs/inference.json``, built in Python.

    Returns:
        ``(evaluator, saver)``; ``evaluator.run()`` writes the copy, then ``saver.manifest_path`` is the manifest.
    """
    saver = ProtectedCopySaver(dataset, output_dir, overwrite=overwrite)
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0),
        network=protection.generator,
        inferer=ProtectInferer(protection.settings, protection.surrogate, protection.class_scores, seed=seed),
        prepare_batch=PrepareBatchExtraInput({"labels": "label"}),
        val_handlers=[saver, *(handlers or [])],
        decollate=False,
    )
    return evaluator, saver


def protect_files(
    checkpoint: str | os.PathLike,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Path:
    """Protect every image of a dataset and write the copy (same formats and relative layout) plus a manifest.

    Each file is read in original units, scaled with the checkpoint's intensity scaling, protected (one saliency
    gradient or class mask, one generator pass), mapped back with :meth:`IntensityScaling.apply_delta` and written
    by :class:`~monai_salm.io.ProtectedCopyWriter`. This is what the bundle's ``inference.json`` runs.

    Args:
        checkpoint: a monai-salm checkpoint (``models/model.pt`` of the bundle, ``monai-salm train --out``).
        source: datalist JSON or class folder.
        output_dir: destination folder (outside the input; empty unless ``overwrite``).
        overwrite: allow a non-empty ``output_dir``.
        device: torch device.
        seed: seed of the random-mask ablation.

    Returns:
        the manifest path (``output_dir/manifest.csv``).

    Raises:
        ValueError: naming the file, for a bad checkpoint, an unreadable image, mixed 2D/3D data, a missing label,
            an image that does not fit the checkpoint, or a bad output folder; nothing is left in ``output_dir``.
    """
    protection = load_checkpoint(checkpoint, device)
    dataset = ProtectionDataset(source, protection.scaling, protection.settings)
    evaluator, saver = protect_evaluator(protection, dataset, output_dir, overwrite, device, seed=seed)
    evaluator.run()
    return saver.manifest_path


def log_manifest(path: str | os.PathLike) -> dict:
    """Log (and return) a summary of a manifest: files, changed voxels, maximum change in original units."""
    entries = read_manifest(path)
    summary = {
        "manifest": str(path),
        "files": len(entries),
        "changed_voxels": int(sum(e.changed_voxels for e in entries)),
        "max_abs_change": max((e.max_abs_change for e in entries), default=0.0),
    }
    logger.info(f"protected copy: {json.dumps(summary)}")
    return summary
