"""Countermeasures an unauthorized trainer may apply against protected (unlearnable) training data.

The set follows the APBench and Image Shortcut Squeezing (ISS) literature, adapted to 1- or 3-channel 2D
scans and 1-channel 3D volumes. Every countermeasure has a name, an optional numeric parameter and a kind:

* ``"augment"``: random per-sample augmentations, returned as MONAI dictionary transforms
  (:func:`augment_transforms`) for a :class:`monai.data.Dataset` whose items are ``{"image", "label"}``.
* ``"batch"``: ``mixup``, applied to a whole training batch (:func:`batch_transform`).
* ``"preprocess"``: deterministic filters (ISS style) applied once to the whole training set
  (:func:`preprocess`).
* ``"adversarial"``: L-inf PGD adversarial training (:func:`adversarial_training`, :func:`pgd_attack`).

Images are float tensors in ``[0, 1]`` shaped ``(N, C, H, W)`` or ``(N, C, D, H, W)``.

Example::

    cms = parse_countermeasures("median:3,crop,mixup")
    train_images = preprocess(cms, train_images)
    dataset = Dataset(items, transform=Compose(augment_transforms(cms, spatial_dims=2)))
    mix = batch_transform(cms, num_classes)  # None when no mixup
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    GaussianSmooth,
    MedianSmooth,
    MixUp,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    ScaleIntensityRanged,
)
from monai.networks.layers import AffineTransform
from monai.transforms.utils import create_rotate
from monai.utils import convert_to_tensor, optional_import

from monai_salm.transforms.functional import preserve_model_state

PILImage, _ = optional_import("PIL.Image")

__all__ = [
    "COUNTERMEASURES",
    "KINDS",
    "Countermeasure",
    "adversarial_training",
    "differentiable_view",
    "augment_transforms",
    "batch_transform",
    "parse_countermeasures",
    "pgd_attack",
    "preprocess",
]

#: The kinds of countermeasure, in the order a training run meets them.
KINDS = ("preprocess", "augment", "batch", "adversarial")

#: Probability of the random augmentations that are not applied to every sample (flip has its own parameter).
AUGMENT_PROB = 0.5
#: PGD steps and step size (as a multiple of ``epsilon / steps``) used for adversarial training.
ADVERSARIAL_STEPS = 5
ADVERSARIAL_STEP_FACTOR = 2.5
#: Upper bound on the elements processed at once by :func:`preprocess` (median filtering needs ``k**d`` times more).
_CHUNK_ELEMENTS = 2**22


def _check_prob(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be a probability in (0, 1]"


def _check_positive(v: float) -> str | None:
    return None if v > 0.0 else "must be > 0"


def _check_angle(v: float) -> str | None:
    return None if 0.0 < v <= 180.0 else "must be an angle in degrees in (0, 180]"


def _check_pad(v: float) -> str | None:
    return None if v >= 1 and float(v).is_integer() else "must be a whole number of pixels >= 1"


def _check_cutout(v: float) -> str | None:
    if 0.0 < v < 1.0 or (v >= 1 and float(v).is_integer()):
        return None
    return "must be a fraction of the image side in (0, 1) or a whole number of pixels >= 1"


def _check_gamma(v: float) -> str | None:
    return None if v > 1.0 else "must be > 1 (gamma is drawn from (1/param, param))"


def _check_unit(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _check_kernel(v: float) -> str | None:
    return None if float(v).is_integer() and v >= 3 and int(v) % 2 == 1 else "must be an odd kernel size >= 3"


def _check_bits(v: float) -> str | None:
    return None if float(v).is_integer() and 1 <= v <= 8 else "must be a whole number of bits in [1, 8]"


def _check_quality(v: float) -> str | None:
    return None if float(v).is_integer() and 1 <= v <= 100 else "must be a whole JPEG quality in [1, 100]"


def _check_factor(v: float) -> str | None:
    return None if 0.0 < v < 1.0 else "must be a downsampling factor in (0, 1)"


@dataclass(frozen=True)
class _Spec:
    kind: str
    default: float
    check: Callable[[float], str | None]
    description: str


_SPECS: dict[str, _Spec] = {
    "flip": _Spec(
        "augment",
        0.5,
        _check_prob,
        "random flip along every spatial axis (RandFlipd); param: probability per axis, default 0.5",
    ),
    "rotate": _Spec(
        "augment",
        15.0,
        _check_angle,
        "random 90-degree in-plane rotation (RandRotate90d, p=0.5) plus a small rotation about every axis "
        "(RandRotated, p=0.5); param: max small angle in degrees, default 15",
    ),
    "crop": _Spec(
        "augment",
        4.0,
        _check_pad,
        "pad-and-random-crop, i.e. a random integer shift with zero fill (RandAffined translation, nearest); "
        "param: padding in pixels, default 4",
    ),
    "cutout": _Spec(
        "augment",
        0.5,
        _check_cutout,
        "one zero-filled hole per sample (RandCoarseDropoutd); param: hole side as a fraction (<1) of each image side "
        "or in pixels (>=1), default 0.5",
    ),
    "gamma": _Spec(
        "augment",
        1.5,
        _check_gamma,
        "random gamma/contrast change (RandAdjustContrastd, p=0.5); param g: gamma drawn from (1/g, g), default 1.5",
    ),
    "intensity": _Spec(
        "augment",
        0.1,
        _check_unit,
        "random intensity scale x*(1+U(-a,a)) and shift +U(-a,a) (RandScaleIntensityd, RandShiftIntensityd, "
        "p=0.5 each), clamped to [0, 1]; param a, default 0.1",
    ),
    "mixup": _Spec(
        "batch", 1.0, _check_positive, "mixup of batch pairs with soft labels (MixUp); param: Beta alpha, default 1.0"
    ),
    "blur": _Spec(
        "preprocess",
        1.0,
        _check_positive,
        "Gaussian blur of the training set (GaussianSmooth); param: sigma in pixels, default 1.0",
    ),
    "median": _Spec(
        "preprocess",
        3.0,
        _check_kernel,
        "median filter of the training set (MedianSmooth); param: odd kernel size, default 3",
    ),
    "bitdepth": _Spec(
        "preprocess",
        2.0,
        _check_bits,
        "bit-depth reduction of the training set to 2**b levels (ISS); param: bits b, default 2",
    ),
    "jpeg": _Spec(
        "preprocess",
        10.0,
        _check_quality,
        "JPEG re-encoding of the 8-bit view of the training set (Pillow, 1 or 3 channels, 2D only; ISS); "
        "param: quality, default 10",
    ),
    "resample": _Spec(
        "preprocess",
        0.5,
        _check_factor,
        "down-then-up resampling of the training set (Resize: area down, (bi|tri)linear up); "
        "param: factor, default 0.5",
    ),
    "adversarial": _Spec(
        "adversarial",
        8 / 255,
        _check_unit,
        f"L-inf PGD adversarial training ({ADVERSARIAL_STEPS} steps, random start, step "
        f"{ADVERSARIAL_STEP_FACTOR}*eps/steps); param: epsilon in [0, 1] units, e.g. 8/255 (the default)",
    ),
}

#: Countermeasure name -> one-line description with its default parameter (for ``--help`` and documentation).
COUNTERMEASURES: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()}


def _valid_names() -> str:
    return ", ".join(_SPECS)


@dataclass(frozen=True)
class Countermeasure:
    """One selected countermeasure.

    Args:
        name: a key of :data:`COUNTERMEASURES`.
        param: its parameter; ``None`` selects the documented default (stored resolved, so ``param`` is never
            ``None`` after construction).
        kind: ``"preprocess"``, ``"augment"``, ``"batch"`` or ``"adversarial"``; filled in from ``name`` when empty.

    Raises:
        ValueError: for an unknown name, a kind that does not match the name, or an invalid parameter.
    """

    name: str
    param: float | None = None
    kind: str = ""

    def __post_init__(self):
        spec = _SPECS.get(self.name)
        if spec is None:
            raise ValueError(f"Unknown countermeasure {self.name!r}; valid names: {_valid_names()}.")
        if self.kind and self.kind != spec.kind:
            raise ValueError(f"Countermeasure {self.name!r} is of kind {spec.kind!r}, not {self.kind!r}.")
        param = spec.default if self.param is None else self.param
        if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
            raise ValueError(f"Countermeasure {self.name!r}: parameter must be a finite number, got {param!r}.")
        problem = spec.check(float(param))
        if problem is not None:
            raise ValueError(f"Countermeasure {self.name!r}: parameter {problem}, got {param!r}.")
        object.__setattr__(self, "param", float(param))
        object.__setattr__(self, "kind", spec.kind)

    def __str__(self) -> str:
        """The ``name:param`` spec that :func:`parse_countermeasures` reads back (``adversarial:8/255`` style)."""
        in_255 = self.param * 255
        if self.kind == "adversarial" and abs(in_255 - round(in_255)) < 1e-6:
            return f"{self.name}:{round(in_255)}/255"
        return f"{self.name}:{self.param:g}"


def _parse_number(text: str) -> float:
    """``"3"``, ``"0.03"`` or ``"8/255"`` -> float (raises ValueError)."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def parse_countermeasures(spec: str | Sequence[str] | None) -> list[Countermeasure]:
    """Parse a countermeasure selection such as ``"median:3,mixup"`` or ``["median:3", "mixup"]``.

    Args:
        spec: comma-separated ``name`` or ``name:param`` items (a string, or a sequence of such strings); a
            parameter may be written as a fraction, e.g. ``adversarial:8/255``. ``None`` or ``""`` selects none.

    Returns:
        The countermeasures in the given order, parameters resolved to their defaults where omitted.

    Raises:
        ValueError: for an unknown name (the message lists the valid names), a malformed or out-of-range
            parameter, or a name given twice.
        TypeError: when an item of a sequence is not a string.
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    result: list[Countermeasure] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"Countermeasures must be given as strings such as 'median:3', got {item!r}.")
        for token in item.split(","):
            token = token.strip()
            if not token:
                continue
            name, sep, text = token.partition(":")
            name = name.strip().lower()
            if name not in _SPECS:
                raise ValueError(f"Unknown countermeasure {name!r} in {token!r}; valid names: {_valid_names()}.")
            param = None
            if sep:
                try:
                    param = _parse_number(text.strip())
                except (ValueError, ZeroDivisionError):
                    raise ValueError(
                        f"Countermeasure {name!r}: parameter must be a number such as 3, 0.5 or 8/255, got {text!r}."
                    ) from None
            if name in seen:
                raise ValueError(f"Countermeasure {name!r} is given more than once.")
            seen.add(name)
            result.append(Countermeasure(name, param))
    return result


# ----------------------------------------------------------------------------------------------- preprocess


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata so that batch reshapes are not mistaken for spatial changes."""
    return convert_to_tensor(x, track_meta=False)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    # GaussianSmooth zero-pads, which would darken the borders; replicate-pad by the kernel tail instead and crop.
    n, c, *spatial = x.shape
    tail = int(max(4.0 * sigma, 0.5) + 0.5)  # GaussianFilter(truncated=4.0) kernel radius
    flat = F.pad(x.reshape(n * c, 1, *spatial), [tail] * (2 * len(spatial)), mode="replicate")[:, 0]
    out = _plain(GaussianSmooth(sigma=sigma)(flat))
    crop = (slice(None),) + tuple(slice(tail, tail + s) for s in spatial)
    return out[crop].reshape(x.shape)


