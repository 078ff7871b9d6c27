"""Datasets of medical image files and reading them with the metadata needed to write them back.

Sources (:func:`load_dataset`): a MONAI datalist JSON, a folder with one subfolder per class, or a MedMNIST
``.npz``. Files (:func:`read_image`): NIfTI (nibabel), DICOM files and series folders (pydicom), PNG/JPEG
(Pillow), NRRD/MHA (ITK). Arrays come back as float32 ``(C, *spatial)`` in original units (Hounsfield units,
raw MR values, 0-255 grey) with spatial axes in MONAI's order, so they match
``monai.transforms.LoadImage(ensure_channel_first=True)``: NIfTI as stored, ``(x, y[, z])`` = (columns, rows[,
slices]) for DICOM, PNG/JPEG and ITK images. MedMNIST arrays keep their own ``(C, H, W)`` / ``(1, D, H, W)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from monai.data import load_decathlon_datalist
from monai.utils import optional_import

from monai_salm.data.medmnist import is_rgb, load_npz
from monai_salm.io.utils import c_order_copy, elementwise, full_suffix

PILImage, has_pil = optional_import("PIL.Image")
itk, has_itk = optional_import("itk")

__all__ = ["FORMATS", "ImageRecord", "ImageMeta", "detect_format", "load_dataset", "read_image", "probe_image"]

#: File suffix -> format name. A folder is a DICOM series (``"dicom_series"``); a file without a known suffix
#: is accepted when it carries the DICOM preamble.
FORMATS: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".nrrd": "itk",
    ".mha": "itk",
    ".npz": "npz",
}

#: PIL modes read and written, with their bit depth and stored dtype.
_PIL_MODES: dict[str, tuple[int, type]] = {
    "L": (8, np.uint8),
    "RGB": (8, np.uint8),
    "I;16": (16, np.uint16),
    "I;16B": (16, np.uint16),
    "I": (16, np.uint16),  # 16-bit PNG opened as 32-bit int by some Pillow versions
}

_SPLIT_ALIASES = {"training": "train", "validation": "val", "test": "test", "train": "train", "val": "val"}


@dataclass(frozen=True)
class ImageRecord:
    """One sample of a dataset: where its image is, its class, and where it sits in the dataset's layout.

    Attributes:
        path: the image file, the DICOM series folder, or the ``.npz``.
        label: class index.
        format: ``"nifti"``, ``"dicom"``, ``"dicom_series"``, ``"png"``, ``"jpeg"``, ``"itk"`` or ``"npz"``.
        root: the dataset root (datalist folder, class-folder root, ``.npz`` folder); outputs mirror
            ``path`` relative to it.
        split: datalist key (``"training"``, ``"validation"``), ``"training"`` for class folders, or the
            ``.npz`` split (``"train"``, ``"val"``, ``"test"``).
        class_name: the class folder's name (class folders only).
        index: the sample's index inside the ``.npz`` split (``.npz`` only).
        spatial_dims: 2 or 3 once probed.
    """

    path: Path
    label: int
    format: str
    root: Path
    split: str = "training"
    class_name: str | None = None
    index: int | None = None
    spatial_dims: int | None = None

    @property
    def relpath(self) -> Path:
        """``path`` relative to ``root``.

        Raises:
            ValueError: when the image lies outside the dataset root (its layout cannot be mirrored).
        """
        try:
            return self.path.resolve().relative_to(self.root.resolve())
        except ValueError:
            msg = f"{self.path}: lies outside the dataset root {self.root}; cannot mirror its layout."
            raise ValueError(msg) from None

    def to_dict(self) -> dict[str, Any]:
        """MONAI-style ``{"image": path, "label": label}`` for ``LoadImaged`` pipelines."""
        return {"image": str(self.path), "label": self.label}


@dataclass
class ImageMeta:
    """Everything needed to write an image back in its original format.

    Attributes:
        format: see :class:`ImageRecord`.
        path: the file or series folder read.
        dtype: the stored (on-disk) dtype of the pixel values.
        shape: the channel-first shape of the array that was read.
        affine: NIfTI affine.
        header: NIfTI: the nibabel header (qform/sform, codes, every field).
        channel_last: NIfTI: the file is 4D with channels on the last axis.
        datasets: DICOM: the pydicom datasets (all tags, pixel data included), in slice order.
        files: DICOM: the file of each dataset.
        slopes, intercepts: per dataset, ``value = stored * slope + intercept`` (DICOM RescaleSlope/Intercept,
            NIfTI scl_slope/scl_inter; 1/0 when absent).
        mode, bit_depth: PNG/JPEG: PIL mode (``L``, ``I;16``, ``RGB``) and bits per sample.
        info: PNG/JPEG: PIL ``info`` (dpi, text, ICC profile) and ``format``; ``.npz``: split and index.
        itk_image: ITK: the image read (spacing, origin, direction, metadata dictionary).
    """

    format: str
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    affine: np.ndarray | None = None
    header: Any = None
    channel_last: bool = False
    datasets: list = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    slopes: list[float] = field(default_factory=lambda: [1.0])
    intercepts: list[float] = field(default_factory=lambda: [0.0])
    mode: str | None = None
    bit_depth: int | None = None
    info: dict = field(default_factory=dict)
    itk_image: Any = None

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.shape) - 1


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def detect_format(path: str | os.PathLike) -> str:
    """Format name of a file or DICOM series folder, from its suffix (or DICOM preamble).

    Raises:
        ValueError: for a missing path or an unsupported file type.
    """
    path = Path(path)
    if path.is_dir():
        return "dicom_series"
    if not path.is_file():
        raise ValueError(f"{path}: file not found.")
    fmt = FORMATS.get(full_suffix(path))
    if fmt is None and _has_dicom_preamble(path):
        fmt = "dicom"
    if fmt is None:
        supported = ", ".join(sorted(FORMATS))
        raise ValueError(f"{path}: unsupported file type (supported: {supported}, DICOM series folders).")
    return fmt


# ----------------------------------------------------------------------------------------------- datasets


def _as_label(value: Any, where: str) -> int:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{where}: label must be a non-negative integer class index, got {value!r}.")
    return int(value)


def _from_datalist(path: Path, splits: tuple[str, ...]) -> list[ImageRecord]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON datalist ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a datalist must be a JSON object with keys like 'training'.")
    present = [s for s in splits if s in data]
    if not present:
        raise ValueError(f"{path}: none of the datalist keys {list(splits)} found (found: {sorted(data)}).")
    records, seen = [], {}
    for split in present:
        if not isinstance(data[split], list):
            raise ValueError(f"{path}: '{split}' must be a list of entries.")
        for i, entry in enumerate(data[split]):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ValueError(f"{path}: '{split}' entry {i} must be an object with an 'image' path, got {entry!r}.")
        if not data[split]:
            continue
        entries = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=path.parent)
        for i, entry in enumerate(entries):
            where = f"{path}: '{split}' entry {i} ({entry['image']})"
            if "label" not in entry:
                raise ValueError(f"{where} has no 'label'.")
            image = Path(entry["image"])
            if not image.exists():
                raise ValueError(f"{where}: image not found.")
            label = _as_label(entry["label"], where)
            key = image.resolve()
            if key in seen:
                raise ValueError(f"{where}: listed twice (also as {seen[key]}); each image must appear once.")
            seen[key] = f"'{split}' entry {i} with label {label}"
            records.append(ImageRecord(image, label, detect_format(image), path.parent, split=split))
    return records


def _from_class_folders(root: Path) -> list[ImageRecord]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected one subfolder per class).")
    for item in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        if FORMATS.get(full_suffix(item)) not in (None, "npz"):  # an image here would silently get no class
            raise ValueError(f"{item}: an image at the top level of a class-folder dataset has no class; move it "
                             "into the subfolder of its class.")
    records = []
    for label, folder in enumerate(classes):
        items = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if not items:
            raise ValueError(f"{folder}: empty class folder (class {label}, '{folder.name}').")
        for item in items:
            fmt = detect_format(item)
            if fmt == "npz":
                raise ValueError(f"{item}: .npz files cannot sit inside a class folder; load the .npz directly.")
            records.append(ImageRecord(item, label, fmt, root, class_name=folder.name))
    return records


def _from_npz(path: Path, splits: tuple[str, ...]) -> list[ImageRecord]:
    arrays = load_npz(path, require=())
    wanted = dict.fromkeys(_SPLIT_ALIASES.get(s, s) for s in splits)
    present = [s for s in wanted if f"{s}_images" in arrays]
    if not present:
        raise ValueError(f"{path}: none of the splits {list(wanted)} found (found: {sorted(arrays)}).")
    records = []
    for split in present:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        dims = 2 if images.ndim == 3 or is_rgb(images) else 3
        records += [
            ImageRecord(path, int(labels[i]), "npz", path.parent, split=split, index=i, spatial_dims=dims)
            for i in range(images.shape[0])
        ]
    return records


def load_dataset(
    source: str | os.PathLike,
    splits: tuple[str, ...] = ("training", "validation"),
    check: bool = True,
) -> list[ImageRecord]:
    """List the labelled images of a dataset.

    Args:
        source: one of

            - a MONAI datalist ``.json``: ``{"training": [{"image": path, "label": int}], "validation": [...]}``,
              paths relative to the JSON's folder (a path to a folder is a DICOM series);
            - a folder with one subfolder per class (class index = position in the sorted subfolder names); each
              image file in a class folder is one sample, each subfolder of DICOM files one series volume;
              hidden entries (``.name``) are ignored;
            - a MedMNIST ``.npz`` (read with :func:`monai_salm.data.load_npz`).
        splits: datalist keys (or ``.npz`` splits; ``training``/``validation`` mean ``train``/``val``) to
            list; missing ones are skipped, but at least one must exist. Ignored for class folders.
        check: read every header (not the pixels) to fail early on unreadable files and mixed 2D/3D data,
            and fill :attr:`ImageRecord.spatial_dims`.

    Returns:
        the records, in datalist order / sorted class and file order / ``.npz`` order.

    Raises:
        ValueError: naming the file and the problem: missing source, unsupported or unreadable file, missing
            or invalid label, missing image, empty class folder, mixed 2D and 3D images.
    """
    source = Path(source)
    if source.is_dir():
        records = _from_class_folders(source)
    elif not source.is_file():
        raise ValueError(f"{source}: not found.")
    elif full_suffix(source) == ".json":
        records = _from_datalist(source, tuple(splits))
    elif full_suffix(source) == ".npz":
        records = _from_npz(source, tuple(splits))
    else:
        raise ValueError(f"{source}: expected a datalist .json, a class folder or a MedMNIST .npz.")
    if check:
        records = [r if r.spatial_dims else _with_dims(r, probe_image(r)) for r in records]
        by_dims: dict[int, ImageRecord] = {}
        for r in records:
            by_dims.setdefault(r.spatial_dims, r)
        if len(by_dims) > 1:
            raise ValueError(
                f"mixed 2D and 3D inputs: {by_dims[2].path} is 2D but {by_dims[3].path} is 3D; "
                "use one kind per dataset."
            )
    return records


def _with_dims(record: ImageRecord, dims: int) -> ImageRecord:
    return replace(record, spatial_dims=dims)


# ----------------------------------------------------------------------------------------------- DICOM


def _dcmread(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise ValueError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}).") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError(f"{path}: DICOM file holds no image (no Rows/Columns).")
    return ds


def _num_frames(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _slice_key(ds: pydicom.Dataset) -> tuple:
    """Position along the slice normal when known, else InstanceNumber."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return (0, float(np.dot(normal, np.asarray(ipp, float))), int(ds.get("InstanceNumber", 0) or 0))
    return (1, int(ds.get("InstanceNumber", 0) or 0), 0)


