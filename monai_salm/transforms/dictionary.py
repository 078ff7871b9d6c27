"""Dictionary wrappers of the SALM transforms."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform

from monai_salm.transforms.array import ApplyUnlearnableNoise, SaliencyMask

__all__ = [
    "SaliencyMaskd",
    "SaliencyMaskD",
    "SaliencyMaskDict",
    "ApplyUnlearnableNoised",
    "ApplyUnlearnableNoiseD",
    "ApplyUnlearnableNoiseDict",
]


class SaliencyMaskd(MapTransform):
    """Dictionary version of :class:`monai_salm.transforms.SaliencyMask`.

    Args:
        keys: image key(s); with several keys the mask is computed from the first present one.
        label_key: key of the class index.
        model: classifier used for the saliency.
        k: fraction in (0, 1] or integer count of positions to keep.
        mask_key: where the ``(1, *spatial)`` mask is written.
        eval_mode: score with the model in eval mode.
        class_scores: optional class-level score maps, see :class:`SaliencyMask`.
        work_size: spatial size the model scores at, see :class:`SaliencyMask`.
        allow_missing_keys: skip silently when no image key is present.
    """

    backend = SaliencyMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        model: torch.nn.Module | None,
        k: float | int,
        mask_key: str = "salm_mask",
        eval_mode: bool = True,
        class_scores: torch.Tensor | None = None,
        work_size: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.mask_key = mask_key
        self.masker = SaliencyMask(model, k, eval_mode=eval_mode, class_scores=class_scores, work_size=work_size)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.label_key not in d:
                raise KeyError(f"label key {self.label_key!r} not found; SaliencyMaskd needs the label.")
            d[self.mask_key] = self.masker(d[key], d[self.label_key])
            break
        return d


class ApplyUnlearnableNoised(MapTransform):
    """Dictionary version of :class:`monai_salm.transforms.ApplyUnlearnableNoise`.

    Args:
        keys: image key(s) to protect (each with the same mask).
        mask_key: key of the mask written by :class:`SaliencyMaskd`.
        generator: noise generator.
        epsilon: L-infinity bound in the units of ``value_range``.
        label_key: key of the class index, required for label-conditioned generators.
        value_range: ``(lo, hi)`` of the scaled images.
        work_size: spatial size the generator runs at, see :class:`ApplyUnlearnableNoise`.
        allow_missing_keys: skip missing image keys.
    """

    backend = ApplyUnlearnableNoise.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "salm_mask",
        generator: torch.nn.Module | None = None,
        epsilon: float = 8 / 255,
        label_key: str | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        work_size: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if generator is None:
            raise ValueError("ApplyUnlearnableNoised needs a generator.")
        self.mask_key = mask_key
        self.label_key = label_key
        self.noiser = ApplyUnlearnableNoise(generator, epsilon, value_range, work_size=work_size)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.mask_key not in d:
                raise KeyError(f"mask key {self.mask_key!r} not found; run SaliencyMaskd first.")
            label = d[self.label_key] if self.label_key is not None else None
            d[key] = self.noiser(d[key], d[self.mask_key], label)
        return d


SaliencyMaskD = SaliencyMaskDict = SaliencyMaskd
ApplyUnlearnableNoiseD = ApplyUnlearnableNoiseDict = ApplyUnlearnableNoised
