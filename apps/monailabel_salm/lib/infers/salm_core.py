"""Protect one image file with a monai-salm checkpoint: the logic behind the ``salm_protect`` MONAI Label task.

This module imports only ``monai_salm``, numpy and torch (never ``monailabel``), so it can be tested and used without
a MONAI Label installation. An image is protected exactly as the bundle's inference protects a file
(:func:`monai_salm.workflows.protect_files`): read in original units with its metadata
(:func:`monai_salm.io.read_image`), scaled to [0, 1] with the checkpoint's intensity scaling, protected by one mask
(class mask, saliency gradient or random, as trained) and one generator pass (:func:`monai_salm.api.protect_tensor`),
carried back onto the original values with :meth:`~monai_salm.io.IntensityScaling.apply_delta`, and written by
:func:`monai_salm.io.write_image` in the input's format, header, affine and stored dtype.

Example::

    protector = SALMProtector("salm.pt")
    result = protector.protect_file("case_001.nii.gz", "case_001_protected.nii.gz")
    print(result.to_json())  # class used, changed fraction, largest change, epsilon in original units
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_salm import __version__ as monai_salm_version
from monai_salm.api import protect_tensor
from monai_salm.io import detect_format, read_image, write_image
from monai_salm.io.utils import full_suffix
from monai_salm.transforms.functional import preserve_model_state, resize_images
from monai_salm.workflows import Protection, load_checkpoint

__all__ = ["SUPPORTED_FORMATS", "ProtectionResult", "SALMProtector", "parse_class_index"]

#: Input formats the task protects (one file in, one file of the same format out). DICOM series folders are left
#: out: the answer of a MONAI Label request is a single file.
SUPPORTED_FORMATS = ("nifti", "dicom", "png", "jpeg", "itk")


def parse_class_index(value: Any) -> int | None:
    """Read the ``class_index`` request parameter.

    Args:
        value: an integer (or a string holding one); None, ``""`` or a negative number ask for the surrogate's
            prediction.

    Returns:
        the class index, or None for "use the surrogate's prediction".

    Raises:
        ValueError: when the value is not an integer.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not number.is_integer():
        raise ValueError(f"class_index must be an integer, got {value!r}.")
    return None if number < 0 else int(number)