def _series(folder: Path, stop_before_pixels: bool) -> tuple[list[Path], list[pydicom.Dataset]]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise ValueError(f"{folder}: empty DICOM series folder.")
    if any(p.is_dir() for p in entries):
        raise ValueError(f"{folder}: a DICOM series folder must hold files only, found subfolder "
                         f"{next(p for p in entries if p.is_dir()).name}.")
    datasets = [_dcmread(p, stop_before_pixels) for p in entries]
    first = datasets[0]
    for p, ds in zip(entries, datasets):
        if _num_frames(ds) != 1:
            raise ValueError(f"{p}: multi-frame file inside the series folder {folder}.")
        for key in ("Rows", "Columns", "SamplesPerPixel", "SeriesInstanceUID"):
            if ds.get(key) != first.get(key):
                raise ValueError(f"{p}: {key} {ds.get(key)} differs from {entries[0].name} ({first.get(key)}) "
                                 f"in the series folder {folder}.")
    order = sorted(range(len(entries)), key=lambda i: _slice_key(datasets[i]))
    return [entries[i] for i in order], [datasets[i] for i in order]


def _dicom_frames(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, np.dtype, float, float]:
    """``(frames, rows, cols, samples)`` in original units, the stored dtype, slope and intercept."""
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no (uncompressed 8/16-bit) PixelData.")
    try:
        stored = ds.pixel_array
    except Exception as e:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise ValueError(f"{path}: cannot decode DICOM pixel data ({getattr(syntax, 'name', syntax)}): {e}") from None
    spp = int(ds.get("SamplesPerPixel", 1))
    stored = stored.reshape(_num_frames(ds), int(ds.Rows), int(ds.Columns), spp)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    values = elementwise(lambda v: v.astype(np.float64) * slope + intercept, np.float32, stored)
    dtype = stored.dtype.newbyteorder("=")
    del ds.PixelData  # decoded: the dataset stays as the copy's header template, without its pixel bytes and cache
    return values, dtype, slope, intercept


