"""Intensity scaling specifications: parse ``--intensity`` / the ``intensity`` id, read a checkpoint's scaling.

SALM works in [0, 1]; the :class:`~monai_salm.io.IntensityScaling` chosen here maps original units to that range
and is stored in the checkpoint, where it defines what epsilon means in original units.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from monai_salm.engines import SALMSettings
from monai_salm.io import IntensityScaling

__all__ = ["parse_intensity", "scaling_from_settings"]

logger = logging.getLogger(__name__)

_PERCENTILE_DEFAULT = (0.5, 99.5)


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
    try:
        if kind == "percentile":
            return IntensityScaling("percentile", lower=a, upper=b)
        return IntensityScaling(kind, lo=a, hi=b)
    except ValueError as e:
        raise ValueError(f"intensity {spec!r}: {e}") from None


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
