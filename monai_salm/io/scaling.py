"""Explicit, serialisable intensity scaling between original units and the [0, 1] range SALM works in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from monai_salm.io.utils import elementwise

__all__ = ["IntensityScaling"]

_KINDS = ("window", "range", "percentile")


@dataclass(frozen=True)
class IntensityScaling:
    """Linear map between original units (Hounsfield units, raw MR values, 8/16-bit grey) and [0, 1].

    ``to_unit(x) = (x - lo) / (hi - lo)`` and ``from_unit(u) = lo + u * (hi - lo)``, so a budget ``eps`` in
    [0, 1] units is ``eps * (hi - lo)`` in original units (:meth:`epsilon_in_units`).

    Kinds:

    - ``{"kind": "window", "lo": -1000, "hi": 1000}``: a fixed window, e.g. a CT Hounsfield window.
    - ``{"kind": "range", "lo": 0, "hi": 255}``: the full range of a stored type, e.g. 8-bit PNG.
    - ``{"kind": "percentile", "lower": 0.5, "upper": 99.5}``: ``lo``/``hi`` are computed once on the training
      data with :meth:`fit` and then frozen; an unfitted percentile scaling refuses to map values.

    Args:
        kind: ``"window"``, ``"range"`` or ``"percentile"``.
        lo: value mapped to 0 (original units).
        hi: value mapped to 1 (original units).
        lower: lower percentile in [0, 100] (``percentile`` only).
        upper: upper percentile in [0, 100] (``percentile`` only).
        clip: clip :meth:`to_unit` results to [0, 1].

    Raises:
        ValueError: for an unknown kind, ``hi <= lo``, or percentiles out of order.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lower: float | None = None
    upper: float | None = None
    clip: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"IntensityScaling kind must be one of {_KINDS}, got {self.kind!r}.")
        if self.kind == "percentile":
            lower, upper = self.lower, self.upper
            if lower is None or upper is None or not 0 <= lower < upper <= 100:
                raise ValueError(f"percentile scaling needs 0 <= lower < upper <= 100, got {lower}, {upper}.")
        elif self.lo is None or self.hi is None:
            raise ValueError(f"{self.kind} scaling needs lo and hi.")
        if self.lo is not None and self.hi is not None:
            if not (np.isfinite(self.lo) and np.isfinite(self.hi)) or self.hi <= self.lo:
                raise ValueError(f"IntensityScaling needs finite lo < hi, got lo={self.lo}, hi={self.hi}.")
            object.__setattr__(self, "lo", float(self.lo))
            object.__setattr__(self, "hi", float(self.hi))

    @property
    def fitted(self) -> bool:
        """Whether ``lo`` and ``hi`` are known (always true except for an unfitted percentile scaling)."""
        return self.lo is not None and self.hi is not None

    @property
    def span(self) -> float:
        """``hi - lo`` in original units.

        Raises:
            ValueError: when the scaling is not fitted.
        """
        self._require_fitted()
        return self.hi - self.lo

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError("percentile IntensityScaling is not fitted: call fit(training_arrays) first.")

    def fit(self, arrays: Iterable[np.ndarray], max_values: int = 1_000_000) -> IntensityScaling:
        """Freeze ``lo``/``hi`` of a percentile scaling from training data (other kinds are returned as is).

        Args:
            arrays: training images in original units (any shapes).
            max_values: at most this many values are taken from each array (evenly strided) to bound memory.

        Returns:
            a new scaling with ``lo``/``hi`` set; it keeps ``kind="percentile"`` and the percentiles as record.

        Raises:
            ValueError: for no data, non-finite values, or a constant image set (``hi == lo``).
        """
        if self.kind != "percentile":
            return self
        samples = []
        for a in arrays:
            flat = np.asarray(a, dtype=np.float64).ravel()
            samples.append(flat[:: max(1, flat.size // max_values)])
        values = np.concatenate(samples) if samples else np.empty(0)
        if values.size == 0:
            raise ValueError("cannot fit a percentile IntensityScaling on no data.")
        if not np.isfinite(values).all():
            raise ValueError("cannot fit a percentile IntensityScaling: the data contains NaN or infinite values.")
        lo, hi = np.percentile(values, [self.lower, self.upper])
        if hi <= lo:
            raise ValueError(f"percentiles {self.lower}/{self.upper} of the data are equal ({lo}); use a window.")
        return replace(self, lo=float(lo), hi=float(hi))

    def to_unit(self, array: np.ndarray) -> np.ndarray:
        """Original units -> [0, 1] (clipped when ``clip``).

        Args:
            array: values in original units.

        Returns:
            float32 array of the same shape.

        Raises:
            ValueError: when the scaling is not fitted.
        """
        self._require_fitted()
        lo, span, clip = self.lo, self.hi - self.lo, self.clip

        def unit(a):
            out = (a.astype(np.float64) - lo) / span
            return np.clip(out, 0.0, 1.0) if clip else out

        return elementwise(unit, np.float32, np.asarray(array))

    def from_unit(self, array: np.ndarray) -> np.ndarray:
        """[0, 1] -> original units (the inverse of :meth:`to_unit` inside the window).

        Args:
            array: values in [0, 1] units.

        Returns:
            float32 array in original units.

        Raises:
            ValueError: when the scaling is not fitted.
        """
        self._require_fitted()
        lo, span = self.lo, self.hi - self.lo
        return elementwise(lambda a: lo + a.astype(np.float64) * span, np.float32, np.asarray(array))

    def apply_delta(self, original: np.ndarray, clean_unit: np.ndarray, protected_unit: np.ndarray) -> np.ndarray:
        """Carry a perturbation made in [0, 1] units back onto the original array.

        ``original + (protected_unit - clean_unit) * (hi - lo)``. Prefer this to ``from_unit(protected_unit)``:
        values that :meth:`to_unit` clipped (e.g. bone above a soft-tissue window) stay as they were instead of
        being flattened to the window edge.

        Args:
            original: the image in original units.
            clean_unit: ``to_unit(original)``.
            protected_unit: the protected image in [0, 1] units.

        Returns:
            float32 protected image in original units.

        Raises:
            ValueError: when the scaling is not fitted or the shapes differ.
        """
        self._require_fitted()
        original, clean_unit, protected_unit = (np.asarray(a) for a in (original, clean_unit, protected_unit))
        if not original.shape == clean_unit.shape == protected_unit.shape:
            raise ValueError(
                f"apply_delta needs equal shapes, got {original.shape}, {clean_unit.shape}, {protected_unit.shape}."
            )
        span = self.hi - self.lo

        def carry(o, c, p):
            return o.astype(np.float64) + (p.astype(np.float64) - c.astype(np.float64)) * span

        return elementwise(carry, np.float32, original, clean_unit, protected_unit)

    def epsilon_in_units(self, epsilon: float) -> float:
        """An L-infinity budget in [0, 1] units expressed in original units: ``epsilon * (hi - lo)``.

        Raises:
            ValueError: when the scaling is not fitted.
        """
        return float(epsilon) * self.span

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``None`` fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityScaling:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for unknown keys or invalid values.
        """
        unknown = set(data) - {"kind", "lo", "hi", "lower", "upper", "clip"}
        if unknown:
            raise ValueError(f"unknown IntensityScaling keys: {sorted(unknown)}.")
        return cls(**data)
