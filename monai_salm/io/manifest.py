"""Manifest of a protected copy: one row per written file, with its hash and how much it changed."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from monai_salm.io.utils import atomic_path

__all__ = ["ManifestEntry", "write_manifest", "read_manifest"]


@dataclass(frozen=True)
class ManifestEntry:
    """One written file.

    Attributes:
        input_path: the source file.
        output_path: the protected file written.
        sha256: SHA-256 of the output file's bytes.
        changed_voxels: spatial positions whose value differs after writing (any channel).
        max_abs_change: largest absolute change in original units, measured on the file as written (after
            rounding to the stored type and clipping to its range).
        label: the sample's class index.
        format: the file format (see :class:`monai_salm.io.ImageRecord`).
    """

    input_path: str
    output_path: str
    sha256: str
    changed_voxels: int
    max_abs_change: float
    label: int
    format: str


_FIELDS = [f.name for f in fields(ManifestEntry)]


def write_manifest(entries: list[ManifestEntry], path: str | os.PathLike) -> Path:
    """Write the manifest atomically as CSV (``.csv``) or JSON (``.json``, a list of objects).

    Args:
        entries: the rows.
        path: destination; its suffix picks the format.

    Returns:
        the path written.

    Raises:
        ValueError: for another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"{path}: a manifest must end in .csv or .json.")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            if suffix == ".json":
                json.dump([asdict(e) for e in entries], f, indent=1)
            else:
                writer = csv.DictWriter(f, fieldnames=_FIELDS)
                writer.writeheader()
                writer.writerows(asdict(e) for e in entries)
    return path


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Read a manifest written by :func:`write_manifest`.

    Raises:
        ValueError: for an unreadable file or unexpected columns.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = json.load(f) if path.suffix.lower() == ".json" else list(csv.DictReader(f))
        return [
            ManifestEntry(r["input_path"], r["output_path"], r["sha256"], int(r["changed_voxels"]),
                          float(r["max_abs_change"]), int(r["label"]), r["format"])
            for r in rows
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({type(e).__name__}: {e}).") from None