def _read_dicom(path: Path, record: ImageRecord | None) -> tuple[np.ndarray, ImageMeta]:
    ds = _dcmread(path)
    frames, dtype, slope, intercept = _dicom_frames(ds, path)
    array = frames.transpose(3, 2, 1, 0)  # (C, cols, rows, frames)
    if _num_frames(ds) == 1:
        array = array[..., 0]
    meta = ImageMeta("dicom", path, dtype, array.shape, datasets=[ds], files=[path], slopes=[slope],
                     intercepts=[intercept])
    return np.ascontiguousarray(array), meta


def _read_dicom_series(folder: Path, record: ImageRecord | None) -> tuple[np.ndarray, ImageMeta]:
    files, datasets = _series(folder, stop_before_pixels=False)
    array, slopes, intercepts, dtypes = None, [], [], set()
    for k, (p, ds) in enumerate(zip(files, datasets)):
        frames, dtype, slope, intercept = _dicom_frames(ds, p)
        if array is None:  # filled slice by slice: no list of slices next to the volume
            array = np.empty((frames.shape[3], frames.shape[2], frames.shape[1], len(files)), dtype=np.float32)
        array[..., k] = frames[0].transpose(2, 1, 0)  # (C, cols, rows)
        slopes.append(slope)
        intercepts.append(intercept)
        dtypes.add(dtype)
    if len(dtypes) > 1:
        raise ValueError(f"{folder}: slices store different pixel types {sorted(map(str, dtypes))}.")
    meta = ImageMeta("dicom_series", folder, dtypes.pop(), array.shape, datasets=datasets, files=files,
                     slopes=slopes, intercepts=intercepts)
    return array, meta


