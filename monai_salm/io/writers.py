"""Write protected copies of medical images in their original format, keeping their metadata.

Every file is written to a temporary name in its destination folder and renamed into place, so an interrupted
run never leaves a truncated file (:class:`ProtectedCopyWriter` with ``resume=True`` completes such a run). Values
are given in original units and stored back in the original stored type: rounded, clipped to the stored range, and
through the file's slope/intercept.
"""

from __future__ import annotations

import copy
import glob
import os
import secrets
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.pixels import set_pixel_data
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from monai_salm import __version__
from monai_salm.io.manifest import ManifestEntry, write_manifest
from monai_salm.io.readers import ImageMeta, ImageRecord, PILImage, itk, read_image
from monai_salm.io.utils import atomic_path, elementwise, full_suffix, is_within, sha256_file

__all__ = ["DEFAULT_DESCRIPTION", "write_image", "ProtectedCopyWriter"]

#: DICOM DerivationDescription of protected copies.
DEFAULT_DESCRIPTION = (
    f"Protected copy made by monai-salm {__version__}: a small bounded perturbation was added to some pixels "
    "to make the image unlearnable for unauthorised model training. Not for diagnostic use."
)


def _to_stored(values: np.ndarray, dtype: np.dtype, slope: float = 1.0, intercept: float = 0.0,
               lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Original units -> stored values: through slope/intercept, rounded and clipped for integer types."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo = info.min if lo is None else max(lo, info.min)
        hi = info.max if hi is None else min(hi, info.max)

    def stored(v):
        raw = (v.astype(np.float64) - intercept) / slope
        return np.clip(np.rint(raw), lo, hi) if dtype.kind in "iu" else raw

    return elementwise(stored, dtype, np.asarray(values))


def _write_nifti(meta: ImageMeta, array: np.ndarray, dest: Path) -> list[Path]:
    data = np.moveaxis(array, 0, -1) if meta.channel_last else array[0]
    slope, intercept = meta.slopes[0], meta.intercepts[0]
    raw = _to_stored(data, meta.dtype, slope, intercept)
    klass = nib.Nifti2Image if isinstance(meta.header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(raw, None, header=meta.header.copy())  # affine None: qform/sform and their codes kept as stored
    if (slope, intercept) != (1.0, 0.0):
        img.header.set_slope_inter(slope, intercept)  # the constructor resets them; store raw values as read
    with atomic_path(dest) as tmp:
        nib.save(img, str(tmp))
    return [dest]


_BINARY_VRS = ("OW", "OF", "OD", "OL", "OV", "UN")  # multi-byte binary values: endian-dependent


def _encode_dicom(ds: pydicom.Dataset, frames: np.ndarray, dtype: np.dtype, slope: float, intercept: float,
                  path: Path) -> None:
    """Store ``(frames, rows, cols, samples)`` values in original units as the dataset's uncompressed pixels."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_little_endian:
        other = [e.keyword or str(e.tag) for e in ds if e.VR in _BINARY_VRS and e.tag != 0x7FE00010]
        if other:
            raise ValueError(f"{path}: cannot convert big-endian DICOM with binary elements {other} to little endian.")
    if syntax.is_compressed or not syntax.is_little_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bits, signed = int(ds.BitsStored), np.dtype(dtype).kind == "i"
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    raw = _to_stored(frames, np.dtype(dtype).newbyteorder("<"), slope, intercept, lo, hi)
    spp = raw.shape[-1]
    raw = raw[..., 0] if spp == 1 else raw
    if raw.shape[0] == 1 and "NumberOfFrames" not in ds:
        raw = raw[0]
    number_of_frames = ds.get("NumberOfFrames")
    photometric = "RGB" if spp == 3 else ds.PhotometricInterpretation  # pydicom decodes YBR to RGB
    set_pixel_data(ds, raw, photometric, bits, generate_instance_uid=False)
    if number_of_frames is not None and "NumberOfFrames" not in ds:
        ds.NumberOfFrames = number_of_frames  # set_pixel_data drops NumberOfFrames = 1


def _mark_derived(ds: pydicom.Dataset, series_uid: str, description: str, uid_salt: str | None) -> None:
    original = ds.get("SOPInstanceUID")
    uid = generate_uid(entropy_srcs=["monai-salm", uid_salt, str(original)]) if uid_salt and original else generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesInstanceUID = series_uid
    image_type = ds.get("ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    ds.ImageType = ["DERIVED", *values[1:]] if values else ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = description[:1024]  # VR ST


def _write_dicom(meta: ImageMeta, array: np.ndarray, dest: Path, description: str, series_uid: str | None,
                 uid_salt: str | None) -> list[Path]:
    frames = array.transpose(3, 2, 1, 0) if array.ndim == 4 else array.transpose(2, 1, 0)[None]
    if meta.format == "dicom_series":
        targets = [(k, frames[k : k + 1], dest / f.name) for k, f in enumerate(meta.files)]
    else:
        targets = [(0, frames, dest)]
    series_uid = series_uid or generate_uid()
    encoded = []
    for k, values, out in targets:  # encode everything first: a bad slice fails before any file is written
        ds = copy.deepcopy(meta.datasets[k])
        _encode_dicom(ds, values, meta.dtype, meta.slopes[k], meta.intercepts[k], meta.files[k])
        _mark_derived(ds, series_uid, description, uid_salt)
        encoded.append((ds, out))
    for ds, out in encoded:
        with atomic_path(out) as tmp:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return [out for _, out in encoded]


def _write_pil(meta: ImageMeta, array: np.ndarray, dest: Path) -> list[Path]:
    values = array.transpose(2, 1, 0)  # (H, W, C)
    raw = _to_stored(values[..., 0] if values.shape[-1] == 1 else values, meta.dtype)
    im = PILImage.fromarray(raw)  # uint8 -> L / RGB, uint16 -> I;16
    fmt = meta.info.get("format") or meta.format.upper()
    kwargs = {k: meta.info[k] for k in ("dpi", "icc_profile") if k in meta.info}
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        text = PngInfo()
        for key, value in (meta.info.get("text") if isinstance(meta.info.get("text"), dict) else {}).items():
            text.add_text(key, str(value))
        kwargs["pnginfo"] = text
    else:  # JPEG is lossy: the change on disk is measured in the manifest
        kwargs.update(quality=100, subsampling=0)
        if "exif" in meta.info:
            kwargs["exif"] = meta.info["exif"]
    with atomic_path(dest) as tmp:
        im.save(tmp, format=fmt, **kwargs)
    return [dest]


def _write_itk(meta: ImageMeta, array: np.ndarray, dest: Path) -> list[Path]:
    raw = _to_stored(array[0], meta.dtype)
    out = itk.image_from_array(np.ascontiguousarray(raw.T))
    src = meta.itk_image
    out.SetSpacing(src.GetSpacing())
    out.SetOrigin(src.GetOrigin())
    out.SetDirection(src.GetDirection())
    out.SetMetaDataDictionary(src.GetMetaDataDictionary())
    with atomic_path(dest) as tmp:
        itk.imwrite(out, str(tmp))
    return [dest]


def write_image(meta: ImageMeta, array: np.ndarray, dest: str | os.PathLike, description: str = DEFAULT_DESCRIPTION,
                series_uid: str | None = None, uid_salt: str | None = None) -> list[Path]:
    """Write ``array`` (original units) in the format and with the metadata of ``meta``.

    NIfTI keeps the header (affine, qform/sform and codes, every field) and the on-disk dtype and scaling.
    DICOM keeps every tag except new SOPInstanceUID/MediaStorageSOPInstanceUID, one SeriesInstanceUID for the
    whole series, ImageType[0] = DERIVED and a DerivationDescription; pixels are stored in the original dtype
    and BitsStored through RescaleSlope/Intercept, uncompressed (Explicit VR Little Endian) when the original
    was compressed or big endian. PNG/JPEG keep mode and bit depth (JPEG is saved at quality 100, still
    lossy). NRRD/MHA keep dtype, spacing, origin, direction and the ITK metadata dictionary.

    Args:
        meta: from :func:`monai_salm.io.read_image`.
        array: ``meta.shape`` values in original units.
        dest: the destination file, or folder for a DICOM series (slices keep their file names).
        description: DICOM DerivationDescription.
        series_uid: DICOM SeriesInstanceUID for the written files (a new one when None).
        uid_salt: DICOM: derive each new SOPInstanceUID from this and the original one, so that writing the same
            release again gives the same files (a random new UID when None).

    Returns:
        the files written.

    Raises:
        ValueError: for a shape mismatch, non-finite values, or a format that cannot be written here.
    """
    array = np.asarray(array)
    dest = Path(dest)
    if tuple(array.shape) != tuple(meta.shape):
        raise ValueError(f"{meta.path}: array shape {tuple(array.shape)} does not match the image {tuple(meta.shape)}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{meta.path}: the array to write contains NaN or infinite values.")
    if meta.format == "nifti":
        return _write_nifti(meta, array, dest)
    if meta.format in ("dicom", "dicom_series"):
        return _write_dicom(meta, array, dest, description, series_uid, uid_salt)
    if meta.format in ("png", "jpeg"):
        return _write_pil(meta, array, dest)
    if meta.format == "itk":
        return _write_itk(meta, array, dest)
    if meta.format == "npz":
        raise ValueError(f"{meta.path}: write .npz datasets whole with monai_salm.data.save_npz (monai-salm protect).")
    raise ValueError(f"{meta.path}: cannot write format {meta.format!r}.")


class ProtectedCopyWriter:
    """Write protected copies of a dataset's images under an output root, mirroring the input layout.

    Example::

        records = load_dataset("dataset.json")
        writer = ProtectedCopyWriter("protected/", records)
        for record in records:
            image, meta = read_image(record)
            writer.write(record, meta, protect(image), original=image)   # original units in, original units out
        writer.write_manifest("protected/manifest.csv")

    To complete an interrupted run, open the same output root with ``resume=True`` and call
    :meth:`add_existing` instead of :meth:`write` for the records whose copy :meth:`is_written`; their manifest
    entries are measured on the files already there.

    Args:
        output_root: the folder to write into; created if missing.
        records: the dataset's records; their roots are the input folders.
        overwrite: allow a non-empty ``output_root`` (existing files at the same paths are replaced).
        description: DICOM DerivationDescription.
        uid_salt: the release identity mixed into the new DICOM UIDs: each new SeriesInstanceUID is derived from it
            and the original series UID (so files of one original series share one new series), each new
            SOPInstanceUID from it, the record's relative path and the original instance UID. The same salt gives the same UIDs, so a release
            written again, or by several processes, is byte-identical; a different salt gives other UIDs (random
            when None).
        resume: allow a non-empty ``output_root`` holding the copy of an interrupted run. The new
            SeriesInstanceUIDs already used by DICOM copies there are reused for the other files of the same
            original series, and leftover temporary files of the records written are removed.

    Raises:
        ValueError: when ``output_root`` is, lies inside, or contains an input folder, is a file, or is not empty
            (without ``overwrite`` or ``resume``).
    """

    def __init__(self, output_root: str | os.PathLike, records: list[ImageRecord], overwrite: bool = False,
                 description: str = DEFAULT_DESCRIPTION, uid_salt: str | None = None, resume: bool = False):
        self.output_root = Path(output_root)
        for root in dict.fromkeys(Path(r.root) for r in records):
            self._check_root(root)
        if self.output_root.exists():
            if not self.output_root.is_dir():
                raise ValueError(f"{self.output_root}: output path exists and is not a folder.")
            if not (overwrite or resume) and any(self.output_root.iterdir()):
                raise ValueError(f"{self.output_root}: output folder is not empty; pass overwrite=True to use it "
                                 "(or resume=True to complete an interrupted run).")
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.description = description
        self.uid_salt = uid_salt or secrets.token_hex(16)
        self.resume = bool(resume)
        self.entries: list[ManifestEntry] = []
        #: files this writer created (they did not exist before), and existing files it replaced
        self.created: list[Path] = []
        self.replaced: list[Path] = []
        self._series_uids: dict[str, str] = {}  # original SeriesInstanceUID -> new one
        if self.resume:
            self._adopt_series_uids(records)

    def _check_root(self, root: Path) -> None:
        if is_within(self.output_root, root):
            raise ValueError(f"{self.output_root}: output folder lies inside the input folder {root}; "
                             "choose a folder outside it.")
        if is_within(root, self.output_root):
            raise ValueError(f"{self.output_root}: output folder contains the input folder {root}.")

    def output_path(self, record: ImageRecord) -> Path:
        """Where ``record`` is written: ``output_root / record.relpath``.

        Raises:
            ValueError: when the record lies outside its dataset root.
        """
        return self.output_root / record.relpath

    def output_files(self, record: ImageRecord) -> list[Path]:
        """The files written for ``record``: :meth:`output_path`, or one file per slice inside it for a DICOM series
        (the slices keep their file names).

        Raises:
            ValueError: when the record lies outside its dataset root.
        """
        dest = self.output_path(record)
        if record.format == "dicom_series":
            return [dest / p.name for p in sorted(Path(record.path).iterdir()) if not p.name.startswith(".")]
        return [dest]

    def is_written(self, record: ImageRecord) -> bool:
        """Whether every file of ``record``'s copy exists (files are renamed into place complete, never partial)."""
        return all(p.is_file() for p in self.output_files(record))

    def _adopt_series_uids(self, records: list[ImageRecord]) -> None:
        """Reuse the new SeriesInstanceUIDs of DICOM copies already in the output root (resume)."""
        for record in records:
            if record.format not in ("dicom", "dicom_series"):
                continue
            try:
                files = self.output_files(record)
                done = [p for p in files if p.is_file()]
                if not done:
                    continue
                source = Path(record.path) / files[0].name if record.format == "dicom_series" else record.path
                original = pydicom.dcmread(source, stop_before_pixels=True).get("SeriesInstanceUID")
                new = pydicom.dcmread(done[0], stop_before_pixels=True).get("SeriesInstanceUID")
            except Exception:  # noqa: BLE001 - an unreadable file is reported when it is written or read back
                continue
            if original and new:
                self._series_uids.setdefault(str(original), str(new))

    def _series_uid(self, meta: ImageMeta) -> str | None:
        if not meta.datasets or "SeriesInstanceUID" not in meta.datasets[0]:
            return None
        original = str(meta.datasets[0].SeriesInstanceUID)
        if original not in self._series_uids:
            self._series_uids[original] = generate_uid(entropy_srcs=["monai-salm", self.uid_salt, original])
        return self._series_uids[original]

    @staticmethod
    def _remove_temporaries(files: list[Path]) -> None:
        """Remove temporary files that an interrupted :func:`~monai_salm.io.atomic_path` left beside ``files``."""
        for out in files:
            pattern = glob.escape(f".{out.name}.") + "*" + glob.escape(".tmp" + full_suffix(out))
            for tmp in out.parent.glob(pattern):
                tmp.unlink(missing_ok=True)

    def write(self, record: ImageRecord, meta: ImageMeta, array: np.ndarray, original: np.ndarray | None = None
              ) -> list[ManifestEntry]:
        """Write one protected image and record it in :attr:`entries`.

        The change is measured by reading the written file back, so it reflects rounding and clipping.

        Args:
            record: the record the image was read from.
            meta: its metadata from :func:`monai_salm.io.read_image`.
            array: the protected image in original units, ``meta.shape``.
            original: the clean image in original units (read again from ``record`` when None).

        Returns:
            one manifest entry per file written (one per slice for a DICOM series).

        Raises:
            ValueError: see :func:`write_image`; also for ``.npz`` records and records outside their root.
        """
        if record.format == "npz":
            raise ValueError(f"{record.path}: write .npz datasets whole with monai_salm.data.save_npz.")
        self._check_root(Path(record.root))
        dest = self.output_path(record)
        targets = self.output_files(record)
        if self.resume:
            self._remove_temporaries(targets)
        existed = {p for p in targets if p.exists()}
        written: list[Path] = []
        try:
            # the relative path keeps instance UIDs unique when one original file is in the dataset twice
            written = write_image(meta, array, dest, self.description, self._series_uid(meta),
                                  f"{self.uid_salt}|{Path(record.relpath).as_posix()}")
        finally:  # also the slices of a series written before a failure
            self.created += [p for p in targets if p not in existed and p.exists()]
        self.replaced += [p for p in written if p in existed]
        return self._add_entries(record, meta, written, original)

    def add_existing(self, record: ImageRecord, meta: ImageMeta | None = None, original: np.ndarray | None = None
                     ) -> list[ManifestEntry]:
        """Record the copy of ``record`` already in the output root in :attr:`entries`, without writing it.

        The entries are measured exactly as :meth:`write` measures a file it wrote: the file on disk is read back
        and compared with the input (for ``resume``, where an earlier run wrote it).

        Args:
            record: the record whose copy exists (see :meth:`is_written`).
            meta, original: the input's metadata and clean values in original units (read from ``record`` when
                None).

        Returns:
            one manifest entry per file (one per slice for a DICOM series).

        Raises:
            ValueError: for a missing or unreadable copy, or one that does not match the input's shape.
        """
        self._check_root(Path(record.root))
        if meta is None or original is None:
            original, meta = read_image(record)
        dest = self.output_path(record)
        files = [dest / f.name for f in meta.files] if meta.format == "dicom_series" else [dest]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"{record.path}: its copy is incomplete, missing {', '.join(missing)}.")
        if self.resume:
            self._remove_temporaries(files)
        return self._add_entries(record, meta, files, original)

    def _add_entries(self, record: ImageRecord, meta: ImageMeta, written: list[Path], original: np.ndarray | None
                     ) -> list[ManifestEntry]:
        """Manifest entries of ``record``'s copy (``written``), measured on the files as stored."""
        dest = self.output_path(record)
        before = read_image(record)[0] if original is None else np.asarray(original, dtype=np.float32)
        after = read_image(dest)[0]
        if after.shape != before.shape:
            raise ValueError(f"{dest}: the copy has shape {tuple(after.shape)} but its input {record.path} has "
                             f"{tuple(before.shape)}.")
        diff = elementwise(lambda a, b: np.abs(a.astype(np.float64) - b.astype(np.float64)), np.float32, after, before)
        if meta.format == "dicom_series":
            parts = [(meta.files[k], diff[..., k]) for k in range(len(written))]
        else:
            parts = [(record.path, diff)]
        entries = [
            ManifestEntry(str(src), str(out), sha256_file(out), int((d > 0).any(axis=0).sum()),
                          float(d.max()) if d.size else 0.0, record.label, record.format)
            for (src, d), out in zip(parts, written)
        ]
        self.entries.extend(entries)
        return entries

    def write_manifest(self, path: str | os.PathLike | None = None) -> Path:
        """Write :attr:`entries` with :func:`monai_salm.io.write_manifest` (default ``output_root/manifest.csv``)."""
        return write_manifest(self.entries, path or self.output_root / "manifest.csv")
