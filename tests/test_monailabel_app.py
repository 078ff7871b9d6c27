"""The protection logic of the MONAI Label app ``apps/monailabel_salm``, without MONAI Label.

``apps/monailabel_salm/lib/infers/salm_core.py`` imports only monai-salm, numpy and torch; it is loaded here by file
path (the app's ``lib`` package would import ``monailabel``). A small untrained checkpoint is enough: the file in,
file out path is checked (shape, affine, header, stored dtype, change within epsilon in original units and only
inside the mask), and the errors the task turns into HTTP 404/422. The real server is exercised by
``scripts/monailabel_e2e.sh`` in its own environment.
"""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_salm.engines import SALMSettings, save_protection
from monai_salm.io import read_image
from monai_salm.networks import NoiseGenerator, build_classifier
from monai_salm.transforms.functional import resolve_k, topk_mask
from monai_salm.workflows import load_checkpoint

APP = Path(__file__).resolve().parents[1] / "apps" / "monailabel_salm"
CORE = APP / "lib" / "infers" / "salm_core.py"
SIZE = (8, 8, 8)
WINDOW = {"kind": "window", "lo": -1000.0, "hi": 1000.0, "clip": True}


def _load_core():
    spec = importlib.util.spec_from_file_location("monailabel_salm_core", CORE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


core = _load_core()


def _checkpoint(path, spatial_dims=3, size=SIZE, mask_mode="class", num_classes=2):
    torch.manual_seed(0)
    settings = SALMSettings(
        spatial_dims=spatial_dims, in_channels=1, num_classes=num_classes, image_size=size, epsilon=28 / 255,
        k=0.1, intensity=WINDOW, mask_mode=mask_mode, surrogate="resnet18", generator={"channels": [4, 8, 16]},
    )
    generator = NoiseGenerator(spatial_dims, 1, num_classes, channels=(4, 8, 16))
    surrogate = build_classifier("resnet18", spatial_dims, 1, num_classes)
    scores = torch.rand(num_classes, *size) if mask_mode == "class" else None
    return save_protection(path, settings, generator, surrogate, scores)


def _affine():
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-40.0, 12.5, 80.0)
    affine[0, 1] = 0.1
    return affine


