"""Array (single-sample, channel-first) SALM transforms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from monai_salm.transforms.functional import (
    call_generator,
    perturb,
    resize_images,
    saliency_scores,
    to_grid,
    topk_mask,
)

__all__ = ["SaliencyMask", "ApplyUnlearnableNoise"]


def _as_batch(img: NdarrayOrTensor, device: torch.device | None) -> torch.Tensor:
    """Channel-first sample -> float ``(1, C, *spatial)`` plain tensor on ``device``."""
    t = convert_to_tensor(img, track_meta=False)
    if t.ndim < 3:
        raise ValueError(f"expected a channel-first image (C, H, W) or (C, D, H, W), got shape {tuple(t.shape)}.")
    return t.float().unsqueeze(0).to(device)


def _as_label(label: NdarrayOrTensor | int | None, device: torch.device | None) -> torch.Tensor | None:
    if label is None:
        return None
    lab = torch.as_tensor(np.asarray(convert_to_tensor(label, track_meta=False).cpu())).reshape(-1)
    if lab.numel() != 1:
        raise ValueError(f"expected one class index per image, got a label with {lab.numel()} values.")
    return lab.long().to(device)


def _module_device(module: torch.nn.Module | None) -> torch.device | None:
    if module is None:
        return None
    for p in module.parameters():
        return p.device
    return None


class SaliencyMask(Transform):
    """Sparse mask of the ``k`` most salient spatial positions of one image (SALM phase 1).

    The saliency of a position is ``sum_c |d CE(model(x), y) / d x|``; the mask keeps the top ``k``
    positions (ties: lower flat index first) and has shape ``(1, *spatial)``.

    Images of any size are accepted. The mask is chosen on a working grid (``work_size``; for class masks, the
    size of ``class_scores``): an image of another size is resampled onto it for scoring
    (:func:`~monai_salm.transforms.functional.resize_images`) and the mask is mapped back onto the image's own
    grid by nearest neighbour, so it covers about ``k`` of the image's positions (exactly ``k`` of the working
    grid's).

    Args:
        model: classifier for the batch ``(1, C, *spatial)``; its train/eval mode, ``requires_grad``
            flags and parameter ``.grad`` are left unchanged.
        k: fraction of positions in (0, 1] (float) or a count (int).
        eval_mode: score with the model in eval mode.
        class_scores: optional ``(num_classes, *grid)`` score maps. When given, the mask of an image
            with label ``y`` is the top ``k`` of ``class_scores[y]`` (a class-level mask, the same
            positions for every image of a class) and ``model`` is not used.
        work_size: spatial size the model scores at (the size it was trained at); ``None`` scores every image at
            its own size. Ignored with ``class_scores``, whose size is the working grid.

    Raises:
        ValueError: for a bad ``k`` or mismatched shapes.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        model: torch.nn.Module | None,
        k: float | int,
        eval_mode: bool = True,
        class_scores: torch.Tensor | None = None,
        work_size: Sequence[int] | None = None,
    ) -> None:
        if model is None and class_scores is None:
            raise ValueError("SaliencyMask needs a model or class_scores.")
        self.model = model
        self.k = k
        self.eval_mode = eval_mode
        self.class_scores = None if class_scores is None else torch.as_tensor(class_scores).float()
        self.work_size = None if work_size is None else tuple(int(v) for v in work_size)

    def __call__(self, img: NdarrayOrTensor, label: NdarrayOrTensor | int) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first image ``(C, *spatial)``: numpy, torch or MetaTensor.
            label: the image's class index.

        Returns:
            ``(1, *spatial)`` mask of the input's type (a MetaTensor keeps the image's metadata).
        """
        device = _module_device(self.model) if self.class_scores is None else None
        x = _as_batch(img, device)
        y = _as_label(label, device)
        if y is None:
            raise ValueError("SaliencyMask needs the image's label.")
        if self.class_scores is not None:
            if self.class_scores.ndim - 1 != x.ndim - 2:
                raise ValueError(
                    f"class_scores are {self.class_scores.ndim - 1}D maps but the image is {x.ndim - 2}D."
                )
            if not 0 <= int(y) < self.class_scores.shape[0]:
                raise ValueError(f"label {int(y)} out of range for {self.class_scores.shape[0]} classes.")
            scores = self.class_scores[y.cpu()]
        else:
            scores = saliency_scores(self.model, resize_images(x, self.work_size or x.shape[2:]), y,
                                     eval_mode=self.eval_mode)
        mask = to_grid(topk_mask(scores, self.k), x.shape[2:])[0]
        if isinstance(img, MetaTensor):
            out = MetaTensor(mask.cpu(), meta=dict(img.meta))
            return out
        out, *_ = convert_to_dst_type(mask.cpu(), img, dtype=np.float32 if isinstance(img, np.ndarray) else torch.float32)
        return out


class ApplyUnlearnableNoise(Transform):
    """Add the generator's bounded noise on the masked positions (SALM release step).

    ``x' = clip(x + M * epsilon * tanh(G(x)), lo, hi)``, so ``|x' - x| <= epsilon`` everywhere and
    ``x' == x`` outside the mask.

    Images of any size are accepted: the generator runs on the working grid (``work_size``) and its noise is mapped
    onto the image's own grid by nearest neighbour before the mask (of the image's size) is applied.

    Args:
        generator: ``torch.nn.Module`` called on a batch ``(1, C, *spatial)`` as ``G(x)``, or as
            ``G(x, y)`` with ``y`` the ``(1,)`` class index when it has ``label_conditioned = True``;
            it returns a tensor shaped like ``x``.
        epsilon: L-infinity bound, in the units of ``value_range``; in (0, hi - lo].
        value_range: ``(lo, hi)`` intensity range of the (scaled) images.
        work_size: spatial size the generator runs at; ``None``: the size of its class pattern when it has one
            (``generator.pattern_size``), otherwise each image's own size.

    Raises:
        ValueError: for an epsilon or value range out of bounds.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        generator: torch.nn.Module,
        epsilon: float,
        value_range: Sequence[float] = (0.0, 1.0),
        work_size: Sequence[int] | None = None,
    ) -> None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {tuple(value_range)}.")
        if not 0.0 < float(epsilon) <= hi - lo:
            raise ValueError(f"epsilon={epsilon} must be in (0, {hi - lo}] for value_range {(lo, hi)}.")
        self.generator = generator
        self.epsilon = float(epsilon)
        self.value_range = (lo, hi)
        work_size = work_size if work_size is not None else getattr(generator, "pattern_size", None)
        self.work_size = None if work_size is None else tuple(int(v) for v in work_size)

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor, label: NdarrayOrTensor | int | None = None
    ) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first image ``(C, *spatial)``.
            mask: ``(1, *spatial)`` 0/1 mask from :class:`SaliencyMask`.
            label: class index, required for label-conditioned generators.

        Returns:
            the protected image, same type and dtype as ``img`` (MetaTensor metadata kept).
        """
        device = _module_device(self.generator)
        x = _as_batch(img, device)
        m = _as_batch(mask, device)
        if m.shape[1] != 1 or m.shape[2:] != x.shape[2:]:
            raise ValueError(f"mask shape {tuple(m.shape[1:])} does not match image spatial shape {tuple(x.shape[2:])}.")
        y = _as_label(label, device)
        was_training = self.generator.training
        self.generator.eval()
        try:
            with torch.no_grad():
                raw = call_generator(self.generator, resize_images(x, self.work_size or x.shape[2:]), y)
        finally:
            self.generator.train(was_training)
        out = perturb(x, m, to_grid(raw, x.shape[2:]), self.epsilon, self.value_range)[0].cpu()
        if isinstance(img, MetaTensor):
            result = img.clone()
            result.data = out.to(img.dtype)
            return result
        res, *_ = convert_to_dst_type(out, img)
        return res
