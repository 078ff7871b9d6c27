"""The MONAI bundle ``bundles/salm_protect`` and the file-dataset paths of ``monai-salm train|protect``.

Small generated PNG (2D), DICOM (2D, from pydicom's CT_small.dcm) and NIfTI (3D) class-folder datasets are trained
on for one epoch with ``ConfigWorkflow`` (train.json), protected (inference.json), and the copies are checked against
the clean files: layout, formats, manifest, changes within epsilon in original units and only inside the mask. A
class folder of 3D DICOM series folders goes through the same bundle runs, and an interrupted protection is resumed.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.utils import optional_import
from pydicom.data import get_testdata_file

from monai_salm.api import DEFAULTS
from monai_salm.cli import main
from monai_salm.data import to_tensor
from monai_salm.engines import load_protection
from monai_salm.io import read_image, read_manifest, sha256_file
from monai_salm.transforms.functional import epsilon_for_psnr, resolve_k, topk_mask
from monai_salm.workflows import (
    BundleNoiseGenerator,
    load_train_val,
    load_training_arrays,
    network_shape,
    parse_intensity,
    release_identity,
)
from monai_salm.workflows.release_folder import RECORD_NAME
from conftest import make_medmnist

PIL, has_pil = optional_import("PIL.Image")
_, has_jsonschema = optional_import("jsonschema")
_, has_fire = optional_import("fire")

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning"),  # MONAI 1.6 warns on every config parse
    pytest.mark.skipif(not has_pil, reason="Pillow is not installed (PNG support is optional)"),
]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "salm_protect"
CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
SCHEMA = BUNDLE / "docs" / "metadata_schema.json"
CT = get_testdata_file("CT_small.dcm")

#: tiny training run: one epoch, small generator
TINY = {"max_epochs": 1, "batch_size": 4, "warmup_epochs": 0, "generator_channels": [4, 8, 16], "val_fraction": 0.25}
CLI_FAST = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--quiet"]


# ------------------------------------------------------------------------------------------------ datasets


def make_png(root, n=4, size=16, seed=0):
    """Two classes of 8-bit grey PNGs that differ in brightness."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            a = np.clip(rng.integers(0, 120, (size, size)) + 100 * label, 0, 255).astype(np.uint8)
            PIL.fromarray(a).save(root / name / f"img{i}.png")
    return root


def make_dicom(root, n=4, size=16, seed=0):
    """Two classes of 16x16 CT slices copied from pydicom's CT_small.dcm (new pixels and UIDs per file)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("normal", "nodule")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            ds = pydicom.dcmread(CT)
            hu = rng.integers(-900, 300, (size, size)) + 400 * label
            stored = (hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
            ds.set_pixel_data(stored.astype(np.int16), "MONOCHROME2", 16)  # also a new SOPInstanceUID
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(root / name / f"slice{i}.dcm", enforce_file_format=True)
    return root


def make_dicom_series(root, n=2, slices=4, size=16, seed=0):
    """Two classes of CT series folders ``<class>/series<i>/`` of ``slices`` 16x16 slices from pydicom's CT_small.dcm.

    Each slice gets new pixels (HU stored through RescaleSlope 2 / RescaleIntercept -1024), a new SOPInstanceUID,
    the series' new SeriesInstanceUID, its ImagePositionPatient and InstanceNumber. File names run against the slice
    order (``IM003.dcm`` is the first slice) so the reader has to sort by position.
    """
    rng = np.random.default_rng(seed)
    slope, intercept = 2.0, -1024.0
    for label, name in enumerate(("normal", "nodule")):
        for i in range(n):
            folder = root / name / f"series{i}"
            folder.mkdir(parents=True)
            series_uid = pydicom.uid.generate_uid()
            for k in range(slices):
                ds = pydicom.dcmread(CT)
                hu = rng.integers(-900, 300, (size, size)) + 400 * label
                ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
                ds.set_pixel_data(np.rint((hu - intercept) / slope).astype(np.int16), "MONOCHROME2", 16)  # new SOP UID
                ds.SeriesInstanceUID = series_uid
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.ImagePositionPatient = [-20.0, -30.0, -75.0 + 2.5 * k]
                ds.InstanceNumber = k + 1
                ds.save_as(folder / f"IM{slices - 1 - k:03d}.dcm", enforce_file_format=True)
    return root


def make_nifti(root, n=3, size=12, seed=0):
    """Two classes of 12^3 int16 CT-like volumes (HU) with a non-trivial affine."""
    rng = np.random.default_rng(seed)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    for label, name in enumerate(("healthy", "lesion")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            vol = (rng.integers(-1000, 200, (size,) * 3) + 500 * label).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, affine), root / name / f"vol{i}.nii.gz")
    return root


DATASETS = {
    # name: (builder, intensity override, written suffix)
    "png": (make_png, "auto", ".png"),
    "dicom": (make_dicom, "auto", ".dcm"),  # int16: percentile scaling fitted on the training images
    "nifti": (make_nifti, "window:-1000:1000", ".nii.gz"),
}


def relative_files(root):
    """Files under ``root``, without the release record a protected folder keeps (``.monai-salm-release.json``)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file() and p.name != RECORD_NAME)


