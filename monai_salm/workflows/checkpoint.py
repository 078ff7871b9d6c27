"""Load a monai-salm checkpoint for protection, with its intensity scaling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from monai_salm.engines import SALMSettings, load_protection
from monai_salm.io import IntensityScaling
from monai_salm.workflows.intensity import scaling_from_settings

__all__ = ["Protection", "load_checkpoint"]


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