def _median(x: torch.Tensor, kernel: int) -> torch.Tensor:
    n, c, *spatial = x.shape
    return _plain(MedianSmooth(radius=(kernel - 1) // 2)(x.reshape(n * c, *spatial))).reshape(x.shape)


def _bitdepth(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"jpeg applies to 2D images (N, C, H, W) only, got shape {tuple(x.shape)}.")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg needs 1 (grayscale) or 3 (RGB) channels, got {x.shape[1]}.")
    views = torch.round(x.detach().cpu().float() * 255).clamp(0, 255).to(torch.uint8).numpy()
    out = np.empty_like(views)
    for i, view in enumerate(views):
        mode = "L" if view.shape[0] == 1 else "RGB"
        pixels = view[0] if mode == "L" else np.ascontiguousarray(view.transpose(1, 2, 0))
        buffer = io.BytesIO()
        PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = np.asarray(PILImage.open(buffer).convert(mode))
        out[i] = decoded[None] if mode == "L" else decoded.transpose(2, 0, 1)
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype) / 255


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    n, c, *spatial = x.shape
    small = [max(1, round(s * factor)) for s in spatial]
    up_mode = "bilinear" if len(spatial) == 2 else "trilinear"
    flat = x.reshape(n * c, *spatial)
    down = _plain(Resize(small, mode="area")(flat))
    return _plain(Resize(spatial, mode=up_mode)(down)).reshape(x.shape)


_PREPROCESSORS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "blur": lambda x, p: _blur(x, p),
    "median": lambda x, p: _median(x, int(p)),
    "bitdepth": lambda x, p: _bitdepth(x, int(p)),
    "jpeg": lambda x, p: _jpeg(x, int(p)),
    "resample": lambda x, p: _resample(x, p),
}