def run_workflow(config, workflow_type, **override):
    workflow = ConfigWorkflow(config_file=str(CONFIGS / config), meta_file=str(META), workflow_type=workflow_type,
                              logging_file=False, **override)  # keep the test session's logging as it is
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Lazily train + protect each dataset once with the bundle configs."""
    cache = {}

    def get(kind):
        if kind not in cache:
            builder, intensity, _ = DATASETS[kind]
            root = tmp_path_factory.mktemp(kind)
            data = builder(root / "data")
            bundle_root = root / "bundle"
            train = run_workflow("train.json", "train", bundle_root=str(bundle_root), dataset_dir=str(data),
                                 intensity=intensity, **TINY)
            out = root / "protected"
            run_workflow("inference.json", "infer", bundle_root=str(bundle_root), dataset_dir=str(data),
                         output_dir=str(out))
            cache[kind] = {"data": data, "bundle_root": bundle_root, "out": out, "train": train}
        return cache[kind]

    return get


# ------------------------------------------------------------------------------------------------ bundle runs


@pytest.mark.parametrize("kind", list(DATASETS))
def test_bundle_train_then_protect(bundles, kind):
    run = bundles(kind)
    data, out, bundle_root = run["data"], run["out"], run["bundle_root"]
    _, intensity, suffix = DATASETS[kind]

    # training: the monai-salm checkpoint, the CheckpointSaver state, TensorBoard events, protected validation
    ckpt = bundle_root / "models" / "model.pt"
    settings, generator, surrogate, class_scores = load_protection(ckpt)
    assert (bundle_root / "models" / "training_state.pt").is_file()
    assert list((bundle_root / "logs").glob("events.out.tfevents.*"))
    assert 0.0 <= run["train"].evaluator.state.metrics["val_protected_accuracy"] <= 1.0
    scaling = parse_intensity(settings.intensity)
    assert scaling.fitted
    if intensity != "auto":
        assert settings.intensity == parse_intensity(intensity).to_dict()
    elif kind == "png":
        assert settings.intensity["kind"] == "range" and (scaling.lo, scaling.hi) == (0.0, 255.0)
    else:
        assert settings.intensity["kind"] == "percentile"
    eps_units = scaling.epsilon_in_units(settings.epsilon)

    # protection: same relative layout and formats, manifest with hashes, bounded and mask-restricted changes
    inputs = relative_files(data)
    assert relative_files(out) == sorted(inputs + ["manifest.csv"])
    assert all(name.endswith(suffix) for name in inputs)
    entries = {Path(e.output_path).relative_to(out).as_posix(): e for e in read_manifest(out / "manifest.csv")}
    assert sorted(entries) == inputs
    for name in inputs:
        entry = entries[name]
        assert entry.sha256 == sha256_file(out / name) and entry.format == ("nifti" if kind == "nifti" else kind)
        clean, meta_in = read_image(data / name)
        protected, meta_out = read_image(out / name)
        assert protected.shape == clean.shape and meta_out.dtype == meta_in.dtype
        diff = np.abs(protected.astype(np.float64) - clean.astype(np.float64))
        assert diff.max() <= eps_units + 0.5 + 1e-3  # stored values are rounded to integers
        changed = diff.any(axis=0)
        assert 0 < changed.sum() == entry.changed_voxels <= resolve_k(settings.k, changed.size)
        assert entry.max_abs_change == pytest.approx(diff.max(), abs=1e-3)
        mask = topk_mask(class_scores[entry.label][None], settings.k)[0, 0].bool().numpy()
        assert not changed[~mask].any()  # zero outside the mask
        if kind == "nifti":
            assert np.allclose(meta_out.affine, meta_in.affine)
        if kind == "dicom":
            ds_in, ds_out = pydicom.dcmread(data / name), pydicom.dcmread(out / name)
            assert ds_out.SOPInstanceUID != ds_in.SOPInstanceUID and ds_out.ImageType[0] == "DERIVED"
            assert ds_out.PatientName == ds_in.PatientName and ds_out.RescaleIntercept == ds_in.RescaleIntercept
        if kind == "png":
            with PIL.open(out / name) as im:
                assert im.mode == "L"


@pytest.mark.skipif(not has_fire, reason="python -m monai.bundle needs fire")
def test_documented_commands(tmp_path):
    """The README's ``python -m monai.bundle run`` commands, with an overridden checkpoint path."""
    data = make_png(tmp_path / "data", n=2)
    bundle, out, ckpt = tmp_path / "bundle", tmp_path / "protected", tmp_path / "bundle" / "salm.pt"
    common = ["--meta_file", str(META), "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(bundle),
              "--dataset_dir", str(data), "--ckpt_path", str(ckpt)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"), *common,
             "--max_epochs", "1", "--batch_size", "4", "--warmup_epochs", "0", "--generator_channels", "[4,8,16]",
             "--psnr", "30"]
    res = subprocess.run(train, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val_protected_accuracy" in res.stdout and "train_loss" in res.stdout
    assert ckpt.is_file() and not (bundle / "models" / "model.pt").exists()
    settings = load_protection(ckpt)[0]  # epsilon from --psnr 30, whole 8-bit steps
    exact = epsilon_for_psnr(30.0, settings.k, math.prod(settings.image_size))
    assert settings.epsilon == pytest.approx(math.floor(exact * 255) / 255)
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"), *common,
             "--output_dir", str(out)]
    res = subprocess.run(infer, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert relative_files(out) == sorted(relative_files(data) + ["manifest.csv"])
    assert json.loads((out / RECORD_NAME).read_text())["release_identity"] == release_identity(ckpt, 0)
    report_dir = tmp_path / "evaluation"
    evaluate = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "evaluate.json"),
                "--meta_file", str(META), "--bundle_root", str(bundle), "--dataset_dir", str(out), "--test_dir",
                str(data), "--output_dir", str(report_dir), "--epochs", "1", "--victim", "vit", "--device", "cpu"]
    res = subprocess.run(evaluate, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["recipe"]["network"] == "vit" and report["train_data"] == str(out) and len(report["history"]) == 1
    assert report["recipe"]["name"] == "competent" and report["selected_by"] == "protected_val"  # 10% held out
    assert {"summary.md", "learning_curves.png"} <= set(relative_files(report_dir))


def test_config_defaults_match_api():
    config = json.loads((CONFIGS / "train.json").read_text())
    renamed = {"epochs": "max_epochs"}
    for key, value in DEFAULTS.items():
        if key == "monitor_steps":  # the fresh-model monitor is a command-line option only
            continue
        got = config[renamed.get(key, key)]
        if key == "epsilon":  # like the CLI, the bundle derives epsilon from its psnr unless one is given
            assert got["_target_"] == "monai_salm.workflows.resolve_epsilon" and got["psnr"] == "@psnr"
            assert got["epsilon"] is None
        else:
            assert got == value, key


def test_config_reader_term(tmp_path):
    """``reader_weight`` > 0 gives the trainer a reader trained on the clean training images, frozen; 0 gives none."""
    data = make_png(tmp_path / "data")
    for weight in (0.0, 0.5):
        workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=str(META), workflow_type="train",
                                  logging_file=False, bundle_root=str(tmp_path / "bundle"), dataset_dir=str(data),
                                  reader_weight=weight, reader_epochs=1, reader_target="uniform", **TINY)
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        if weight == 0:
            assert trainer.reader is None
            continue
        assert (trainer.reader_weight, trainer.reader_target) == (0.5, "uniform")
        assert not trainer.reader.training and not any(p.requires_grad for p in trainer.reader.parameters())
        assert trainer.reader is not trainer.surrogate