def _nifti(path, data):
    nib.save(nib.Nifti1Image(data, _affine()), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_app")
    rng = np.random.default_rng(0)
    hu = rng.normal(-100, 300, SIZE)
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08not a nifti" + bytes(100))
    return {
        "ckpt": _checkpoint(root / "salm3d.pt"),
        "ckpt_sample": _checkpoint(root / "salm3d_sample.pt", mask_mode="sample"),
        "int16": _nifti(root / "ct.nii.gz", np.clip(hu, -1000, 1000).astype(np.int16)),
        "float32": _nifti(root / "ct_f.nii", hu.astype(np.float32)),
        "2d": _nifti(root / "slice.nii.gz", hu[:, :, 0].astype(np.int16)),
        "size": _nifti(root / "big.nii.gz", rng.normal(0, 100, (10, 8, 8)).astype(np.int16)),
        "nan": _nifti(root / "nan.nii.gz", np.full(SIZE, np.nan, np.float32)),
        "corrupt": root / "corrupt.nii.gz",
        "root": root,
    }


@pytest.fixture(scope="module")
def protector(files):
    return core.SALMProtector(files["ckpt"])


def test_core_does_not_import_monailabel():
    tree = ast.parse(CORE.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "monailabel"]
    assert core.__all__ == ["SUPPORTED_FORMATS", "ProtectionResult", "SALMProtector", "parse_class_index"]


def test_describe(protector, files):
    info = protector.describe()
    assert info["checkpoint"] == str(files["ckpt"])
    assert info["epsilon"] == pytest.approx(28 / 255)
    assert info["epsilon_original_units"] == pytest.approx(28 / 255 * 2000)
    assert info["k"] == 0.1 and info["value_range"] == [0.0, 1.0] and info["intensity"]["kind"] == "window"
    assert info["spatial_dims"] == 3 and info["image_size"] == list(SIZE) and info["mask_mode"] == "class"


@pytest.mark.parametrize("key, class_index", [("int16", 1), ("float32", None)])
def test_protect_file(protector, files, key, class_index):
    src = files[key]
    out = files["root"] / f"out_{key}{''.join(src.suffixes)}"
    result = protector.protect_file(src, out, class_index=class_index)
    orig, prot = nib.load(src), nib.load(out)
    assert result.output == out and prot.shape == orig.shape
    assert np.array_equal(prot.affine, orig.affine)
    assert prot.get_data_dtype() == orig.get_data_dtype() and result.dtype == str(orig.get_data_dtype())
    assert int(prot.header["sform_code"]) == int(orig.header["sform_code"])
    a = np.asanyarray(orig.dataobj).astype(np.float64)
    b = np.asanyarray(prot.dataobj).astype(np.float64)
    diff = np.abs(b - a)
    tol = 0.5 if key == "int16" else 1e-3  # integer files store the change rounded
    eps = 28 / 255 * 2000
    assert 0 < diff.max() <= eps + tol and result.max_abs_change == pytest.approx(diff.max())
    # the mask is the class's top-k positions of the checkpoint's class scores; nothing changes outside it
    ckpt = load_checkpoint(files["ckpt"])
    mask = result.mask[0]
    expected = topk_mask(ckpt.class_scores[[result.class_index]], 0.1)[0, 0]
    assert mask.sum() == resolve_k(0.1, mask.size) and np.array_equal(mask, expected.bool().numpy())
    assert not (diff > 0)[~mask].any()
    if class_index is None:
        x = torch.from_numpy(ckpt.scaling.to_unit(read_image(src)[0]))[None]
        with torch.no_grad():
            assert result.class_index == int(ckpt.surrogate(x).argmax(1)[0]) and result.class_source == "surrogate"
    else:
        assert (result.class_index, result.class_source) == (class_index, "request")
    summary = result.to_json()
    assert summary["masked_positions"] == int(mask.sum()) and summary["shape"] == [1, *SIZE]


def test_protect_other_size_at_its_own_size(protector, files):
    """A volume of another size is protected at its own size: the class mask is mapped from the working grid."""
    out = files["root"] / "out_big.nii.gz"
    result = protector.protect_file(files["size"], out, class_index=1)
    orig, prot = nib.load(files["size"]), nib.load(out)
    assert prot.shape == orig.shape == (10, 8, 8) and np.array_equal(prot.affine, orig.affine)
    diff = np.abs(np.asanyarray(prot.dataobj).astype(float) - np.asanyarray(orig.dataobj).astype(float))
    assert 0 < diff.max() <= 28 / 255 * 2000 + 0.5 and not (diff > 0)[~result.mask[0]].any()
    assert result.mask.shape == (1, 10, 8, 8)


def test_protect_temporary_output_and_sample_mask(files):
    protector = core.SALMProtector(files["ckpt_sample"])
    result = protector.protect_file(files["int16"])
    try:
        assert result.output.name.startswith("ct_protected_") and result.output.name.endswith(".nii.gz")
        assert result.mask.sum() == resolve_k(0.1, int(np.prod(SIZE)))
        assert nib.load(result.output).shape == SIZE
    finally:
        result.output.unlink()


@pytest.mark.parametrize(
    "key, error, pattern",
    [
        ("missing", FileNotFoundError, "not found"),
        ("corrupt", ValueError, "corrupt.nii.gz.*cannot read"),
        ("2d", ValueError, "slice.nii.gz: image is 2D but the checkpoint salm3d.pt is 3D"),
        ("nan", ValueError, "NaN"),
    ],
)
def test_errors(protector, files, key, error, pattern):
    src = files["root"] / "missing.nii.gz" if key == "missing" else files[key]
    before = set(files["root"].iterdir())
    with pytest.raises(error, match=pattern):
        protector.protect_file(src, files["root"] / f"err_{key}.nii.gz")
    assert set(files["root"].iterdir()) == before


def test_bad_class_and_checkpoint(protector, files, tmp_path):
    with pytest.raises(ValueError, match="class_index 5 is outside"):
        protector.protect_file(files["int16"], tmp_path / "x.nii.gz", class_index=5)
    with pytest.raises(ValueError, match="checkpoint not found"):
        core.SALMProtector(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable monai-salm checkpoint"):
        core.SALMProtector(tmp_path / "bad.pt")


def test_unsupported_format(protector, tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    with pytest.raises(ValueError, match="dicom_series input is not supported"):
        protector.protect_file(series)


@pytest.mark.parametrize(
    "value, expected", [(None, None), ("", None), (-1, None), ("-1", None), (2, 2), ("3", 3), (1.0, 1)]
)
def test_parse_class_index(value, expected):
    assert core.parse_class_index(value) == expected


@pytest.mark.parametrize("value", ["a", 1.5, True, [1]])
def test_parse_class_index_errors(value):
    with pytest.raises(ValueError, match="class_index must be an integer"):
        core.parse_class_index(value)


@pytest.fixture
def task_class():
    """``SALMProtect`` from the app's ``lib`` package; only where monailabel is installed (the e2e environment)."""
    pytest.importorskip("monailabel", reason="monailabel is not installed (scripts/monailabel_e2e.sh runs this test)")
    sys.path.insert(0, str(APP))
    try:
        module = importlib.import_module("lib.infers.salm_protect")
    finally:
        sys.path.remove(str(APP))
        for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
            del sys.modules[name]
    return module.SALMProtect


def test_task_info_and_call(task_class, files):
    task = task_class(files["ckpt"], device="cpu")
    assert task.is_valid() and task.dimension == 3
    info = task.info()
    assert info["salm"]["epsilon"] == pytest.approx(28 / 255) and info["salm"]["checkpoint"] == str(files["ckpt"])
    output, summary = task({"image": str(files["int16"]), "class_index": 1})
    try:
        assert nib.load(output).shape == SIZE and summary["class_index"] == 1
        assert summary["checkpoint"] == str(files["ckpt"])
    finally:
        Path(output).unlink()


@pytest.mark.parametrize(
    "request_, code, pattern",
    [
        ({"image": ""}, 404, "unknown id"),
        ({"image": "/no/such/file.nii.gz"}, 404, "not found"),
        ({"image": "CORRUPT"}, 422, "cannot read"),
        ({"image": "2D"}, 422, "image is 2D but the checkpoint salm3d.pt is 3D"),
        ({"image": "INT16", "class_index": "x"}, 422, "class_index must be an integer"),
        ({"image": "INT16", "class_index": 9}, 422, "outside the checkpoint's classes"),
    ],
)
def test_task_http_errors(task_class, files, request_, code, pattern):
    from fastapi import HTTPException

    task = task_class(files["ckpt"], device="cpu")
    keys = {"CORRUPT": "corrupt", "2D": "2d", "INT16": "int16"}
    image = request_["image"]
    request_ = {**request_, "image": str(files[keys[image]]) if image in keys else image}
    with pytest.raises(HTTPException) as error:
        task(request_)
    assert error.value.status_code == code and re.search(pattern, error.value.detail), error.value.detail


def test_task_without_checkpoint(task_class, tmp_path):
    from fastapi import HTTPException

    for task, pattern in ((task_class(None), "no checkpoint configured"), (task_class(tmp_path / "x.pt"), "not found")):
        assert not task.is_valid() and pattern in task.info()["salm"]["error"]
        with pytest.raises(HTTPException) as error:
            task({"image": "x.nii.gz"})
        assert error.value.status_code == 503 and pattern in error.value.detail
