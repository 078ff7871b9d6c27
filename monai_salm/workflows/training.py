"""Pieces of the bundle's training config around :class:`~monai_salm.engines.SALMTrainer`: the settings stored in
the checkpoint, the protected-validation inferer and the handler that saves the checkpoint."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer

from monai_salm.api import protect_tensor
from monai_salm.engines import SALMSettings, save_protection
from monai_salm.engines.distributed import barrier, is_main
from monai_salm.io import IntensityScaling
from monai_salm.networks import NoiseGenerator
from monai_salm.transforms.functional import epsilon_for_psnr
from monai_salm.workflows.arrays import TrainingArrays
from monai_salm.workflows.split import SALMData

__all__ = ["make_settings", "resolve_epsilon", "ProtectedValidationInferer", "SaveProtection",
           "check_checkpoint_output"]


def check_checkpoint_output(out: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """Refuse, before any training, a checkpoint path that is the training data, a folder, a broken symbolic link, or
    in a folder that cannot be written.

    Returns:
        the path.

    Raises:
        ValueError: naming the path and the problem.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{out}: is a broken symbolic link; give a checkpoint file path.")
    if data is not None and out.resolve() == Path(data).resolve():
        raise ValueError(f"{out}: is the training data; refusing to overwrite it.")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; the checkpoint is a file.")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{out}: cannot write there ({parent} is not a writable folder).")
    return out


def _generator_kwargs(generator: NoiseGenerator) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"image_term": False}
    if generator.net is not None:
        kwargs = {"channels": [int(c) for c in generator.net.channels],
                  "strides": [int(s) for s in generator.net.strides]}
    if generator.rotation_symmetric:
        kwargs["rotation_symmetric"] = True
    if generator.pattern_size is not None:
        kwargs["pattern_size"] = list(generator.pattern_size)
    if generator.pattern_kind != "learned":
        kwargs["pattern_kind"] = generator.pattern_kind
    elif generator.pattern_cell > 1:
        kwargs["pattern_cell"] = generator.pattern_cell
    return kwargs


def resolve_epsilon(
    epsilon: float | None,
    psnr: float | None,
    k: float | int,
    image_size: Sequence[int],
    scaling: IntensityScaling | None = None,
) -> float:
    """The training budget: ``epsilon`` when given, else the epsilon that meets ``psnr`` dB at sparsity ``k``.

    A budget from ``psnr`` is rounded down to whole original units when ``scaling`` maps whole-numbered stored
    values (8-bit ``range:0:255``, a CT ``window`` in HU), so rounding the protected values back to the stored type
    can never exceed it.

    Args:
        epsilon: the budget in [0, 1] units, or None to derive it from ``psnr``.
        psnr: target PSNR of the release in dB (used when ``epsilon`` is None).
        k: sparsity (fraction or count).
        image_size: spatial size of the training images.
        scaling: the data's intensity scaling.

    Returns:
        epsilon in [0, 1] units (see :func:`monai_salm.transforms.epsilon_for_psnr`).

    Raises:
        ValueError: when both are None, or for a bad ``psnr``/``k``.
    """
    if epsilon is not None:
        return float(epsilon)
    if psnr is None:
        raise ValueError("give an epsilon or a target psnr.")
    eps = epsilon_for_psnr(float(psnr), k, math.prod(int(v) for v in image_size))
    width = scaling.hi - scaling.lo if scaling is not None and scaling.kind in ("range", "window") else 0.0
    if width >= 1 and float(width).is_integer():
        eps = max(1.0, math.floor(eps * width + 1e-9)) / width
    return eps


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
    surrogate, class score maps and settings to ``path`` (atomically). Under ``torch.distributed`` attach it on every
    process (the masks are recomputed collectively); rank 0 writes the file and the others wait for it.

    Args:
        path: the checkpoint file (the bundle's ``models/model.pt``).
        settings: from :func:`make_settings`.
        extra: more values to store under ``"extra"`` (the data source, ...).

    Raises:
        ValueError: when ``path`` cannot be written (:func:`check_checkpoint_output`), at construction, so before
            the training that would be lost.
    """

    def __init__(self, path: str | os.PathLike, settings: SALMSettings, extra: dict | None = None) -> None:
        self.path = check_checkpoint_output(path)  # before training, not after it
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
        if is_main():
            save_protection(self.path, self.settings, engine.generator, engine.surrogate, engine.class_scores,
                            extra=extra)
            engine.logger.info(f"saved the monai-salm checkpoint to {self.path}.")
        barrier()
