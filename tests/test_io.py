"""Medical file I/O: datasets, readers, intensity scaling, writers that keep metadata, manifest, errors."""

import copy
import json
import os
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from monai.utils import optional_import
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from monai_salm.io import (
    DEFAULT_DESCRIPTION,
    IntensityScaling,
    ProtectedCopyWriter,
    atomic_path,
    load_dataset,
    read_image,
    read_manifest,
    sha256_file,
    write_image,
)
from conftest import make_medmnist

PIL, has_pil = optional_import("PIL.Image")
needs_pil = pytest.mark.skipif(not has_pil, reason="Pillow is not installed (PNG/JPEG support is optional)")

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
MR_RLE = get_testdata_file("MR_small_RLE.dcm")
MR_BIG = get_testdata_file("MR_small_bigendian.dcm")
ANATOMICAL = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")

#: tags a protected DICOM copy may change (PixelData changes because the values do)
DERIVED_TAGS = {"SOPInstanceUID", "SeriesInstanceUID", "ImageType", "DerivationDescription", "PixelData"}


def monai_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(LoadImage(image_only=True, ensure_channel_first=True, **kwargs)(str(path)))


def perturb(array, step, every=7):
    """A deterministic +-step change at every ``every``-th voxel (the rest unchanged)."""
    delta = np.zeros_like(array)
    flat = delta.reshape(-1)
    flat[::every] = step
    flat[every // 2 :: 2 * every] = -step
    return array + delta


def changed_tags(a, b):
    tags = {e.tag for e in a} | {e.tag for e in b}
    return {
        pydicom.datadict.keyword_for_tag(t) or str(t)
        for t in tags
        if t not in a or t not in b or a[t].value != b[t].value
    }


def make_series(folder, n=3, slope=2.0, intercept=-1024.0):
    """A 3-slice CT series from CT_small, file names out of slice order, RescaleSlope 2 / Intercept -1024."""
    folder.mkdir(parents=True)
    base = pydicom.dcmread(CT)
    series_uid, z0 = generate_uid(), float(base.ImagePositionPatient[2])
    names = ["c.dcm", "a.dcm", "b.dcm"][:n]
    for k, name in enumerate(names):
        ds = copy.deepcopy(base)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.ImagePositionPatient = [*base.ImagePositionPatient[:2], z0 + 5.0 * k]
        ds.InstanceNumber = k + 1
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PixelData = (base.pixel_array + 10 * k).astype(np.int16).tobytes()
        ds.save_as(folder / name)
    return folder, names


# ----------------------------------------------------------------------------------------------- scaling


def test_intensity_scaling_window_range_percentile():
    window = IntensityScaling("window", lo=-1000, hi=1000)
    assert window.epsilon_in_units(8 / 255) == pytest.approx(8 / 255 * 2000)
    hu = np.array([-1000.0, 0.0, 400.0, 1000.0])
    np.testing.assert_allclose(window.to_unit(hu), [0.0, 0.5, 0.7, 1.0])
    np.testing.assert_allclose(window.from_unit(window.to_unit(hu)), hu, atol=1e-3)
    # values outside the window are clipped by to_unit but kept by apply_delta
    bone = np.array([3000.0, -1024.0, 0.0])
    unit = window.to_unit(bone)
    np.testing.assert_allclose(window.apply_delta(bone, unit, unit + [0, 0, 0.01]), [3000.0, -1024.0, 20.0], atol=1e-3)

    eight_bit = IntensityScaling.from_dict(json.loads(json.dumps({"kind": "range", "lo": 0, "hi": 255})))
    assert eight_bit.epsilon_in_units(20 / 255) == pytest.approx(20.0)

    pct = IntensityScaling("percentile", lower=1, upper=99)
    with pytest.raises(ValueError, match="not fitted"):
        pct.to_unit(hu)
    fitted = pct.fit([np.arange(101.0), np.arange(101.0)])
    assert (fitted.lo, fitted.hi, fitted.kind) == (1.0, 99.0, "percentile")
    assert IntensityScaling.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted
    with pytest.raises(ValueError):
        IntensityScaling("window", lo=5, hi=5)
    with pytest.raises(ValueError):
        IntensityScaling("gamma", lo=0, hi=1)


# ----------------------------------------------------------------------------------------------- NIfTI


def test_nifti_round_trip_keeps_header(tmp_path):
    image, meta = read_image(ANATOMICAL)
    assert image.shape == (1, 33, 41, 25) and image.dtype == np.float32
    np.testing.assert_array_equal(image, monai_load(ANATOMICAL))
    protected = perturb(image, 3.0)
    write_image(meta, protected, tmp_path / "out.nii")
    src, out = nib.load(ANATOMICAL), nib.load(tmp_path / "out.nii")
    np.testing.assert_array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == src.get_data_dtype()
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (2, 2)
    assert out.header.binaryblock == src.header.binaryblock
    np.testing.assert_array_equal(read_image(tmp_path / "out.nii")[0], protected)
    assert monai_load(tmp_path / "out.nii").shape == (1, 33, 41, 25)


def test_nifti_scaled_gz_keeps_slope_codes_dtype(tmp_path):
    qform = np.diag([1.5, 2.0, 3.0, 1.0])
    qform[:3, 3] = [1, 2, 3]
    sform = qform.copy()
    sform[0, 3] = 9
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), sform)
    img.set_qform(qform, 1)
    img.set_sform(sform, 4)
    img.header.set_slope_inter(2.0, -1024.0)
    img.header["descrip"] = b"test scan"
    nib.save(img, tmp_path / "in.nii.gz")

    image, meta = read_image(tmp_path / "in.nii.gz")
    assert image.min() == -1024.0 and meta.slopes == [2.0] and meta.intercepts == [-1024.0]
    protected = perturb(image, 6.0)
    write_image(meta, protected, tmp_path / "out.nii.gz")
    src, out = nib.load(tmp_path / "in.nii.gz"), nib.load(tmp_path / "out.nii.gz")
    assert out.header.binaryblock == src.header.binaryblock  # codes, affines, descrip, dtype
    assert (out.dataobj.slope, out.dataobj.inter) == (2.0, -1024.0)
    np.testing.assert_array_equal(out.get_qform(), qform)
    np.testing.assert_array_equal(out.get_sform(), sform)
    np.testing.assert_allclose(read_image(tmp_path / "out.nii.gz")[0], protected, atol=1.0)  # slope / 2


