"""One-file SALM checkpoint: generator, surrogate and every setting needed to protect new data."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose

from monai_salm.io.utils import atomic_path
from monai_salm.networks import NoiseGenerator, build_classifier
from monai_salm.transforms import ApplyUnlearnableNoised, SaliencyMaskd
from monai_salm.transforms.functional import epsilon_for_psnr, resolve_k

__all__ = [
    "SALMSettings",
    "save_protection",
    "load_protection",
    "slim_protection",
    "protection_transforms",
    "CHECKPOINT_FORMAT",
    "MAX_CLASSES",
]

CHECKPOINT_FORMAT = "monai-salm-checkpoint/1"

#: the most classes a SALM generator is built for: its label maps and class patterns grow with the class count
MAX_CLASSES = 1000


@dataclasses.dataclass
class SALMSettings:
    """Everything that defines a protection, stored in the checkpoint.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of classes.
        image_size: the working grid: the spatial size the generator/surrogate were trained on. Images of any other
            size are protected on this grid and the change is mapped back onto their own.
        epsilon: L-infinity budget in ``value_range`` units.
        k: sparsity (fraction or count).
        value_range: range of the scaled images.
        intensity: how raw data maps to ``value_range``: a ``monai_salm.io.IntensityScaling`` dict, e.g.
            ``{"kind": "window", "lo": -1000, "hi": 1000}`` for CT; epsilon means ``epsilon * (hi - lo)``
            in original units.
        mask_mode: ``sample``, ``class`` or ``random``.
        label_conditioned: whether the generator takes labels.
        surrogate: surrogate architecture name.
        generator: keyword arguments of :class:`NoiseGenerator`.
    """

    spatial_dims: int
    in_channels: int
    num_classes: int
    image_size: tuple[int, ...]
    epsilon: float
    k: float | int
    value_range: tuple[float, float] = (0.0, 1.0)
    intensity: dict = dataclasses.field(default_factory=lambda: {"kind": "range", "lo": 0.0, "hi": 255.0, "clip": True})
    mask_mode: str = "sample"
    label_conditioned: bool = True
    surrogate: str = "resnet18"
    generator: dict = dataclasses.field(default_factory=dict)


def save_protection(
    path: str | os.PathLike,
    settings: SALMSettings,
    generator: torch.nn.Module,
    surrogate: torch.nn.Module | None,
    class_scores: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint atomically (temporary file in the same folder, then rename).

    ``surrogate=None`` writes a release checkpoint without the surrogate's weights, which only the per-image
    (``sample``) mask mode needs (see :func:`slim_protection`).

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "settings": dataclasses.asdict(settings),
        "generator": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "surrogate": None if surrogate is None else {k: v.detach().cpu() for k, v in surrogate.state_dict().items()},
        "class_scores": None if class_scores is None else class_scores.detach().cpu(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _check_settings(path, s: SALMSettings) -> None:
    """Refuse settings no training run writes: a checkpoint is a file anyone may have edited."""
    from monai_salm.engines.trainer import MASK_MODES

    lo, hi = s.value_range
    problems = []
    if s.spatial_dims not in (2, 3) or len(s.image_size) != s.spatial_dims or min(s.image_size, default=0) < 1:
        problems.append(f"spatial_dims {s.spatial_dims} with image_size {s.image_size}")
    if not 1 <= s.in_channels <= 16:
        problems.append(f"in_channels {s.in_channels}")
    if not 2 <= s.num_classes <= MAX_CLASSES:
        problems.append(f"num_classes {s.num_classes}")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        problems.append(f"value_range {s.value_range}")
    elif not (math.isfinite(s.epsilon) and 0 < s.epsilon <= hi - lo):
        problems.append(f"epsilon {s.epsilon} (must be in (0, {hi - lo}])")
    if s.mask_mode not in MASK_MODES:
        problems.append(f"mask_mode {s.mask_mode!r}")
    if not problems:
        try:
            resolve_k(s.k, math.prod(s.image_size))
        except ValueError:
            problems.append(f"k {s.k!r}")
    if problems:
        raise ValueError(f"{path}: invalid checkpoint settings: {'; '.join(problems)}.")


def load_protection(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SALMSettings, torch.nn.Module, torch.nn.Module | None, torch.Tensor | None]:
    """Load a checkpoint written by :func:`save_protection`.

    Returns:
        ``(settings, generator, surrogate, class_scores)``, networks in eval mode on ``device``; ``surrogate`` is
        ``None`` for a slim release checkpoint.

    Raises:
        ValueError: when the file is not a monai-salm checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if not Path(path).is_file():
            reason = "no such file"
        raise ValueError(f"{path}: not a readable monai-salm checkpoint ({reason}).") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a monai-salm checkpoint (missing format {CHECKPOINT_FORMAT!r}).")
    try:
        raw = dict(payload["settings"])
        raw["image_size"] = tuple(int(v) for v in raw["image_size"])
        raw["value_range"] = tuple(float(v) for v in raw["value_range"])
        settings = SALMSettings(**raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid settings in the checkpoint ({type(e).__name__}: {e}).") from None
    _check_settings(path, settings)
    generator = NoiseGenerator(
        settings.spatial_dims,
        settings.in_channels,
        settings.num_classes if settings.label_conditioned else 0,
        **settings.generator,
    )
    generator.load_state_dict(payload["generator"])
    tensors = [("generator", v) for v in payload["generator"].values()]
    tensors += [("class_scores", payload["class_scores"])] if payload.get("class_scores") is not None else []
    for name, value in tensors:
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: the checkpoint's {name} holds NaN or infinite values.")
    surrogate = None
    if payload.get("surrogate") is not None:
        surrogate = build_classifier(settings.surrogate, settings.spatial_dims, settings.in_channels,
                                     settings.num_classes, settings.image_size)
        surrogate.load_state_dict(payload["surrogate"])
        surrogate = surrogate.to(device).eval()
    return settings, generator.to(device).eval(), surrogate, payload.get("class_scores")


def slim_protection(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a release checkpoint: ``path`` without the surrogate's weights.

    Class-level and random masks never use the surrogate, so the slim checkpoint protects exactly as the full one
    (same bytes out) at a fraction of its size; the per-image ``sample`` mask mode needs the surrogate's gradient
    and is refused.

    Args:
        path: a checkpoint written by :func:`save_protection`.
        out: where the release checkpoint goes (not ``path``).

    Returns:
        the path written.

    Raises:
        ValueError: for an unreadable checkpoint, a ``sample``-mode one, or ``out`` equal to ``path``.
    """
    if Path(out).resolve() == Path(path).resolve():
        raise ValueError(f"{out}: the release checkpoint must not replace the checkpoint it is made from.")
    settings, generator, _, class_scores = load_protection(path)
    if settings.mask_mode == "sample":
        raise ValueError(f"{path}: per-image saliency masks (mask_mode 'sample') need the surrogate's gradient; "
                         "only 'class' and 'random' checkpoints have a slim release form.")
    extra = torch.load(path, map_location="cpu", weights_only=True).get("extra", {})
    return save_protection(out, settings, generator, None, class_scores, extra={**extra, "slim": True})


def protection_transforms(
    path: str | os.PathLike,
    keys: str | Sequence[str] = "image",
    label_key: str = "label",
    mask_key: str = "salm_mask",
    device: str | torch.device = "cpu",
    psnr: float | None = None,
) -> Compose:
    """Ready-to-use ``Compose([SaliencyMaskd, ApplyUnlearnableNoised])`` from a checkpoint.

    Images given to it must already be channel-first and scaled to the checkpoint's ``value_range``; they may have
    any spatial size (mask and noise are made on the checkpoint's working grid and mapped onto each image's own).

    Args:
        path: checkpoint written by :func:`save_protection`.
        keys: image keys.
        label_key: label key.
        mask_key: where the mask is stored.
        device: torch device.
        psnr: when set, lower the checkpoint's epsilon (never raise it) so that releases at its ``k`` and image
            size have at least this PSNR in dB (:func:`monai_salm.transforms.epsilon_for_psnr`).

    Returns:
        the two transforms in a ``Compose``.
    """
    settings, generator, surrogate, class_scores = load_protection(path, device)
    epsilon = settings.epsilon
    if psnr is not None:
        lo, hi = settings.value_range
        positions = math.prod(settings.image_size)
        epsilon = min(epsilon, epsilon_for_psnr(psnr, settings.k, positions, data_range=hi - lo))
    return Compose(
        [
            SaliencyMaskd(
                keys,
                label_key=label_key,
                model=surrogate,
                k=settings.k,
                mask_key=mask_key,
                class_scores=class_scores if settings.mask_mode == "class" else None,
                work_size=settings.image_size,
            ),
            ApplyUnlearnableNoised(
                keys,
                mask_key=mask_key,
                generator=generator,
                epsilon=epsilon,
                label_key=label_key if settings.label_conditioned else None,
                value_range=settings.value_range,
                work_size=settings.image_size,
            ),
        ]
    )