# ----------------------------------------------------------------------------------------------- others


def _read_nifti(path: Path, record: ImageRecord | None) -> tuple[np.ndarray, ImageMeta]:
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise ValueError(f"{path}: not a single-file NIfTI image ({type(img).__name__}).")
    if img.ndim not in (2, 3, 4):
        raise ValueError(f"{path}: NIfTI images must be 2D, 3D or 4D (channels last), got shape {img.shape}.")
    # one copy: stored type (Fortran order on disk) -> C-ordered float32
    data = c_order_copy(np.asanyarray(img.dataobj), np.float32)
    array = np.moveaxis(data, -1, 0) if img.ndim == 4 else data[None]
    meta = ImageMeta("nifti", path, img.get_data_dtype(), array.shape, affine=img.affine.copy(),
                     header=img.header.copy(), channel_last=img.ndim == 4,
                     slopes=[float(img.dataobj.slope)], intercepts=[float(img.dataobj.inter)])
    return np.ascontiguousarray(array), meta


def _read_pil(path: Path, record: ImageRecord | None) -> tuple[np.ndarray, ImageMeta]:
    with PILImage.open(path) as im:
        im.load()
        mode, info, fmt = im.mode, dict(im.info), im.format
        if mode not in _PIL_MODES:
            raise ValueError(f"{path}: unsupported image mode {mode!r} (supported: {', '.join(_PIL_MODES)}).")
        stored = np.asarray(im)
    bit_depth, dtype = _PIL_MODES[mode]
    if mode == "I" and (stored.min() < 0 or stored.max() > 65535):
        raise ValueError(f"{path}: 32-bit integer images are not supported (values outside 0-65535).")
    stored = stored.astype(dtype, copy=False)
    array = (stored[..., None] if stored.ndim == 2 else stored).transpose(2, 1, 0).astype(np.float32)
    meta = ImageMeta(fmt.lower() if fmt else "png", path, np.dtype(dtype), array.shape, mode=mode,
                     bit_depth=bit_depth, info={**info, "format": fmt})
    return np.ascontiguousarray(array), meta


def _read_itk(path: Path, record: ImageRecord | None) -> tuple[np.ndarray, ImageMeta]:
    img = itk.imread(str(path))
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: only scalar (single-component) ITK images are supported.")
    if img.GetImageDimension() not in (2, 3):
        raise ValueError(f"{path}: only 2D and 3D ITK images are supported, got {img.GetImageDimension()}D.")
    stored = itk.array_from_image(img)  # (z, y, x)
    array = stored.T[None].astype(np.float32)  # (1, x, y, z)
    return np.ascontiguousarray(array), ImageMeta("itk", path, stored.dtype, array.shape, itk_image=img)