@dataclasses.dataclass
class ProtectionResult:
    """What :meth:`SALMProtector.protect_file` wrote and measured.

    Attributes:
        output: the protected file (same format, header and stored dtype as the input).
        class_index: the class whose mask and noise were used.
        class_source: ``"request"`` (given) or ``"surrogate"`` (the surrogate's prediction on the clean image).
        shape: channel-first shape of the image, ``(C, *spatial)``.
        dtype: stored (on-disk) dtype of the input and of the output.
        changed_fraction: fraction of the image's values that differ in the written file.
        max_abs_change: largest absolute change in the written file, in original units.
        epsilon_original_units: the budget in original units (``epsilon * (hi - lo)`` of the intensity scaling).
        mask: ``(1, *spatial)`` bool, the positions allowed to change.
    """

    output: Path
    class_index: int
    class_source: str
    shape: tuple[int, ...]
    dtype: str
    changed_fraction: float
    max_abs_change: float
    epsilon_original_units: float
    mask: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable summary (without the mask)."""
        return {
            "class_index": self.class_index,
            "class_source": self.class_source,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "masked_positions": int(self.mask.sum()),
            "changed_fraction": self.changed_fraction,
            "max_abs_change": self.max_abs_change,
            "epsilon_original_units": self.epsilon_original_units,
        }


class SALMProtector:
    """A loaded monai-salm checkpoint that protects image files.

    Args:
        checkpoint: a checkpoint written by ``monai-salm train`` or the bundle (``models/model.pt``).
        device: torch device for the generator and the surrogate.
        seed: seed of the random-mask ablation (checkpoints trained with ``--mask-mode random``).

    Raises:
        ValueError: for a missing or invalid checkpoint.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.protection: Protection = load_checkpoint(self.checkpoint, self.device)
        self._lock = threading.Lock()  # one request at a time uses the networks

    @property
    def epsilon_original_units(self) -> float:
        """The L-infinity budget in original units."""
        return self.protection.scaling.epsilon_in_units(self.protection.settings.epsilon)

    def describe(self) -> dict[str, Any]:
        """The protection this checkpoint applies (for MONAI Label's ``/info``).

        Returns:
            a JSON-serialisable dict: epsilon (in [0, 1] units and original units), k, value range, intensity
            scaling, mask mode, dimensions, channels, classes, image size and the checkpoint path.
        """
        s = self.protection.settings
        return {
            "checkpoint": str(self.checkpoint),
            "monai_salm_version": monai_salm_version,
            "epsilon": float(s.epsilon),
            "epsilon_original_units": self.epsilon_original_units,
            "k": s.k,
            "value_range": [float(v) for v in s.value_range],
            "intensity": self.protection.scaling.to_dict(),
            "mask_mode": s.mask_mode,
            "label_conditioned": bool(s.label_conditioned),
            "spatial_dims": int(s.spatial_dims),
            "in_channels": int(s.in_channels),
            "num_classes": int(s.num_classes),
            "image_size": [int(v) for v in s.image_size],
            "formats": list(SUPPORTED_FORMATS),
        }

    def _check(self, path: Path, array: np.ndarray) -> None:
        s, name = self.protection.settings, self.checkpoint.name
        dims = array.ndim - 1
        if dims != s.spatial_dims:
            raise ValueError(f"{path.name}: image is {dims}D but the checkpoint {name} is {s.spatial_dims}D.")
        if array.shape[0] != s.in_channels:
            raise ValueError(
                f"{path.name}: image has {array.shape[0]} channel(s) but the checkpoint {name} expects {s.in_channels}."
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{path.name}: the image contains NaN or infinite values.")

    def _class_index(self, unit: torch.Tensor, class_index: int | None) -> tuple[int, str]:
        num_classes = self.protection.settings.num_classes
        if class_index is not None:
            if not 0 <= class_index < num_classes:
                raise ValueError(
                    f"class_index {class_index} is outside the checkpoint's classes 0..{num_classes - 1}."
                )
            return int(class_index), "request"
        if self.protection.surrogate is None:
            raise ValueError(f"the checkpoint {self.checkpoint.name} is a slim release checkpoint without a surrogate: "
                             "give the image's class_index.")
        with preserve_model_state(self.protection.surrogate) as surrogate, torch.no_grad():
            work = resize_images(unit.to(self.device), self.protection.settings.image_size)
            logits = surrogate.eval()(work)
        return int(logits.argmax(dim=1)[0]), "surrogate"

    def protect_file(
        self, image: str | os.PathLike, output: str | os.PathLike | None = None, class_index: int | None = None
    ) -> ProtectionResult:
        """Protect one image file and write the protected copy.

        Args:
            image: a NIfTI, single-file DICOM, PNG/JPEG or NRRD/MHA image (2D or 3D, as the checkpoint).
            output: where to write the copy (same format as ``image``); a new temporary file (named after the
                image, with its suffix) when None.
            class_index: the image's class; None to use the surrogate's prediction on the clean image.

        Returns:
            a :class:`ProtectionResult`.

        Raises:
            FileNotFoundError: when ``image`` does not exist.
            ValueError: naming the file, for an unsupported format, an unreadable or corrupt file, an image that
                does not fit the checkpoint (dimensions, channels, class-mask size), NaN values, or a class index
                outside the checkpoint's classes.
        """
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"{path.name}: image file not found.")
        fmt = detect_format(path)
        if fmt not in SUPPORTED_FORMATS:
            raise ValueError(
                f"{path.name}: {fmt} input is not supported by salm_protect (one file in, one file out: "
                f"{', '.join(SUPPORTED_FORMATS)}); protect it with `monai-salm protect` instead."
            )
        array, meta = read_image(path)
        self._check(path, array)
        scaling, settings = self.protection.scaling, self.protection.settings
        clean = scaling.to_unit(array)
        unit = torch.from_numpy(clean)[None]
        with self._lock:
            label, source = self._class_index(unit, class_index)
            protected, masks = protect_tensor(
                unit, torch.tensor([label]), settings, self.protection.generator, self.protection.surrogate,
                self.protection.class_scores, batch_size=1, device=self.device, seed=self.seed,
            )
        values = scaling.apply_delta(array, clean, protected[0].numpy())
        dest = self._output_path(path, output)
        try:
            write_image(meta, values, dest)
            written, _ = read_image(dest)
        except BaseException:
            if output is None:
                dest.unlink(missing_ok=True)
            raise
        diff = np.abs(written.astype(np.float64) - array.astype(np.float64))
        return ProtectionResult(
            output=dest,
            class_index=label,
            class_source=source,
            shape=tuple(int(v) for v in array.shape),
            dtype=str(np.dtype(meta.dtype)),
            changed_fraction=float((diff > 0).mean()),
            max_abs_change=float(diff.max()) if diff.size else 0.0,
            epsilon_original_units=self.epsilon_original_units,
            mask=masks[0].numpy(),
        )

    @staticmethod
    def _output_path(image: Path, output: str | os.PathLike | None) -> Path:
        if output is not None:
            return Path(output)
        suffix = full_suffix(image)
        stem = image.name[: len(image.name) - len(suffix)] if suffix else image.name
        fd, name = tempfile.mkstemp(prefix=f"{stem}_protected_", suffix=suffix)
        os.close(fd)
        return Path(name)