def preprocess(countermeasures: Sequence[Countermeasure], images: torch.Tensor) -> torch.Tensor:
    """Apply the deterministic ``"preprocess"`` countermeasures, in the given order, to a whole training set.

    The other kinds are ignored. The work is done in chunks of images so that large 3D sets fit in memory.

    Args:
        countermeasures: the selection from :func:`parse_countermeasures`.
        images: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` float images in ``[0, 1]``; never modified.

    Returns:
        A new plain tensor (no MONAI metadata) of the same shape, dtype and device, clamped to ``[0, 1]``.

    Raises:
        ValueError: when ``images`` is not a 4D/5D floating tensor, or ``jpeg`` meets 3D volumes or a channel
            count other than 1 or 3.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5) or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W) or (N, C, D, H, W), got {shape}.")
    steps = [cm for cm in countermeasures if cm.kind == "preprocess"]
    if any(cm.name == "jpeg" for cm in steps) and images.ndim == 5:
        raise ValueError("jpeg applies to 2D images only; it has no 3D (volume) counterpart here.")
    if any(cm.name == "jpeg" for cm in steps) and images.shape[1] not in (1, 3):
        raise ValueError(f"jpeg needs 1 (grayscale) or 3 (RGB) channels, got {images.shape[1]}.")
    source = _plain(images)
    if not steps:
        return source.clone()
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, source[:1].numel()))
    chunks = []
    for start in range(0, source.shape[0], per_chunk):
        x = source[start : start + per_chunk]
        for cm in steps:
            x = _PREPROCESSORS[cm.name](x, cm.param).clamp(0.0, 1.0)
        chunks.append(x.to(images.dtype))
    return torch.cat(chunks) if chunks else source.clone()


#: preprocessors whose gradient is zero or undefined (rounding, JPEG through Pillow): straight-through instead
_STRAIGHT_THROUGH = ("bitdepth", "jpeg")


#: augmentations applied per sample with gradients: flips, integer shifts and quarter turns move values, the small
#: rotation interpolates bilinearly (differentiable), cutout zeroes a hole (the gradient is zero there)
_DIFFERENTIABLE_AUGMENTS = ("flip", "crop", "rotate", "cutout")

#: the ``rotate`` view's small rotation: bilinear, zero fill, about the centre, in voxel units
_SMALL_ROTATION = AffineTransform(normalized=False, zero_centered=True, mode="bilinear", padding_mode="zeros")


def _random_flip_shift(sample: torch.Tensor, cm: Countermeasure, gen: torch.Generator) -> torch.Tensor:
    """A flip along each spatial axis with probability ``cm.param`` (``flip``), or a random integer shift of up to
    ``cm.param`` positions per axis with zero fill (``crop``, as pad-and-random-crop does), of one ``(C, *spatial)``
    sample."""
    spatial_dims = sample.ndim - 1
    if cm.name == "flip":
        axes = [1 + a for a in range(spatial_dims) if float(torch.rand((), generator=gen)) < cm.param]
        return sample.flip(axes) if axes else sample
    pad = int(cm.param)
    shifts = torch.randint(-pad, pad + 1, (spatial_dims,), generator=gen).tolist()
    padded = F.pad(sample, [pad] * (2 * spatial_dims))
    window = [slice(pad - s, pad - s + n) for s, n in zip(shifts, sample.shape[1:])]
    return padded[(slice(None), *window)]


def _random_rotation(sample: torch.Tensor, max_degrees: float, gen: torch.Generator) -> torch.Tensor:
    """The ``rotate`` countermeasure's draws on one ``(C, *spatial)`` sample: with probability :data:`AUGMENT_PROB` a
    quarter turn (1-3 turns in the in-plane axes, the last two; a half turn when they differ in size), then with
    probability :data:`AUGMENT_PROB` a rotation by up to ``max_degrees`` about every axis (in-plane only in 2D),
    bilinear with zero fill about the centre, as :class:`monai.transforms.RandRotated` does."""
    if float(torch.rand((), generator=gen)) < AUGMENT_PROB:
        turns = int(torch.randint(1, 4, (), generator=gen)) if sample.shape[-1] == sample.shape[-2] else 2
        sample = torch.rot90(sample, turns, dims=(-2, -1))
    if float(torch.rand((), generator=gen)) >= AUGMENT_PROB:
        return sample
    spatial_dims = sample.ndim - 1
    limit = math.radians(max_degrees)
    angles = ((torch.rand(1 if spatial_dims == 2 else 3, generator=gen) * 2 - 1) * limit).tolist()
    theta = create_rotate(spatial_dims, angles, device=sample.device, backend="torch").to(sample.dtype)
    return _SMALL_ROTATION(sample[None], theta[None])[0]


def _random_cutout(sample: torch.Tensor, size: float, gen: torch.Generator) -> torch.Tensor:
    """One zero-filled hole in one ``(C, *spatial)`` sample, its side a fraction (``size < 1``) or a number of
    positions (``size >= 1``) of each side, placed uniformly where it fits, as the ``cutout`` countermeasure does."""
    keep = torch.ones_like(sample)
    window = [slice(None)]
    for n in sample.shape[1:]:
        side = max(1, round(size * n)) if size < 1 else min(int(size), n)
        start = int(torch.randint(0, n - side + 1, (), generator=gen))
        window.append(slice(start, start + side))
    keep[tuple(window)] = 0
    return sample * keep


def _random_augment(x: torch.Tensor, cm: Countermeasure, gen: torch.Generator) -> torch.Tensor:
    """One of :data:`_DIFFERENTIABLE_AUGMENTS` drawn and applied per sample of a batch ``(B, C, *spatial)``."""
    if cm.name == "rotate":
        return torch.stack([_random_rotation(sample, cm.param, gen) for sample in x])
    if cm.name == "cutout":
        return torch.stack([_random_cutout(sample, cm.param, gen) for sample in x])
    return torch.stack([_random_flip_shift(sample, cm, gen) for sample in x])


def differentiable_view(spec: str | Sequence[str], seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch function applying countermeasures with gradients, for training SALM through them.

    Blur, median and resampling are differentiated as they are; bit-depth reduction and JPEG pass the gradient
    straight through (the backward pass treats them as the identity, as in BPDA, Athalye et al. 2018). The
    attacker's augmentations ``flip``, ``crop`` (a random shift with zero fill), ``rotate`` (quarter turns and a small
    bilinear rotation) and ``cutout`` (a zero-filled hole) are drawn per sample as the victim's transforms draw them,
    so a generator trained through them learns a pattern that a victim still reads after augmenting its inputs.

    Args:
        spec: preprocess countermeasures and ``flip``, ``crop``, ``rotate`` or ``cutout``, as for
            :func:`parse_countermeasures` (e.g. ``"median"`` or ``"flip,crop:2"``).
        seed: seed of the augmentations' draws.

    Returns:
        a function mapping a batch ``(B, C, *spatial)`` in [0, 1] to its squeezed view, differentiable in the batch.

    Raises:
        ValueError: for unknown names, or countermeasures that cannot be applied with gradients.
    """
    steps = parse_countermeasures(spec)
    if not steps or any(cm.kind != "preprocess" and cm.name not in _DIFFERENTIABLE_AUGMENTS for cm in steps):
        allowed = [n for n, s in _SPECS.items() if s.kind == "preprocess"] + list(_DIFFERENTIABLE_AUGMENTS)
        raise ValueError(f"SALM can be trained through preprocess countermeasures and the flip, crop, rotate and "
                         f"cutout augmentations ({', '.join(allowed)}) only, got {spec!r}.")
    gen = torch.Generator().manual_seed(int(seed))

    def view(x: torch.Tensor) -> torch.Tensor:
        for cm in steps:
            if cm.name in _DIFFERENTIABLE_AUGMENTS:
                x = _random_augment(x, cm, gen)
                continue
            y = _PREPROCESSORS[cm.name](x, cm.param).clamp(0.0, 1.0)
            x = x + (y - x).detach() if cm.name in _STRAIGHT_THROUGH else y
        return x

    return view