@lru_cache(maxsize=2)
def _npz_cached(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    return load_npz(path, require=())


def _read_npz(path: Path, record: ImageRecord | None) -> tuple[np.ndarray, ImageMeta]:
    if record is None or record.index is None:
        raise ValueError(f"{path}: an .npz holds many images; list them with load_dataset() and read a record.")
    images = _npz_cached(str(path), path.stat().st_mtime_ns)[f"{record.split}_images"]
    image = images[record.index]
    if is_rgb(images):
        array = image.transpose(2, 0, 1)
    else:
        array = image[None]
    meta = ImageMeta("npz", path, image.dtype, array.shape, info={"split": record.split, "index": record.index})
    return array.astype(np.float32), meta


_READERS = {
    "nifti": _read_nifti,
    "dicom": _read_dicom,
    "dicom_series": _read_dicom_series,
    "png": _read_pil,
    "jpeg": _read_pil,
    "itk": _read_itk,
    "npz": _read_npz,
}


@contextmanager
def _errors_name_file(path: Path, what: str) -> Iterator[None]:
    """Turn a reader library's exception into a ``ValueError`` naming the file (ours and missing extras pass)."""
    try:
        yield
    except ValueError:
        raise
    except Exception as e:
        if type(e).__name__ == "OptionalImportError":
            raise
        raise ValueError(f"{path}: cannot read {what} ({type(e).__name__}: {e}).") from None


def read_image(source: ImageRecord | str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read one image in original units with the metadata needed to write it back.

    Args:
        source: a record from :func:`load_dataset`, or the path of a file / DICOM series folder.

    Returns:
        ``(array, meta)``: float32 ``(C, *spatial)`` in original units (see the module docstring for the axis
        order) and an :class:`ImageMeta`.

    Raises:
        ValueError: naming the file for a missing, unsupported, unreadable or corrupt image.
        OptionalImportError: when Pillow (PNG/JPEG) or ITK (NRRD/MHA) is not installed.
    """
    if isinstance(source, ImageRecord):
        path, fmt, record = Path(source.path), source.format, source
    else:
        path, record = Path(source), None
        fmt = detect_format(path)
    with _errors_name_file(path, f"{fmt} image"):
        return _READERS[fmt](path, record)


def probe_image(source: ImageRecord | str | os.PathLike) -> int:
    """Number of spatial dimensions of an image, from its header only (checks that the file is readable).

    Args:
        source: a record or the path of a file / DICOM series folder.

    Returns:
        2 or 3.

    Raises:
        ValueError: naming the file for an unreadable header or an unsupported layout.
    """
    if isinstance(source, ImageRecord):
        path, fmt = Path(source.path), source.format
        if source.spatial_dims:
            return source.spatial_dims
    else:
        path = Path(source)
        fmt = detect_format(path)
    with _errors_name_file(path, f"{fmt} header"):
        if fmt == "dicom":
            return 3 if _num_frames(_dcmread(path, stop_before_pixels=True)) > 1 else 2
        if fmt == "dicom_series":
            _series(path, stop_before_pixels=True)
            return 3
        if fmt == "nifti":
            img = nib.load(str(path))
            if not isinstance(img, nib.Nifti1Image) or img.ndim not in (2, 3, 4):
                raise ValueError(f"{path}: expected a 2D, 3D or 4D (channels last) single-file NIfTI image.")
            return min(img.ndim, 3)
        if fmt in ("png", "jpeg"):
            with PILImage.open(path) as im:
                if im.mode not in _PIL_MODES:
                    raise ValueError(f"{path}: unsupported image mode {im.mode!r} ({', '.join(_PIL_MODES)} supported).")
            return 2
        if fmt == "itk":
            io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
            if io is None:
                raise ValueError(f"{path}: ITK cannot read this file.")
            io.SetFileName(str(path))
            io.ReadImageInformation()
            if io.GetNumberOfDimensions() not in (2, 3) or io.GetNumberOfComponents() != 1:
                raise ValueError(f"{path}: only scalar 2D and 3D ITK images are supported.")
            return int(io.GetNumberOfDimensions())
        if fmt == "npz":
            return read_image(source)[1].spatial_dims
    raise ValueError(f"{path}: unknown format {fmt!r}.")
