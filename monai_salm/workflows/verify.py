"""Check a released folder against its originals and its manifest (``monai-salm verify``)."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch

from monai_salm.api import protect_tensor
from monai_salm.io import read_image, read_manifest
from monai_salm.io.utils import sha256_file
from monai_salm.workflows.protect import load_checkpoint

__all__ = ["Check", "verify_release"]


@dataclass(frozen=True)
class Check:
    """One verified property of one released image: ``ok`` and what was seen."""

    image: str
    check: str
    ok: bool
    detail: str = ""


def _manifest(release: Path) -> Path:
    for name in ("manifest.csv", "manifest.json"):
        if (release / name).is_file():
            return release / name
    raise ValueError(f"{release}: no manifest.csv or manifest.json; not a monai-salm release folder.")


def _tail(path: str, depth: int) -> Path:
    return Path(*Path(path).parts[-depth:])


def _layout_depth(entries, release: Path, original: Path) -> int:
    """How many trailing path components the recorded paths keep below their roots (the copy keeps the relative
    layout): the depth at which the most recorded files are found under ``release`` and ``original``."""
    longest = max(min(len(Path(e.input_path).parts), len(Path(e.output_path).parts)) for e in entries)
    def found(entry, depth: int) -> bool:
        return (release / _tail(entry.output_path, depth)).is_file() and (
            original / _tail(entry.input_path, depth)).is_file()

    hits = {depth: sum(found(e, depth) for e in entries) for depth in range(1, longest)}
    return max(hits, key=lambda depth: (hits[depth], -depth))


def verify_release(release: str | os.PathLike, original: str | os.PathLike,
                   checkpoint: str | os.PathLike | None = None) -> list[Check]:
    """Verify every image of a release folder written by ``monai-salm protect`` (or the bundle's inference).

    For each image of the manifest: every file is present and has the recorded sha256; the copy has the original's
    shape and stored type; the largest change and the changed-position count are those recorded; NIfTI affines are
    kept; DICOM copies are marked ``DERIVED`` with new instance UIDs. With ``checkpoint``, also: no change exceeds
    its epsilon (in original units, plus half a stored unit for integer files), nothing changed outside its mask,
    and the copy equals the release recomputed here from the original (protection is deterministic).

    The recorded paths are matched below ``release`` and ``original`` by their relative layout, so a release and its
    originals may have been moved.

    Args:
        release: the release folder (holding ``manifest.csv`` or ``manifest.json``).
        original: the folder the release was made from.
        checkpoint: the checkpoint that made it.

    Returns:
        the checks, in manifest order.

    Raises:
        ValueError: naming the folder or file, for a missing manifest or checkpoint.
    """
    release, original = Path(release), Path(original)
    entries = read_manifest(_manifest(release))
    if not entries:
        raise ValueError(f"{release}: the manifest lists no image.")
    depth = _layout_depth(entries, release, original)
    protection = load_checkpoint(checkpoint) if checkpoint is not None else None
    images: OrderedDict[tuple[Path, Path], list] = OrderedDict()
    for e in entries:  # a DICOM series has one entry per slice file: one image per series folder
        src, out = original / _tail(e.input_path, depth), release / _tail(e.output_path, depth)
        key = (src.parent, out.parent) if e.format == "dicom_series" else (src, out)
        images.setdefault(key, []).append((e, src, out))
    checks: list[Check] = []
    for (src, out), parts in images.items():
        checks += _verify_image(src, out, parts, protection)
    return checks


def _verify_image(src: Path, out: Path, parts: list, protection) -> list[Check]:
    name = str(out)
    rows = []
    missing = [p_out for _, _, p_out in parts if not p_out.is_file()]
    rows.append(Check(name, "files present", not missing, f"missing {missing[0]}" if missing else ""))
    if missing:
        return rows
    bad = [p_out.name for e, _, p_out in parts if sha256_file(p_out) != e.sha256]
    rows.append(Check(name, "sha256 as recorded", not bad, f"differs: {bad[0]}" if bad else ""))
    try:
        before, meta_in = read_image(src)
        after, meta_out = read_image(out)
    except ValueError as e:
        return rows + [Check(name, "readable", False, str(e))]
    same = before.shape == after.shape and meta_in.dtype == meta_out.dtype
    rows.append(Check(name, "shape and stored type kept", same,
                      f"{before.shape} {meta_in.dtype} -> {after.shape} {meta_out.dtype}"))
    if not same:
        return rows
    diff = np.abs(after.astype(np.float64) - before.astype(np.float64))
    recorded_max = max(e.max_abs_change for e, _, _ in parts)
    recorded_changed = sum(e.changed_voxels for e, _, _ in parts)
    changed = diff.any(axis=0)
    rows.append(Check(name, "change as recorded", abs(float(diff.max()) - recorded_max) <= 1e-3
                      and int(changed.sum()) == recorded_changed,
                      f"max {float(diff.max()):.4g} (recorded {recorded_max:.4g}), {int(changed.sum())} changed "
                      f"(recorded {recorded_changed})"))
    if meta_in.format == "nifti":
        rows.append(Check(name, "affine kept", bool(np.array_equal(meta_in.affine, meta_out.affine))))
    if meta_in.format in ("dicom", "dicom_series"):
        ok = all(_derived_copy(pydicom.dcmread(p_out, stop_before_pixels=True),
                               pydicom.dcmread(p_src, stop_before_pixels=True)) for _, p_src, p_out in parts)
        rows.append(Check(name, "DICOM marked DERIVED, new UIDs", ok))
    if protection is not None:
        rows += _against_checkpoint(name, before, after, diff, changed, meta_in, parts[0][0].label, protection)
    return rows


def _derived_copy(copy: pydicom.Dataset, source: pydicom.Dataset) -> bool:
    return copy.ImageType[0] == "DERIVED" and copy.SOPInstanceUID != source.SOPInstanceUID


def _against_checkpoint(name, before, after, diff, changed, meta, label, protection) -> list[Check]:
    scaling, settings = protection.scaling, protection.settings
    integer = np.dtype(meta.dtype).kind in "iu"
    slope = max(abs(s) for s in meta.slopes) if meta.slopes else 1.0
    tol = 0.5 * slope + 1e-6 if integer else 1e-4 * scaling.epsilon_in_units(settings.epsilon)
    eps_units = scaling.epsilon_in_units(settings.epsilon)
    rows = [Check(name, "within epsilon", float(diff.max()) <= eps_units + tol,
                  f"max {float(diff.max()):.4g} of {eps_units:.4g}")]
    unit = scaling.to_unit(before)
    expected, masks = protect_tensor(torch.from_numpy(unit)[None], torch.tensor([label]), settings,
                                     protection.generator, protection.surrogate, protection.class_scores, batch_size=1)
    mask = masks[0, 0].numpy()
    outside = int(changed[~mask].sum())
    rows.append(Check(name, "no change outside the mask", outside == 0, f"{outside} changed outside"))
    want = scaling.apply_delta(before, unit, expected[0].numpy()).astype(np.float64)
    gap = float(np.abs(after.astype(np.float64) - want).max())
    rows.append(Check(name, "equals the release recomputed here", gap <= tol, f"largest gap {gap:.4g}"))
    return rows