# ----------------------------------------------------------------------------------------------- augment


class _RandRotate90KeepShaped(RandRotate90d):
    """:class:`monai.transforms.RandRotate90d` that keeps the spatial shape: on a non-square rotation plane it
    rotates by 180 degrees only (a 90-degree turn would swap the two sides)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None):
        key = self.first_key(dict(data))
        sizes = data[key].shape[1:] if key != () else ()
        self._square = not sizes or sizes[self.spatial_axes[0]] == sizes[self.spatial_axes[1]]
        return super().__call__(data, lazy)

    def randomize(self, data=None) -> None:
        super().randomize(data)
        if not getattr(self, "_square", True):
            self._rand_k = 2


class _RandCutoutd(RandCoarseDropoutd):
    """:class:`monai.transforms.RandCoarseDropoutd` with one zero-filled hole whose side is a fraction of each
    image side (``size < 1``) or a number of pixels (``size >= 1``)."""

    def __init__(self, keys, size: float, prob: float = 1.0):
        super().__init__(keys, holes=1, spatial_size=1, fill_value=0.0, prob=prob)
        self.size = size

    def __call__(self, data):
        key = self.first_key(dict(data))
        if key != ():
            spatial = data[key].shape[1:]
            if self.size < 1:
                self.dropper.spatial_size = [max(1, round(self.size * s)) for s in spatial]
            else:
                self.dropper.spatial_size = [min(int(self.size), s) for s in spatial]
        return super().__call__(data)


def augment_transforms(
    countermeasures: Sequence[Countermeasure], spatial_dims: int, keys: Sequence[str] | str = ("image",)
) -> list:
    """MONAI dictionary transforms for the ``"augment"`` countermeasures, in the given order.

    The transforms are random, act on channel-first ``(C, *spatial)`` items, keep the spatial shape, and are
    followed by a clamp to ``[0, 1]`` when any augmentation is selected.

    Args:
        countermeasures: the selection from :func:`parse_countermeasures`; other kinds are ignored.
        spatial_dims: 2 for images, 3 for volumes.
        keys: dictionary keys of the image(s) to augment.

    Returns:
        A list of MONAI transforms (empty when no augmentation is selected), e.g. for
        ``monai.transforms.Compose``.

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    out: list = []
    for cm in countermeasures:
        if cm.kind != "augment":
            continue
        p = cm.param
        if cm.name == "flip":
            out += [RandFlipd(keys, prob=p, spatial_axis=axis) for axis in range(spatial_dims)]
        elif cm.name == "rotate":
            plane = (0, 1) if spatial_dims == 2 else (1, 2)  # in-plane: (H, W) for 2D and 3D
            angle = math.radians(p)
            extra = angle if spatial_dims == 3 else 0.0
            out += [
                _RandRotate90KeepShaped(keys, prob=AUGMENT_PROB, max_k=3, spatial_axes=plane),
                RandRotated(keys, range_x=angle, range_y=extra, range_z=extra, prob=AUGMENT_PROB, keep_size=True),
            ]
        elif cm.name == "crop":
            out.append(
                RandAffined(keys, prob=1.0, translate_range=[p] * spatial_dims, mode="nearest", padding_mode="zeros")
            )
        elif cm.name == "cutout":
            out.append(_RandCutoutd(keys, size=p, prob=1.0))
        elif cm.name == "gamma":
            out.append(RandAdjustContrastd(keys, prob=AUGMENT_PROB, gamma=(1.0 / p, p)))
        elif cm.name == "intensity":
            out += [
                RandScaleIntensityd(keys, factors=p, prob=AUGMENT_PROB),
                RandShiftIntensityd(keys, offsets=p, prob=AUGMENT_PROB),
            ]
    if out:
        out.append(ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True))
    return out