def test_check_properties(bundles):
    run = bundles("png")
    common = {"bundle_root": str(run["bundle_root"]), "dataset_dir": str(run["data"])}
    for config, workflow_type, extra in (
        ("train.json", "train", {}),
        ("inference.json", "infer", {"output_dir": str(run["out"].parent / "unused")}),
    ):
        workflow = ConfigWorkflow(config_file=str(CONFIGS / config), meta_file=str(META),
                                  workflow_type=workflow_type, logging_file=False, **common, **extra)
        workflow.initialize()
        assert not workflow.check_properties(), config
    assert not (run["out"].parent / "unused").exists()  # nothing is written before run


@pytest.mark.skipif(not has_jsonschema, reason="verify_metadata needs jsonschema")
@pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning")
def test_verify_metadata_offline(tmp_path):
    if has_fire:  # the documented command line
        cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(META),
               "--filepath", str(SCHEMA)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        assert "metadata is verified with no error" in res.stdout + res.stderr
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))
    broken = json.loads(META.read_text())
    del broken["version"]
    broken["network_data_format"]["inputs"]["image"]["num_channels"] = 0
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


def test_verify_net_in_out():
    # no dataset: the networks take the metadata's reference format (1 x 28 x 28, 2 classes)
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIGS / "train.json"), device="cpu")
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIGS / "train.json"), device="cpu",
                      extra_forward_args={"y": 1})
    with pytest.raises(ValueError):  # a wrong metadata output is caught
        verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIGS / "train.json"),
                          device="cpu", **{"_meta_#network_data_format#outputs#pred#num_channels": 3})


