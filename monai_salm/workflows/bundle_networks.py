"""The bundle's networks: their shapes from the data (or the metadata), and the generator bundle tools can call."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monai_salm.data.medmnist import is_rgb, load_npz
from monai_salm.io import load_dataset, read_image
from monai_salm.io.utils import full_suffix
from monai_salm.networks import NoiseGenerator
from monai_salm.workflows.arrays import parse_work_size

__all__ = ["NetworkShape", "network_shape", "BundleNoiseGenerator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkShape:
    """What the bundle's networks are built for: image dimensions, channels, spatial size and classes."""

    spatial_dims: int
    in_channels: int
    image_size: list[int]
    num_classes: int


def network_shape(source: str | os.PathLike, reference: dict | None = None,
                  work_size: int | str | Sequence[int] | None = None) -> NetworkShape:
    """Network shapes for a dataset, without loading it: from the data when ``source`` exists, else ``reference``.

    With an existing ``source``, the headers of every image are probed (:func:`monai_salm.io.load_dataset`) and the
    first image is read: dimensions, channels and size come from it, the class count is ``max(label) + 1`` over the
    training and validation entries. :func:`load_training_arrays` later checks that every image has that size.

    Without it (e.g. ``python -m monai.bundle verify_net_in_out``, which has no dataset), the bundle metadata's
    ``network_data_format`` is used: ``inputs#image`` gives channels and spatial shape, ``inputs#label#value_range``
    ``[0, C - 1]`` the class count.

    With ``work_size`` (the working grid the images are resampled onto for training), the spatial size is that
    grid; without it, the first image's size (:func:`load_training_arrays` then requires every image to have it).

    Args:
        source: the dataset (datalist JSON, class folder or ``.npz``).
        reference: the metadata's ``network_data_format``.
        work_size: the working grid, e.g. ``64`` or ``[128, 128, 64]``.

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
        return _with_work_size(NetworkShape(x.ndim - 2, int(x.shape[1]), [int(v) for v in x.shape[2:]], num_classes),
                               work_size)
    records = load_dataset(path, ("training", "validation"))
    if not records:
        raise ValueError(f"{path}: no images found.")
    first, _ = read_image(records[0])
    shape = NetworkShape(first.ndim - 1, int(first.shape[0]), [int(v) for v in first.shape[1:]],
                         max(r.label for r in records) + 1)
    return _with_work_size(shape, work_size)


def _with_work_size(shape: NetworkShape, work_size: int | str | Sequence[int] | None) -> NetworkShape:
    work = parse_work_size(work_size, shape.spatial_dims)
    return shape if work is None else NetworkShape(shape.spatial_dims, shape.in_channels, list(work), shape.num_classes)


class BundleNoiseGenerator(NoiseGenerator):
    """:class:`~monai_salm.networks.NoiseGenerator` that can also be called the way bundle tools call a network.

    SALM always calls a label-conditioned generator as ``G(x, y)`` with a ``(B,)`` label tensor. Bundle tools
    such as ``python -m monai.bundle verify_net_in_out`` call ``net(x)`` or pass plain values, so:

    - ``y`` may be a Python int or list (``--extra_forward_args "{'y': 0}"``); a single label is used for every
      image of the batch;
    - ``y=None`` on a label-conditioned generator returns its label-free part: the UNet with all-zero label maps
      and no class pattern (same shape and dtype as the conditioned output, which adds the class pattern); zeros
      for a generator without the UNet (``image_term=False``).

    Weights are those of ``NoiseGenerator``: checkpoints load into either class.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor | int | Sequence[int] | None = None) -> torch.Tensor:
        if y is None and self.label_conditioned:
            if self.net is None:  # a pattern-only generator has no label-free part
                return torch.zeros_like(x)
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