# ----------------------------------------------------------------------------------------------- batch


class _ClassMixUp(MixUp):
    """:class:`monai.transforms.MixUp` for classification batches of any size, on any device.

    MONAI's ``MixUp.__call__`` fixes the batch size at construction, keeps its mixing weights on the CPU and only
    mixes 3D/4D label tensors; here its sampling (per-sample ``Beta(alpha, alpha)`` weights and a random pairing)
    is reused and the images and one-hot labels are mixed with the same weights.
    """

    def __init__(self, num_classes: int, alpha: float):
        super().__init__(batch_size=1, alpha=alpha)
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"mixup needs integer labels (B,) for images (B, ...), got {tuple(y.shape)}, {tuple(x.shape)}."
            )
        self.batch_size = x.shape[0]
        self.randomize()
        weight, perm, _ = self._params
        dtype = x.dtype if x.is_floating_point() else torch.float32
        w = weight.to(device=x.device, dtype=dtype)
        perm = torch.as_tensor(perm, device=x.device)
        onehot = F.one_hot(y.long().to(x.device), self.num_classes).to(dtype)
        wx = w.view(-1, *([1] * (x.ndim - 1)))
        wy = w[:, None]
        return wx * x + (1 - wx) * x[perm], wy * onehot + (1 - wy) * onehot[perm]