def test_bundle_generator_call_forms():
    torch.manual_seed(0)
    g = BundleNoiseGenerator(2, 1, 3, channels=(4, 8), strides=(2,), pattern_size=(10, 10)).eval()
    x = torch.rand(2, 1, 10, 10)
    with torch.no_grad():
        assert torch.equal(g(x, 2), g(x, torch.tensor([2, 2])))
        assert torch.equal(g(x, [0, 1]), g(x, torch.tensor([0, 1])))
        free = g(x)  # label-free part: zero label maps, no class pattern
        assert free.shape == x.shape and free.dtype == x.dtype and torch.isfinite(free).all()
        onehot_free = g.net(torch.cat([x, torch.zeros(2, 3, 10, 10)], 1))
        assert torch.allclose(free, onehot_free)


# ------------------------------------------------------------------------------------------------ data loading


def test_datalist_validation_and_npz(tmp_path):
    data = make_png(tmp_path / "png", n=3)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    label = {f: int(f.startswith("malignant")) for f in files}
    datalist = {"training": [{"image": f, "label": label[f]} for f in files[1:]],
                "validation": [{"image": files[0], "label": label[files[0]]}]}
    (data / "datalist.json").write_text(json.dumps(datalist))
    both = load_train_val(data / "datalist.json", "range:0:255")
    assert len(both.train.labels) == 5 and len(both.val.labels) == 1 and both.num_classes == 2
    assert network_shape(data / "datalist.json").image_size == [16, 16]
    # .npz: same tensors as the MedMNIST loader, default range 0-255
    arrays = make_medmnist(tmp_path / "d.npz", n=8, shape=(16, 16), num_classes=2, rgb=True)
    npz = load_training_arrays(tmp_path / "d.npz")
    assert torch.equal(npz.images, to_tensor(arrays["train_images"])) and npz.scaling.to_dict()["hi"] == 255.0
    assert torch.equal(load_training_arrays(tmp_path / "d.npz", limit=3).images, npz.images[:3])
    windowed = load_training_arrays(tmp_path / "d.npz", "window:0:128")
    assert torch.allclose(windowed.images, (to_tensor(arrays["train_images"]) * 255 / 128).clamp(0, 1))


# ------------------------------------------------------------------------------------------------ command line


def test_cli_train_protect_class_folder(tmp_path, capsys):
    data = make_nifti(tmp_path / "data", n=2, size=8)
    ckpt, out = tmp_path / "salm.pt", tmp_path / "out"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--intensity", "window:-1000:1000", "--k", "20",
                 *CLI_FAST]) == 0
    settings = load_protection(ckpt)[0]
    assert settings.intensity == {"kind": "window", "lo": -1000.0, "hi": 1000.0, "clip": True}
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    assert "protected 4 file(s)" in capsys.readouterr().out
    assert relative_files(out) == sorted(relative_files(data) + ["manifest.csv"])
    eps_units = settings.epsilon * 2000
    for entry in read_manifest(out / "manifest.csv"):
        assert 0 < entry.changed_voxels <= 20 and entry.max_abs_change <= eps_units + 0.5
    # a non-empty output folder is refused, and left as it was
    before = {f: sha256_file(out / f) for f in relative_files(out)}
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {f: sha256_file(out / f) for f in relative_files(out)} == before


