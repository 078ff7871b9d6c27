"""Protect every image of a dataset with a checkpoint: the inferer, the evaluator and :func:`protect_files`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator
from monai.inferers import Inferer

from monai_salm.api import protect_tensor
from monai_salm.engines import SALMSettings
from monai_salm.workflows.checkpoint import Protection, load_checkpoint
from monai_salm.workflows.dataset import ProtectionDataset
from monai_salm.workflows.saver import ProtectedCopySaver

__all__ = ["ProtectInferer", "protect_evaluator", "protect_files"]


class ProtectInferer(Inferer):
    """Inference inferer: ``network`` is the generator; returns the protected images (in [0, 1]).

    One saliency gradient (or the class mask) and one generator pass per image, via
    :func:`monai_salm.api.protect_tensor`. Use with ``PrepareBatchExtraInput({"labels": "label"})``.

    Args:
        settings, surrogate, class_scores: from the checkpoint (:func:`load_checkpoint`).
        seed: seed of the random-mask ablation.
    """

    def __init__(self, settings: SALMSettings, surrogate: torch.nn.Module, class_scores: torch.Tensor | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.settings, self.surrogate, self.class_scores, self.seed = settings, surrogate, class_scores, seed

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, labels: torch.Tensor, *args, **kwargs):
        protected, _ = protect_tensor(
            inputs, labels, self.settings, network, self.surrogate, self.class_scores,
            batch_size=max(1, inputs.shape[0]), device=inputs.device, seed=self.seed,
        )
        return protected.to(inputs.device)


def protect_evaluator(
    protection: Protection,
    dataset: ProtectionDataset,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    handlers: Sequence | None = None,
    seed: int = 0,
    resume: bool = False,
) -> tuple[SupervisedEvaluator, ProtectedCopySaver]:
    """The evaluator of ``bundles/salm_protect/configs/inference.json``, built in Python.

    ``overwrite`` and ``resume`` are those of :class:`ProtectedCopySaver`.

    Returns:
        ``(evaluator, saver)``; ``evaluator.run()`` writes the copy, then ``saver.manifest_path`` is the manifest.
    """
    saver = ProtectedCopySaver(dataset, output_dir, overwrite=overwrite, resume=resume)
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0),
        network=protection.generator,
        inferer=ProtectInferer(protection.settings, protection.surrogate, protection.class_scores, seed=seed),
        prepare_batch=PrepareBatchExtraInput({"labels": "label"}),
        val_handlers=[saver, *(handlers or [])],
        decollate=False,
    )
    return evaluator, saver


def protect_files(
    checkpoint: str | os.PathLike,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    resume: bool = False,
) -> Path:
    """Protect every image of a dataset and write the copy (same formats and relative layout) plus a manifest.

    Each file is read in original units, scaled with the checkpoint's intensity scaling, protected (one saliency
    gradient or class mask, one generator pass), mapped back with :meth:`IntensityScaling.apply_delta` and written
    by :class:`~monai_salm.io.ProtectedCopyWriter`. This is what the bundle's ``inference.json`` runs.

    Args:
        checkpoint: a monai-salm checkpoint (``models/model.pt`` of the bundle, ``monai-salm train --out``).
        source: datalist JSON or class folder.
        output_dir: destination folder (outside the input; empty unless ``overwrite`` or ``resume``).
        overwrite: allow a non-empty ``output_dir``.
        device: torch device.
        seed: seed of the random-mask ablation.
        resume: complete an interrupted run into ``output_dir``: images whose copy is already there are kept (not
            written again) and measured for the manifest, the others are protected and written; use the same
            checkpoint, data and seed as the interrupted run.

    Returns:
        the manifest path (``output_dir/manifest.csv``).

    Raises:
        ValueError: naming the file, for a bad checkpoint, an unreadable image, mixed 2D/3D data, a missing label,
            an image that does not fit the checkpoint, or a bad output folder; nothing this run wrote is left in
            ``output_dir`` (with ``resume``, the copies of the earlier run stay).
    """
    protection = load_checkpoint(checkpoint, device)
    dataset = ProtectionDataset(source, protection.scaling, protection.settings)
    evaluator, saver = protect_evaluator(protection, dataset, output_dir, overwrite, device, seed=seed, resume=resume)
    evaluator.run()
    return saver.manifest_path