# ----------------------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize(
    "source", [CT, MR, MR_RLE, MR_BIG], ids=["CT_small", "MR_small", "MR_small_RLE", "MR_small_bigendian"]
)
def test_dicom_file_round_trip(tmp_path, source):
    image, meta = read_image(source)
    ds = pydicom.dcmread(source)
    assert image.shape == (1, ds.Columns, ds.Rows)
    np.testing.assert_array_equal(image, monai_load(source, reader="PydicomReader"))
    protected = perturb(image, 20.0)
    write_image(meta, protected, tmp_path / "out.dcm", series_uid="1.2.3.4")
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert changed_tags(ds, out) <= DERIVED_TAGS
    assert out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SeriesInstanceUID == "1.2.3.4" and out.ImageType[0] == "DERIVED"
    assert list(out.ImageType[1:]) == list(ds.ImageType[1:])
    assert out.DerivationDescription == DEFAULT_DESCRIPTION
    assert out.pixel_array.dtype == ds.pixel_array.dtype.newbyteorder("=") == meta.dtype
    assert (out.BitsStored, out.PixelRepresentation) == (ds.BitsStored, ds.PixelRepresentation)
    if ds.file_meta.TransferSyntaxUID.is_compressed or not ds.file_meta.TransferSyntaxUID.is_little_endian:
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    else:
        assert out.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    meta_changes = changed_tags(ds.file_meta, out.file_meta)
    assert meta_changes <= {"MediaStorageSOPInstanceUID", "TransferSyntaxUID", "FileMetaInformationGroupLength"}
    np.testing.assert_allclose(read_image(tmp_path / "out.dcm")[0], protected, atol=0.5)
    np.testing.assert_allclose(monai_load(tmp_path / "out.dcm", reader="PydicomReader"), protected, atol=0.5)


