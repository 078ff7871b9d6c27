"""Protect every image of a dataset with a checkpoint: loading it, the inferer, the evaluator, :func:`protect_files`
and :func:`protect_dataset`."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from monai.data import DataLoader, DistributedSampler
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator
from monai.inferers import Inferer

from monai_salm.api import protect_tensor
from monai_salm.engines import SALMSettings, load_protection
from monai_salm.engines.distributed import world_size
from monai_salm.io import IntensityScaling, read_manifest
from monai_salm.io.utils import full_suffix, sha256_file
from monai_salm.workflows.dataset import ProtectionDataset
from monai_salm.workflows.intensity import scaling_from_settings
from monai_salm.workflows.npz_release import protect_npz
from monai_salm.workflows.saver import ProtectedCopySaver

__all__ = ["Protection", "load_checkpoint", "release_identity", "release_record", "ProtectInferer", "protect_evaluator",
           "protect_files", "protect_dataset"]


class Protection(NamedTuple):
    """A loaded checkpoint: what :func:`monai_salm.api.protect_tensor` needs, plus the intensity scaling."""

    settings: SALMSettings
    generator: torch.nn.Module
    surrogate: torch.nn.Module | None  # None for a slim release checkpoint
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


def release_record(checkpoint: str | os.PathLike, seed: int = 0) -> dict:
    """What makes a release: the checkpoint (its sha256, which covers every setting) and the seed, and the release
    identity hashed from the two.

    New DICOM UIDs are derived from the identity (:class:`~monai_salm.io.ProtectedCopyWriter` ``uid_salt``), so the
    same inputs, checkpoint and seed give byte-identical files, and another checkpoint or seed gives other UIDs. The
    release folder keeps this record (``.monai-salm-release.json``).

    Returns:
        ``{"release_identity", "checkpoint_sha256", "seed"}``.

    Raises:
        ValueError: when the checkpoint cannot be read.
    """
    try:
        digest = sha256_file(checkpoint)
    except OSError as e:
        raise ValueError(f"{checkpoint}: cannot read the checkpoint ({e.strerror or e}).") from None
    identity = hashlib.sha256(f"monai-salm release|{digest}|{int(seed)}".encode()).hexdigest()
    return {"release_identity": identity, "checkpoint_sha256": digest, "seed": int(seed)}


def release_identity(checkpoint: str | os.PathLike, seed: int = 0) -> str:
    """The identity of the release a checkpoint and seed make (:func:`release_record`)."""
    return release_record(checkpoint, seed)["release_identity"]


class ProtectInferer(Inferer):
    """Inference inferer: ``network`` is the generator; returns the protected images (in [0, 1]).

    One saliency gradient (or the class mask) and one generator pass per image, via
    :func:`monai_salm.api.protect_tensor`. Use with ``PrepareBatchExtraInput({"labels": "label"})``.

    Args:
        settings, surrogate, class_scores: from the checkpoint (:func:`load_checkpoint`).
        seed: seed of the random-mask ablation.
        amp: mixed precision for the networks (``None``: on for CUDA), see :func:`~monai_salm.api.protect_tensor`.
    """

    def __init__(self, settings: SALMSettings, surrogate: torch.nn.Module | None,
                 class_scores: torch.Tensor | None = None, seed: int = 0, amp: bool | None = None) -> None:
        super().__init__()
        self.settings, self.surrogate, self.class_scores, self.seed = settings, surrogate, class_scores, seed
        self.amp = amp

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, labels: torch.Tensor, *args, **kwargs):
        protected, _ = protect_tensor(
            inputs, labels, self.settings, network, self.surrogate, self.class_scores,
            batch_size=max(1, inputs.shape[0]), device=inputs.device, seed=self.seed, amp=self.amp,
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
    amp: bool | None = None,
    uid_salt: str | None = None,
    release_info: dict | None = None,
) -> tuple[SupervisedEvaluator, ProtectedCopySaver]:
    """The evaluator of ``bundles/salm_protect/configs/inference.json``, built in Python.

    ``overwrite``, ``resume``, ``uid_salt`` and ``release_info`` are those of :class:`ProtectedCopySaver`; ``amp``
    that of :class:`ProtectInferer`. Under ``torch.distributed`` each process protects every N-th image (a
    ``DistributedSampler`` without padding) and the saver merges the manifests.

    Returns:
        ``(evaluator, saver)``; ``evaluator.run()`` writes the copy, then ``saver.manifest_path`` is the manifest.
    """
    saver = ProtectedCopySaver(dataset, output_dir, overwrite=overwrite, resume=resume, uid_salt=uid_salt,
                               release_info=release_info)
    cuda = torch.device(device).type == "cuda"
    sampler = DistributedSampler(dataset, even_divisible=False, shuffle=False) if world_size() > 1 else None
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=DataLoader(dataset, batch_size=1, shuffle=False, sampler=sampler, num_workers=0,
                                   pin_memory=cuda),
        non_blocking=cuda,
        network=protection.generator,
        inferer=ProtectInferer(protection.settings, protection.surrogate, protection.class_scores, seed=seed, amp=amp),
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
    amp: bool | None = None,
) -> Path:
    """Protect every image of a dataset and write the copy (same formats and relative layout) plus a manifest.

    Each file is read in original units, scaled with the checkpoint's intensity scaling, protected (one saliency
    gradient or class mask, one generator pass), mapped back with :meth:`IntensityScaling.apply_delta` and written
    by :class:`~monai_salm.io.ProtectedCopyWriter`. This is what the bundle's ``inference.json`` runs. The same
    inputs, checkpoint and seed give byte-identical files (new DICOM UIDs come from :func:`release_identity`), with
    one process or several under ``torch.distributed`` (each then writes its share of the files).

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
        amp: mixed precision for the networks (``None``: on for CUDA devices).

    Returns:
        the manifest path (``output_dir/manifest.csv``).

    Raises:
        ValueError: naming the file, for a bad checkpoint, an unreadable image, mixed 2D/3D data, a missing label,
            an image that does not fit the checkpoint, or a bad output folder; nothing this run wrote is left in
            ``output_dir`` (with ``resume``, the copies of the earlier run stay).
    """
    protection = load_checkpoint(checkpoint, device)
    dataset = ProtectionDataset(source, protection.scaling, protection.settings)
    record = release_record(checkpoint, seed)
    evaluator, saver = protect_evaluator(protection, dataset, output_dir, overwrite, device, seed=seed, resume=resume,
                                         amp=amp, uid_salt=record["release_identity"],
                                         release_info={**record, "checkpoint": str(checkpoint)})
    evaluator.run()
    return saver.manifest_path


def protect_dataset(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    fraction: float = 1.0,
    overwrite: bool = False,
    resume: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    amp: bool | None = None,
    progress: bool = False,
) -> dict:
    """Protect a dataset in whatever form it comes: the one release entry point (``monai-salm protect``).

    A ``.npz`` becomes a protected ``.npz`` (:func:`~monai_salm.workflows.npz_release.protect_npz`; ``splits``,
    ``classes`` and ``fraction`` apply to it); a datalist or class folder becomes a folder of protected copies in
    the same formats and layout, with a manifest (:func:`protect_files`; ``resume`` applies to it). Images of any
    size are protected at their own size.

    Returns:
        the ``.npz`` report (per split statistics), or for files ``{"out", "manifest", "files", "lossy_jpeg",
        "changed_voxels", "max_abs_change"}`` (``lossy_jpeg``: JPEG copies, whose re-encoding spreads the change
        beyond the mask; the manifest measures it); both with ``protect_seconds``.

    Raises:
        ValueError: naming the file, for bad inputs or options that do not apply to the data's form.
    """
    if full_suffix(data) == ".npz":
        if resume:
            raise ValueError("--resume applies to a datalist or class folder protected into a folder, not to .npz "
                             "data.")
        return protect_npz(checkpoint, data, out, splits, classes, fraction, overwrite, device, seed, amp, progress)
    if splits is not None or classes or fraction != 1.0:
        raise ValueError("--splits, --classes and --fraction apply to .npz data only; a datalist or class folder is "
                         "protected whole.")
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{out}: is a broken symbolic link; give --out a folder path.")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise ValueError(f"{out}: output folder is not empty (pass --overwrite to write into it, or --resume to "
                         "complete an interrupted run).")
    start = time.perf_counter()
    try:
        manifest = protect_files(checkpoint, data, out, overwrite=overwrite, device=device, seed=seed, resume=resume,
                                 amp=amp)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    entries = read_manifest(manifest)
    return {
        "out": str(out),
        "manifest": str(manifest),
        "files": len(entries),
        "lossy_jpeg": sum(e.format == "jpeg" for e in entries),
        "changed_voxels": int(sum(e.changed_voxels for e in entries)),
        "max_abs_change": max((e.max_abs_change for e in entries), default=0.0),
        "protect_seconds": round(time.perf_counter() - start, 2),
    }