def batch_transform(
    countermeasures: Sequence[Countermeasure], num_classes: int, seed: int | None = None
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """The batch-level countermeasure (``mixup``), if selected.

    Args:
        countermeasures: the selection from :func:`parse_countermeasures`.
        num_classes: number of classes of the soft labels.
        seed: optional seed of the mixing weights and pairings.

    Returns:
        ``None`` without ``mixup``; otherwise a callable ``(x (B, C, *spatial), y (B,) int) -> (mixed x,
        soft labels (B, num_classes))`` whose rows sum to 1 (use with a cross-entropy on probabilities).

    Raises:
        ValueError: when ``num_classes`` < 1.
    """
    for cm in countermeasures:
        if cm.kind == "batch" and cm.name == "mixup":
            if num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
            mixer = _ClassMixUp(num_classes, alpha=cm.param)
            if seed is not None:
                mixer.set_random_state(seed)
            return mixer
    return None


# ----------------------------------------------------------------------------------------------- adversarial


def adversarial_training(countermeasures: Sequence[Countermeasure]) -> dict | None:
    """PGD settings for adversarial training, if selected.

    Args:
        countermeasures: the selection from :func:`parse_countermeasures`.

    Returns:
        ``None`` without ``adversarial``; otherwise ``{"epsilon", "steps", "step_size"}``, the keyword arguments of
        :func:`pgd_attack` (``step_size = 2.5 * epsilon / steps`` as in Madry et al.).
    """
    for cm in countermeasures:
        if cm.kind == "adversarial":
            return {
                "epsilon": cm.param,
                "steps": ADVERSARIAL_STEPS,
                "step_size": ADVERSARIAL_STEP_FACTOR * cm.param / ADVERSARIAL_STEPS,
            }
    return None


def pgd_attack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int, step_size: float
) -> torch.Tensor:
    """L-inf projected gradient ascent on the cross-entropy, from a uniform random start (Madry et al. 2018).

    The model runs in eval mode during the attack (BatchNorm statistics are not updated by attack passes) with
    its parameters frozen; its train/eval flags and ``requires_grad`` are restored afterwards and no parameter
    gradient is accumulated.

    Args:
        model: classifier returning logits.
        x: ``(B, C, *spatial)`` images in ``[0, 1]``.
        y: ``(B,)`` class indices or ``(B, num_classes)`` class probabilities (e.g. mixup soft labels).
        epsilon: L-inf budget in ``[0, 1]`` units.
        steps: number of gradient steps (0: random start only).
        step_size: size of each signed-gradient step.

    Returns:
        Detached adversarial images with ``|x_adv - x| <= epsilon`` and values in ``[0, 1]``.

    Raises:
        ValueError: for a negative ``epsilon``, ``steps`` or ``step_size``.
    """
    if epsilon < 0 or steps < 0 or step_size < 0:
        raise ValueError(f"epsilon, steps and step_size must be >= 0, got {epsilon}, {steps}, {step_size}.")
    x = _plain(x).detach()
    y = _plain(y).detach()
    lower, upper = (x - epsilon).clamp(0.0, 1.0), (x + epsilon).clamp(0.0, 1.0)
    with preserve_model_state(model), torch.enable_grad():
        model.eval()
        model.requires_grad_(False)
        x_adv = torch.min(torch.max(x + torch.empty_like(x).uniform_(-epsilon, epsilon), lower), upper)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), lower), upper)
    return x_adv.detach()