def test_dicom_series_round_trip_with_rescale(tmp_path):
    series, names = make_series(tmp_path / "data" / "tumour" / "patient1")
    image, meta = read_image(series)
    assert image.shape == (1, 128, 128, 3)
    assert [f.name for f in meta.files] == names  # slice order from ImagePositionPatient, not file names
    assert meta.slopes == [2.0] * 3 and meta.intercepts == [-1024.0] * 3
    np.testing.assert_array_equal(image, monai_load(series, reader="PydicomReader"))

    records = load_dataset(tmp_path / "data")
    assert len(records) == 1 and records[0].format == "dicom_series" and records[0].spatial_dims == 3
    writer = ProtectedCopyWriter(tmp_path / "out", records)
    protected = perturb(image, 25.0)  # 25 HU is not a multiple of the slope: stored values round
    entries = writer.write(records[0], meta, protected, original=image)
    assert len(entries) == 3

    outs = [pydicom.dcmread(tmp_path / "out" / "tumour" / "patient1" / name) for name in names]
    originals = [pydicom.dcmread(series / name) for name in names]
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert outs[0].SeriesInstanceUID != originals[0].SeriesInstanceUID
    assert len({o.SOPInstanceUID for o in outs} | {o.SOPInstanceUID for o in originals}) == 6
    for src, out in zip(originals, outs):
        assert changed_tags(src, out) <= DERIVED_TAGS
        assert (float(out.RescaleSlope), float(out.RescaleIntercept)) == (2.0, -1024.0)
        assert out.ImageType[0] == "DERIVED" and out.pixel_array.dtype == np.int16
    written, _ = read_image(tmp_path / "out" / "tumour" / "patient1")
    np.testing.assert_allclose(written, protected, atol=1.0)  # slope / 2 in HU
    assert max(e.max_abs_change for e in entries) == pytest.approx(np.abs(written - image).max())
    assert sum(e.changed_voxels for e in entries) == int((written != image).sum())


# ----------------------------------------------------------------------------------------------- PNG/JPEG


@needs_pil
@pytest.mark.parametrize(
    "mode, dtype, shape, top",
    [("L", np.uint8, (12, 20), 255), ("I;16", np.uint16, (12, 20), 65535), ("RGB", np.uint8, (12, 20, 3), 255)],
)
def test_png_round_trip_keeps_mode_and_bit_depth(tmp_path, mode, dtype, shape, top):
    stored = np.random.default_rng(0).integers(0, top + 1, size=shape).astype(dtype)
    PIL.fromarray(stored).save(tmp_path / "in.png")
    image, meta = read_image(tmp_path / "in.png")
    assert (meta.mode, meta.bit_depth, meta.dtype) == (mode, 8 if dtype == np.uint8 else 16, np.dtype(dtype))
    np.testing.assert_array_equal(image, monai_load(tmp_path / "in.png"))
    protected = perturb(image, 7.0)
    write_image(meta, protected, tmp_path / "out.png")
    with PIL.open(tmp_path / "out.png") as im:
        assert im.mode == mode
        out = np.asarray(im)
    assert out.dtype == dtype
    np.testing.assert_array_equal(read_image(tmp_path / "out.png")[0], np.clip(protected, 0, top))


@needs_pil
def test_jpeg_keeps_mode_and_is_measured(tmp_path):
    x = np.linspace(0, 255, 32 * 24).reshape(24, 32).astype(np.uint8)
    PIL.fromarray(x).save(tmp_path / "g.jpg", quality=95)
    records = load_dataset_from_files(tmp_path, {"a": ["g.jpg"]})
    image, meta = read_image(records[0])
    writer = ProtectedCopyWriter(tmp_path / "out", records)
    (entry,) = writer.write(records[0], meta, image)
    with PIL.open(entry.output_path) as im:
        assert (im.mode, im.format) == ("L", "JPEG")
    assert entry.max_abs_change <= 3  # lossy, but quality 100 and no subsampling


def load_dataset_from_files(tmp_path, layout):
    """Move files under tmp_path into a class-folder layout ``{class: [file names]}`` and load it."""
    root = tmp_path / "classes"
    for cls, files in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(tmp_path / name, root / cls / name)
    return load_dataset(root)


# ----------------------------------------------------------------------------------------------- ITK


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_round_trip(tmp_path, suffix):
    itk = pytest.importorskip("itk")
    img = itk.image_from_array(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4))
    img.SetSpacing([0.5, 0.7, 2.0])
    img.SetOrigin([1.0, 2.0, 3.0])
    itk.imwrite(img, str(tmp_path / f"in{suffix}"))
    image, meta = read_image(tmp_path / f"in{suffix}")
    assert image.shape == (1, 4, 5, 6) and meta.dtype == np.int16
    np.testing.assert_array_equal(image, monai_load(tmp_path / f"in{suffix}", reader="ITKReader"))
    protected = perturb(image, 4.0)
    write_image(meta, protected, tmp_path / f"out{suffix}")
    out = itk.imread(str(tmp_path / f"out{suffix}"))
    np.testing.assert_allclose(tuple(out.GetSpacing()), (0.5, 0.7, 2.0))
    np.testing.assert_allclose(tuple(out.GetOrigin()), (1.0, 2.0, 3.0))
    assert itk.array_from_image(out).dtype == np.int16
    np.testing.assert_array_equal(read_image(tmp_path / f"out{suffix}")[0], protected)