def _tree(root):
    """``{relative file: (sha256, mtime_ns)}`` of every file under ``root``."""
    return {f: (sha256_file(root / f), (root / f).stat().st_mtime_ns) for f in relative_files(root)}


def _age(root, files):
    """Give ``files`` an old mtime, so that any rewrite shows."""
    for f in files:
        os.utime(root / f, ns=(10**18, 10**18))


def test_cli_protect_resume(tmp_path, capsys, png_checkpoint):
    data = make_png(tmp_path / "data", n=3)
    out = tmp_path / "out"
    protect = ["protect", "--checkpoint", str(png_checkpoint), "--data", str(data), "--out", str(out), "--quiet"]
    assert main(protect) == 0
    first, rows = _tree(out), read_manifest(out / "manifest.csv")
    assert len(rows) == 6
    # without --resume or --overwrite a non-empty output folder is refused, and left as it was
    assert main(protect) == 2
    assert "--resume" in capsys.readouterr().err and _tree(out) == first

    # an interrupted run: two copies and the manifest never written, a temporary file left by a killed process
    lost = ["benign/img1.png", "malignant/img0.png"]
    for f in [*lost, "manifest.csv"]:
        (out / f).unlink()
    kept = relative_files(out)
    _age(out, kept)
    aged = _tree(out)
    (out / "benign" / ".img1.png.k1ll3d.tmp.png").write_bytes(b"\x89PNG truncated")
    assert main([*protect, "--resume"]) == 0
    assert "protected 6 file(s)" in capsys.readouterr().out
    after = _tree(out)
    assert sorted(after) == sorted(first)  # the stale temporary file is gone
    assert {f: after[f][0] for f in after} == {f: first[f][0] for f in first}  # byte-identical copies and manifest
    assert {f: after[f] for f in kept} == aged  # the kept copies were not rewritten
    assert read_manifest(out / "manifest.csv") == rows
    make_medmnist(tmp_path / "d.npz", n=4, shape=(16, 16))
    assert main(["protect", "--checkpoint", str(png_checkpoint), "--data", str(tmp_path / "d.npz"), "--out",
                 str(tmp_path / "p.npz"), "--resume", "--quiet"]) == 2  # an .npz copy is written whole
    assert "--resume applies to a datalist or class folder" in capsys.readouterr().err


def test_failed_resume_keeps_earlier_files(tmp_path, capsys, png_checkpoint):
    data = make_png(tmp_path / "data", n=2)
    out = tmp_path / "out"
    protect = ["protect", "--checkpoint", str(png_checkpoint), "--data", str(data), "--out", str(out), "--quiet"]
    assert main(protect) == 0
    for f in ("benign/img1.png", "manifest.csv"):
        (out / f).unlink()
    _age(out, relative_files(out))
    earlier = _tree(out)
    _bad_truncated(tmp_path / "more")  # a broken image found only when its pixels are read, after the missing copy
    shutil.copy(tmp_path / "more" / "malignant" / "z_truncated.png", data / "malignant")
    assert main([*protect, "--resume"]) == 2
    assert "z_truncated.png" in capsys.readouterr().err
    assert _tree(out) == earlier  # the copy written by this run is removed, the earlier run's files stay


def _bad_corrupt(root):
    make_png(root, n=2)
    (root / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root, "broken.png"


def _bad_truncated(root):  # readable header, broken pixels: found only while protecting
    make_png(root, n=2)
    good = (root / "malignant" / "img1.png").read_bytes()
    (root / "malignant" / "z_truncated.png").write_bytes(good[: len(good) // 2])
    return root, "z_truncated.png"


def _bad_missing_label(root):
    make_png(root / "images", n=2)
    entries = [{"image": f"images/benign/img{i}.png", "label": 0} for i in range(2)]
    entries.append({"image": "images/malignant/img0.png"})
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    return root / "datalist.json", "images/malignant/img0.png"


def _bad_mixed(root):
    make_png(root, n=2)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.int16), np.eye(4)), root / "malignant" / "volume.nii.gz")
    return root, "volume.nii.gz"


def _bad_size(root):
    make_png(root, n=2)
    PIL.fromarray(np.zeros((20, 16), np.uint8)).save(root / "malignant" / "tall.png")
    return root, "tall.png"