# ----------------------------------------------------------------------------------------------- datasets


def test_datalist_json(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(np.full((4, 5, 6), i, np.int16), np.eye(4)), tmp_path / "imgs" / f"s{i}.nii.gz")
    datalist = {
        "training": [{"image": "imgs/s0.nii.gz", "label": 0}, {"image": "imgs/s1.nii.gz", "label": [1]}],
        "validation": [{"image": "imgs/s2.nii.gz", "label": 1}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    records = load_dataset(tmp_path / "dataset.json")
    assert [(r.split, r.label, r.relpath.as_posix()) for r in records] == [
        ("training", 0, "imgs/s0.nii.gz"), ("training", 1, "imgs/s1.nii.gz"), ("validation", 1, "imgs/s2.nii.gz")
    ]
    assert all(r.format == "nifti" and r.spatial_dims == 3 for r in records)
    assert read_image(records[2])[0].max() == 2
    assert records[0].to_dict() == {"image": str(tmp_path / "imgs" / "s0.nii.gz"), "label": 0}
    assert len(load_dataset(tmp_path / "dataset.json", splits=("validation",))) == 1


def test_class_folders_mixed_formats(tmp_path):
    for cls in ("benign", "malignant"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    nib.save(nib.load(ANATOMICAL), tmp_path / "data" / "malignant" / "scan.nii")
    make_series(tmp_path / "data" / "benign" / "series1")
    (tmp_path / "data" / "benign" / ".DS_Store").write_bytes(b"x")  # hidden: ignored
    records = load_dataset(tmp_path / "data")
    assert [(r.class_name, r.label, r.format, r.spatial_dims) for r in records] == [
        ("benign", 0, "dicom_series", 3), ("malignant", 1, "nifti", 3)
    ]


def test_medmnist_npz(tmp_path):
    make_medmnist(tmp_path / "m.npz", n=8, shape=(6, 7))
    records = load_dataset(tmp_path / "m.npz", splits=("training", "validation", "test"))
    assert len(records) == 12 and {r.split for r in records} == {"train", "val", "test"}
    image, meta = read_image(records[3])
    arrays = np.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(image[0], arrays["train_images"][3])
    assert image.shape == (1, 6, 7) and records[3].label == int(arrays["train_labels"][3, 0])
    with pytest.raises(ValueError, match="save_npz"):
        write_image(meta, image, tmp_path / "x.npz")


# ----------------------------------------------------------------------------------------------- writer, manifest


def nifti_dataset(tmp_path, classes=("a", "b")):
    for label, c in enumerate(classes):
        (tmp_path / "in" / c).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.full((4, 5, 6), label, np.int16), np.eye(4)), tmp_path / "in" / c / "x.nii.gz")
    return load_dataset(tmp_path / "in")


def png_dataset(tmp_path, classes=("a", "b"), per_class=2):
    rng = np.random.default_rng(1)
    for c in classes:
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(per_class):
            PIL.fromarray(rng.integers(0, 200, (10, 12), dtype=np.uint8)).save(tmp_path / "in" / c / f"{i}.png")
    return load_dataset(tmp_path / "in")


@needs_pil
@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_writer_layout_and_manifest(tmp_path, suffix):
    records = png_dataset(tmp_path)
    writer = ProtectedCopyWriter(tmp_path / "out", records)
    for r in records:
        image, meta = read_image(r)
        writer.write(r, meta, perturb(image, 5.0, every=11), original=image)
    manifest = read_manifest(writer.write_manifest(tmp_path / f"manifest{suffix}"))
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")) == [
        "a", "a/0.png", "a/1.png", "b", "b/0.png", "b/1.png"
    ]
    assert [e.label for e in manifest] == [0, 0, 1, 1]
    for e in manifest:
        assert e.sha256 == sha256_file(e.output_path)
        before, after = read_image(e.input_path)[0], read_image(e.output_path)[0]
        assert e.changed_voxels == int((before != after).sum()) > 0
        assert e.max_abs_change == pytest.approx(np.abs(after - before).max()) and e.max_abs_change <= 5