BAD = {"corrupt": _bad_corrupt, "truncated": _bad_truncated, "missing label": _bad_missing_label,
       "mixed 2D/3D": _bad_mixed, "size": _bad_size}


@pytest.fixture(scope="module")
def png_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ckpt = root / "salm.pt"
    assert main(["train", "--data", str(make_png(root / "data", n=2)), "--out", str(ckpt), *CLI_FAST]) == 0
    return ckpt


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_dataset(tmp_path, capsys, png_checkpoint, case):
    data, name = BAD[case](tmp_path / "data")
    ckpt, out = tmp_path / "salm.pt", tmp_path / "out"
    if case != "truncated":  # the truncated file is only found when its pixels are read by protect
        assert main(["train", "--data", str(data), "--out", str(ckpt), *CLI_FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("monai-salm: error:") and name in err and len(err.splitlines()) == 1
        assert not ckpt.exists()
    if case == "size":  # only training needs one size (the working grid); any size is protected at its own
        assert "--work-size" in err
        return
    protect = ["protect", "--checkpoint", str(png_checkpoint), "--data", str(data), "--out", str(out), "--quiet"]
    assert main(protect) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("monai-salm: error:") and name in err and len(err.splitlines()) == 1
    assert not out.exists()  # no partial output


def test_bundle_inference_error_leaves_no_output(tmp_path, png_checkpoint):
    data, name = _bad_truncated(tmp_path / "data")
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    (tmp_path / "bundle" / "models" / "model.pt").write_bytes(png_checkpoint.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as info:  # the config expression wraps the ValueError naming the file
        run_workflow("inference.json", "infer", bundle_root=str(tmp_path / "bundle"), dataset_dir=str(data),
                     output_dir=str(out))
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and name in str(cause)
    assert not out.exists()


def test_cli_npz_keeps_its_scaling(tmp_path, capsys):
    data = tmp_path / "d.npz"
    make_medmnist(data, n=8, shape=(16, 16), num_classes=2)
    ckpt, out = tmp_path / "salm.pt", tmp_path / "p.npz"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--intensity", "percentile:1:99", *CLI_FAST]) == 0
    assert load_protection(ckpt)[0].intensity["kind"] == "percentile"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert "intensity scaling" in capsys.readouterr().err and not out.exists()


def _slices(folder):
    """``{file name: dataset}`` of a DICOM series folder."""
    return {p.name: pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))}


def _hu(ds):
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_bundle_dicom_series(tmp_path):
    """3D DICOM series folders: bundle training, protection, then an interrupted protection resumed."""
    data = make_dicom_series(tmp_path / "data")
    bundle_root, out = tmp_path / "bundle", tmp_path / "protected"
    run_workflow("train.json", "train", bundle_root=str(bundle_root), dataset_dir=str(data), **TINY)
    settings = load_protection(bundle_root / "models" / "model.pt")[0]
    assert settings.spatial_dims == 3 and tuple(settings.image_size) == (16, 16, 4)
    eps_units = parse_intensity(settings.intensity).epsilon_in_units(settings.epsilon)
    infer = {"bundle_root": str(bundle_root), "dataset_dir": str(data), "output_dir": str(out)}
    run_workflow("inference.json", "infer", **infer)

    series = sorted(p.relative_to(data) for p in data.glob("*/*") if p.is_dir())
    assert len(series) == 4
    assert relative_files(out) == sorted(relative_files(data) + ["manifest.csv"])
    entries = {Path(e.output_path).relative_to(out).as_posix(): e for e in read_manifest(out / "manifest.csv")}
    assert sorted(entries) == relative_files(data)  # one row per slice
    new_series_uids = set()
    for rel in series:
        clean, protected = _slices(data / rel), _slices(out / rel)
        assert list(protected) == list(clean) and len(protected) >= 3  # same slices, same file names
        uids = {ds.SeriesInstanceUID for ds in protected.values()}
        assert len(uids) == 1 and uids != {ds.SeriesInstanceUID for ds in clean.values()}
        new_series_uids |= uids
        changed = 0
        for name, ds_out in protected.items():
            ds_in = clean[name]
            assert ds_out.ImagePositionPatient == ds_in.ImagePositionPatient  # same slice, same place
            assert ds_out.InstanceNumber == ds_in.InstanceNumber
            assert ds_out.SOPInstanceUID != ds_in.SOPInstanceUID
            assert ds_out.file_meta.MediaStorageSOPInstanceUID == ds_out.SOPInstanceUID
            assert ds_out.ImageType[0] == "DERIVED" and ds_out.DerivationDescription
            assert (ds_out.RescaleSlope, ds_out.RescaleIntercept) == (ds_in.RescaleSlope, ds_in.RescaleIntercept)
            diff = np.abs(_hu(ds_out) - _hu(ds_in))
            assert diff.max() <= eps_units + 0.5 * float(ds_in.RescaleSlope) + 1e-6  # stored values are rounded
            entry = entries[(rel / name).as_posix()]
            assert entry.sha256 == sha256_file(out / rel / name) and entry.format == "dicom_series"
            assert entry.changed_voxels == int((diff > 0).sum()) and entry.max_abs_change == pytest.approx(diff.max())
            changed += entry.changed_voxels
        assert changed > 0
        volume, meta = read_image(out / rel)
        assert volume.shape == (1, 16, 16, 4) and meta.format == "dicom_series"
    assert len(new_series_uids) == len(series)
    assert len({ds.SOPInstanceUID for rel in series for ds in _slices(out / rel).values()}) == 16

    # interrupted in the middle of a series: its other slices keep their new SeriesInstanceUID when it is redone
    rows = read_manifest(out / "manifest.csv")
    partial = out / series[0]
    first_uid = _slices(partial)["IM000.dcm"].SeriesInstanceUID
    for f in (partial / "IM002.dcm", out / "manifest.csv"):
        f.unlink()
    others = [f for f in relative_files(out) if not f.startswith(series[0].as_posix())]
    _age(out, others)
    before = _tree(out)
    run_workflow("inference.json", "infer", **infer, resume=True)
    assert relative_files(out) == sorted(relative_files(data) + ["manifest.csv"])
    assert {ds.SeriesInstanceUID for ds in _slices(partial).values()} == {first_uid}
    assert {f: _tree(out)[f] for f in others} == {f: before[f] for f in others}
    resumed = read_manifest(out / "manifest.csv")
    assert [r.output_path for r in resumed] == [r.output_path for r in rows]
    assert resumed == rows  # new UIDs derive from the release identity: the series redone is byte-identical


def test_bundle_mixed_sizes_with_a_work_size(tmp_path):
    """Training reads images of several sizes onto ``work_size``; inference protects each at its own size."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("benign", "malignant")):
        (data / name).mkdir(parents=True)
        for i, size in enumerate(((16, 16), (24, 20), (13, 31))):
            a = np.clip(rng.integers(0, 120, size) + 100 * label, 0, 255).astype(np.uint8)
            PIL.fromarray(a).save(data / name / f"img{i}.png")
    bundle_root = tmp_path / "bundle"
    run_workflow("train.json", "train", bundle_root=str(bundle_root), dataset_dir=str(data), work_size=16,
                 **{**TINY, "val_fraction": 0.0})
    settings = load_protection(bundle_root / "models" / "model.pt")[0]
    assert settings.image_size == (16, 16)
    out = tmp_path / "protected"
    run_workflow("inference.json", "infer", bundle_root=str(bundle_root), dataset_dir=str(data), output_dir=str(out))
    for src in sorted(data.rglob("*.png")):
        a, b = read_image(src)[0], read_image(out / src.relative_to(data))[0]
        assert a.shape == b.shape and 0 < np.abs(a - b).max() <= 20


def test_bundle_trains_through_flips_and_shifts_with_least_salient_masks(tmp_path):
    """The bundle's robust_to, placement and pattern_lr reach the trainer as the CLI's options do."""
    data = make_png(tmp_path / "data")
    bundle_root = tmp_path / "bundle"
    train = run_workflow("train.json", "train", bundle_root=str(bundle_root), dataset_dir=str(data),
                         robust_to="flip,crop:1", placement="least-salient", pattern_lr=0.5,
                         **{**TINY, "val_fraction": 0.0})
    trainer = train.trainer
    assert trainer.surrogate_view is not None and trainer.mask_placement == "least-salient"
    assert [g["lr"] for g in trainer.generator_optimizer.param_groups] == [TINY.get("generator_lr", 0.002), 0.5]
    scores = load_protection(bundle_root / "models" / "model.pt")[3]
    assert torch.equal(topk_mask(scores, trainer.k).bool(), trainer.class_masks)