def test_writer_refuses_input_folder_and_non_empty_output(tmp_path):
    records = nifti_dataset(tmp_path)
    with pytest.raises(ValueError, match="inside the input folder"):
        ProtectedCopyWriter(tmp_path / "in" / "protected", records)
    with pytest.raises(ValueError, match="inside the input folder"):
        ProtectedCopyWriter(tmp_path / "in", records)
    with pytest.raises(ValueError, match="contains the input folder"):
        ProtectedCopyWriter(tmp_path, records, overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        ProtectedCopyWriter(tmp_path / "out", records)
    ProtectedCopyWriter(tmp_path / "out", records, overwrite=True)


def test_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    with atomic_path(tmp_path / "ok.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"data")
    assert os.listdir(tmp_path) == ["ok.nii.gz"]

    records = nifti_dataset(tmp_path / "ds")
    image, meta = read_image(records[0])

    def crash(img, filename, *args, **kwargs):  # write half a file, then die
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    writer = ProtectedCopyWriter(tmp_path / "out", records)
    with pytest.raises(OSError, match="disk full"):
        writer.write(records[0], meta, image)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------------------------- errors


def test_corrupt_dicom_is_named(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    bad = tmp_path / "d" / "a" / "broken.dcm"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="broken.dcm.*not a readable DICOM"):
        read_image(bad)
    with pytest.raises(ValueError, match="broken.dcm"):
        load_dataset(tmp_path / "d")


def test_mixed_2d_3d_rejected(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    pydicom.dcmread(CT).save_as(tmp_path / "a" / "slice.dcm")
    nib.save(nib.load(ANATOMICAL), tmp_path / "b" / "vol.nii")
    with pytest.raises(ValueError, match=r"mixed 2D and 3D.*slice\.dcm.*vol\.nii"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"image": "x.nii"}, r"entry 0 .*x\.nii.* has no 'label'"),
        ({"image": "x.nii", "label": -1}, "non-negative integer"),
        ({"image": "x.nii", "label": "tumour"}, "non-negative integer"),
        ({"label": 0}, "'image' path"),
        ({"image": "missing.nii", "label": 0}, r"missing\.nii\): image not found"),
    ],
)
def test_datalist_errors(tmp_path, entry, match):
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), tmp_path / "x.nii")
    (tmp_path / "list.json").write_text(json.dumps({"training": [entry]}))
    with pytest.raises(ValueError, match=match):
        load_dataset(tmp_path / "list.json")


def test_folder_errors(tmp_path):
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        load_dataset(tmp_path / "empty_root")
    (tmp_path / "ds" / "a").mkdir(parents=True)
    (tmp_path / "ds" / "b").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "ds" / "a" / "x.nii")
    with pytest.raises(ValueError, match=r"'b'.*empty class folder|empty class folder.*'b'"):
        load_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "b" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: unsupported file type"):
        load_dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match="not found"):
        load_dataset(tmp_path / "nowhere")
    image, meta = read_image(tmp_path / "ds" / "a" / "x.nii")
    with pytest.raises(ValueError, match="does not match"):
        write_image(meta, image[:, :2], tmp_path / "o.nii")
    with pytest.raises(ValueError, match="NaN"):
        write_image(meta, image * np.nan, tmp_path / "o.nii")


@pytest.mark.parametrize(
    "array",
    [
        np.asfortranarray(np.arange(150 * 70 * 3, dtype=np.int16).reshape(150, 70, 3)),  # tiles cut at the edges
        np.asfortranarray(np.arange(130 * 65 * 4 * 2, dtype=np.uint16).reshape(130, 65, 4, 2)),  # channels last
        np.arange(70 * 66, dtype=np.float64).reshape(70, 66)[:, ::-1],  # neither C nor Fortran order
        np.arange(12, dtype=np.int16).reshape(3, 4),  # already C-ordered
        np.arange(5, dtype=np.int16),
    ],
)
def test_c_order_copy_equals_a_plain_conversion(array):
    from monai_salm.io.utils import c_order_copy

    out = c_order_copy(array, np.float32)
    assert out.flags.c_contiguous and out.dtype == np.float32 and not np.shares_memory(out, array)
    np.testing.assert_array_equal(out, array.astype(np.float32))


def test_nifti_reader_gives_c_ordered_float32_of_the_stored_voxels(tmp_path):
    vol = np.asfortranarray(np.random.default_rng(0).integers(-1000, 1000, (131, 70, 9), dtype=np.int16))
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.25, 1.0])), tmp_path / "ct.nii.gz")
    array, meta = read_image(tmp_path / "ct.nii.gz")
    assert array.flags.c_contiguous and array.dtype == np.float32 and array.shape == (1, 131, 70, 9)
    np.testing.assert_array_equal(array[0], vol)
    assert meta.dtype == np.int16
