"""Hostile or careless inputs: each gets one clear error, exit code 2, no output, and the inputs unchanged."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from conftest import make_medmnist

from monai_salm.api import protect_tensor
from monai_salm.cli import main
from monai_salm.engines import load_protection
from monai_salm.workflows.saver import as_bool

CLI_FAST = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--quiet"]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = root / "d.npz"
    make_medmnist(data, n=32, shape=(16, 16))
    ckpt = root / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), *CLI_FAST]) == 0
    return data, ckpt


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("monai-salm: error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_train_out_is_the_data(trained, capsys):
    data, _ = trained
    before = digest(data)
    assert main(["train", "--data", str(data), "--out", str(data), *CLI_FAST]) == 2
    _one_error_line(capsys, "is the training data")
    assert digest(data) == before


def test_train_out_is_a_folder_or_unwritable(trained, tmp_path, capsys):
    data, _ = trained
    assert main(["train", "--data", str(data), "--out", str(tmp_path), *CLI_FAST]) == 2
    _one_error_line(capsys, "is a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            pytest.skip("permissions are not enforced for this user")
        assert main(["train", "--data", str(data), "--out", str(locked / "c.pt"), *CLI_FAST]) == 2
        _one_error_line(capsys, "cannot write there")
    finally:
        locked.chmod(0o700)


def test_absurd_class_count(tmp_path, capsys):
    data = tmp_path / "d.npz"
    make_medmnist(data, n=16, shape=(8, 8))
    with np.load(data) as d:
        arrays = dict(d)
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
    arrays["train_labels"][0] = 999_999
    np.savez(data, **arrays)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "c.pt"), *CLI_FAST]) == 2
    _one_error_line(capsys, "2 to 1000 classes")
    assert not (tmp_path / "c.pt").exists()


def test_negative_limit(trained, tmp_path, capsys):
    data, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--out", str(tmp_path / "c.pt"), "--limit", "-3"])
    assert exit_info.value.code == 2
    assert "must be a non-negative integer" in capsys.readouterr().err


@pytest.mark.parametrize("out_name, needle", [("release", "give --out a .npz name"), ("folder.npz", "is a folder")])
def test_npz_out_must_be_an_npz_file(trained, tmp_path, capsys, out_name, needle):
    data, ckpt = trained
    out = tmp_path / out_name
    if out_name.endswith(".npz"):
        out.mkdir()
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, needle)
    assert not list(tmp_path.glob(".*"))  # no hidden temporary left


@pytest.mark.parametrize("classes, needle", [(["7"], "not classes of this checkpoint")])
def test_classes_outside_the_checkpoint(trained, tmp_path, capsys, classes, needle):
    data, ckpt = trained
    out = tmp_path / "p.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--classes", *classes,
                 "--quiet"]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.update(epsilon=50.0), "epsilon 50.0"),
        (lambda s: s.update(num_classes=10**6), "num_classes"),
        (lambda s: s.update(k=2.5), "k 2.5"),
        (lambda s: s.update(mask_mode="everything"), "mask_mode"),
        (lambda s: s.update(image_size=[16]), "image_size"),
    ],
)
def test_edited_checkpoint_settings_are_refused(trained, tmp_path, capsys, edit, needle):
    data, ckpt = trained
    payload = torch.load(ckpt, weights_only=True)
    edit(payload["settings"])
    bad = tmp_path / "edited.pt"
    torch.save(payload, bad)
    out = tmp_path / "p.npz"
    assert main(["protect", "--checkpoint", str(bad), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "invalid checkpoint settings", needle)
    assert not out.exists()


def test_nan_generator_weights_are_refused(trained, tmp_path, capsys):
    data, ckpt = trained
    payload = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in payload["generator"].items() if v.is_floating_point())
    payload["generator"][name] = torch.full_like(payload["generator"][name], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    out = tmp_path / "p.npz"
    assert main(["protect", "--checkpoint", str(bad), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "NaN or infinite")
    assert not out.exists()


def test_release_is_verified_before_it_is_returned(trained):
    """A generator that emits NaN (e.g. one broken after loading) stops the release instead of writing garbage."""
    _, ckpt = trained
    settings, generator, surrogate, scores = load_protection(ckpt)

    class Broken(torch.nn.Module):
        label_conditioned = True

        def forward(self, x, y):
            return torch.full_like(x, float("nan"))

    x, y = torch.rand(2, 1, 16, 16), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        protect_tensor(x, y, settings, Broken(), surrogate, scores)
    assert protect_tensor(x, y, settings, generator, surrogate, scores)[0].shape == x.shape


@pytest.mark.parametrize("value, expected", [(False, False), ("no", False), ("False", False), ("0", False), (0, False),
                                             (True, True), ("yes", True), ("true", True), (1, True)])
def test_bundle_flags(value, expected):
    assert as_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["maybe", 2, "nein"])
def test_bundle_flags_refuse_unclear_values(value):
    with pytest.raises(ValueError, match="overwrite must be true or false"):
        as_bool(value, "overwrite")


def _release(tmp_path, capsys):
    """A class folder of 16-bit NIfTI volumes, its checkpoint and its protected copy."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for label, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for i in range(3):
            vol = (rng.normal(0, 200, (8, 8, 6)) + 300 * label).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.0, 1.0])), data / name / f"v{i}.nii.gz")
    ckpt, out = tmp_path / "salm.pt", tmp_path / "out"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--block", "2", *CLI_FAST]) == 0
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    return data, ckpt, out


def test_verify_release(tmp_path, capsys):
    import nibabel as nib

    data, ckpt, out = _release(tmp_path, capsys)
    assert main(["verify", "--release", str(out), "--original", str(data), "--checkpoint", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "PASS: 6 image(s)" in printed and "0 failed" in printed
    # moved folders still verify: paths are relative to the recorded roots
    moved_data, moved_out = tmp_path / "moved_data", tmp_path / "moved_out"
    data.rename(moved_data)
    out.rename(moved_out)
    assert main(["verify", "--release", str(moved_out), "--original", str(moved_data)]) == 0
    capsys.readouterr()
    # a tampered copy: a voxel outside the mask changed -> sha256, recorded change and mask checks fail, exit 1
    victim = moved_out / "a" / "v0.nii.gz"
    img = nib.load(victim)
    arr = np.asanyarray(img.dataobj).copy()
    settings, _, _, scores = load_protection(ckpt)
    arr.flat[0] += 1000
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), victim)
    assert main(["verify", "--release", str(moved_out), "--original", str(moved_data), "--checkpoint", str(ckpt)]) == 1
    printed = capsys.readouterr().out
    assert f"FAIL  {victim}" in printed and "sha256 as recorded" in printed and "within epsilon" in printed
    assert "FAIL: 6 image(s)" in printed
    victim.unlink()
    assert main(["verify", "--release", str(moved_out), "--original", str(moved_data)]) == 1
    assert "files present" in capsys.readouterr().out
    assert main(["verify", "--release", str(tmp_path), "--original", str(moved_data)]) == 2
    _one_error_line(capsys, "no manifest.csv")


@pytest.mark.parametrize("device, needle", [("banana", "is not a torch device"), ("cuda:7", "CUDA"), ("mps", "only cpu")])
def test_bad_device_is_refused_before_anything_runs(trained, tmp_path, capsys, device, needle):
    data, ckpt = trained
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    for argv in (["train", "--data", str(data), "--out", str(tmp_path / "c.pt")],
                 ["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r.npz")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--device", device])
        assert exit_info.value.code == 2
        assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_oversized_seed_is_blamed_on_the_seed(trained, tmp_path, capsys):
    data, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--out", str(tmp_path / "c.pt"), "--seed", str(2**40)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seed must be in [0, 2**32)" in err and str(data) not in err


def test_broken_symlink_as_output(trained, tmp_path, capsys):
    data, ckpt = trained
    for name in ("c.pt", "r.npz", "folder"):
        link = tmp_path / name
        link.symlink_to(tmp_path / "nowhere" / name)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "c.pt"), *CLI_FAST]) == 2
    _one_error_line(capsys, "c.pt", "broken symbolic link")
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r.npz")]) == 2
    _one_error_line(capsys, "r.npz", "broken symbolic link")
    pngs = _png_folder(tmp_path / "pngs")
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(tmp_path / "folder")]) == 2
    _one_error_line(capsys, "folder", "broken symbolic link")
    assert not (tmp_path / "nowhere").exists()


def _png_folder(root, n=4, size=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in (0, 1):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(n):
            a = np.clip(rng.integers(0, 120, (size, size)) + 100 * label, 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{label}" / f"img{i}.png")
    return root


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_release_resumes_to_the_same_bytes(trained, tmp_path, capsys, monkeypatch):
    from monai_salm.workflows.dataset import ProtectionDataset

    _, ckpt = trained
    pngs = _png_folder(tmp_path / "pngs")
    before = _tree(pngs)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(whole), "--quiet"]) == 0
    load = ProtectionDataset._load

    def interrupted(self, index):  # Ctrl-C while the sixth image is read
        if index == 5:
            raise KeyboardInterrupt
        return load(self, index)

    monkeypatch.setattr(ProtectionDataset, "_load", interrupted)
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(cut), "--quiet"]) == 130
    assert "run the same command with --resume" in capsys.readouterr().err
    kept = sorted(p.name for p in cut.rglob("*.png"))
    assert len(kept) == 5 and not (cut / "manifest.csv").exists() and not (cut / ".monai-salm.lock").exists()
    monkeypatch.setattr(ProtectionDataset, "_load", load)
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(cut), "--quiet"]) == 2
    _one_error_line(capsys, "not empty", "--resume")
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(cut), "--resume",
                 "--quiet"]) == 0
    assert _tree(cut) == {k: v if k.name != "manifest.csv" else v.replace(b"/whole/", b"/cut/")
                          for k, v in _tree(whole).items()}
    assert _tree(pngs) == before


def test_release_folder_is_locked_and_bound_to_its_release(trained, tmp_path, capsys):
    import json
    import socket

    data, ckpt = trained
    pngs = _png_folder(tmp_path / "pngs")
    out = tmp_path / "out"
    protect = ["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(out), "--quiet"]
    assert main(protect) == 0
    files = _tree(out)
    from monai_salm.io import sha256_file

    record = json.loads((out / ".monai-salm-release.json").read_text())  # what made the release
    assert record["checkpoint_sha256"] == sha256_file(ckpt) and record["seed"] == 0
    assert record["checkpoint"] == str(ckpt) and len(record["release_identity"]) == 64
    # a resume with another seed (another release identity) would mix two releases in one folder
    assert main([*protect, "--resume", "--seed", "5"]) == 2
    _one_error_line(capsys, str(out), "another checkpoint or seed")
    # a run writing into the folder holds its lock: a second one, even with --overwrite, stops
    (out / ".monai-salm.lock").write_text(json.dumps({"host": "another-host", "pid": 1}))
    assert main([*protect, "--overwrite"]) == 2
    _one_error_line(capsys, "another monai-salm run is writing into this folder")
    # a lock left by a killed run on this host is taken over
    (out / ".monai-salm.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
    assert main([*protect, "--resume"]) == 0
    assert _tree(out) == files and not (out / ".monai-salm.lock").exists()


def test_failed_fresh_release_leaves_no_hidden_record(trained, tmp_path, capsys):
    _, ckpt = trained
    pngs = _png_folder(tmp_path / "pngs")
    (pngs / "c1" / "img3.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "img3.png")
    assert not out.exists()


def test_releases_are_reproducible_dicom_included(trained, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    _, ckpt = trained
    src = tmp_path / "dcm"
    rng = np.random.default_rng(0)
    for label in (0, 1):
        (src / f"c{label}").mkdir(parents=True)
        for i in range(2):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.set_pixel_data(rng.integers(0, 256, (16, 16)).astype(np.int16), "MONOCHROME2", 16)
            ds.RescaleIntercept = 0  # values 0..255, as the 8-bit checkpoint expects
            ds.save_as(src / f"c{label}" / f"s{i}.dcm", enforce_file_format=True)
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, ("0", "0", "1")):
        assert main(["protect", "--checkpoint", str(ckpt), "--data", str(src), "--out", str(out), "--seed", seed,
                     "--quiet"]) == 0
    a, b, c = (_tree(out) for out in outs)
    dicoms = [k for k in a if k.suffix == ".dcm"]
    assert len(dicoms) == 4 and all(a[k] == b[k] for k in dicoms)  # same checkpoint and seed: same bytes
    uids = [pydicom.dcmread(outs[0] / k).SOPInstanceUID for k in dicoms]
    other = [pydicom.dcmread(outs[2] / k).SOPInstanceUID for k in dicoms]
    assert len(set(uids)) == 4 and not set(uids) & set(other)  # unique, and another release gets other UIDs


def test_image_at_the_top_level_of_a_class_folder(trained, tmp_path, capsys):
    _, ckpt = trained
    pngs = _png_folder(tmp_path / "pngs")
    (pngs / "stray.png").write_bytes((pngs / "c0" / "img0.png").read_bytes())
    (pngs / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "out"
    for argv in (["train", "--data", str(pngs), "--out", str(tmp_path / "c.pt"), *CLI_FAST],
                 ["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(out), "--quiet"]):
        assert main(argv) == 2
        _one_error_line(capsys, "stray.png", "has no class")
    assert not out.exists() and not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("second_label", [1, 0])
def test_datalist_listing_an_image_twice(trained, tmp_path, capsys, second_label):
    import json

    _, ckpt = trained
    pngs = _png_folder(tmp_path / "pngs")
    entries = [{"image": f"pngs/c{c}/img{i}.png", "label": c} for c in (0, 1) for i in range(4)]
    entries.append({"image": "pngs/c0/img1.png", "label": second_label})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}))
    assert main(["train", "--data", str(datalist), "--out", str(tmp_path / "c.pt"), *CLI_FAST]) == 2
    _one_error_line(capsys, "img1.png", "listed twice")


def test_empty_train_split_and_one_class_data(trained, tmp_path, capsys):
    data, _ = trained
    arrays = dict(np.load(data))
    empty = {**arrays, "train_images": arrays["train_images"][:0], "train_labels": arrays["train_labels"][:0]}
    one = {**arrays, **{f"{s}_labels": np.zeros_like(arrays[f"{s}_labels"]) for s in ("train", "val", "test")}}
    np.savez(tmp_path / "empty.npz", **empty)
    np.savez(tmp_path / "one.npz", **one)
    assert main(["train", "--data", str(tmp_path / "empty.npz"), "--out", str(tmp_path / "e.pt"), *CLI_FAST]) == 2
    _one_error_line(capsys, "empty.npz", "split has no images")
    assert main(["evaluate", "--train", str(tmp_path / "empty.npz"), "--test", str(data), "--out",
                 str(tmp_path / "ev"), "--epochs", "1", "--quiet"]) == 2
    _one_error_line(capsys, "empty.npz", "split has no images")
    assert main(["train", "--data", str(tmp_path / "one.npz"), "--out", str(tmp_path / "o.pt"), *CLI_FAST]) == 2
    _one_error_line(capsys, "one.npz", "at least two classes")
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npz"]


def test_wide_image_against_an_8bit_checkpoint(trained, tmp_path, capsys):
    import pydicom
    from pydicom.data import get_testdata_file

    _, ckpt = trained  # trained on uint8 images: intensity range 0..255
    src = tmp_path / "dcm"
    for label in (0, 1):
        (src / f"c{label}").mkdir(parents=True)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.set_pixel_data(np.full((16, 16), 3000, dtype=np.int16), "MONOCHROME2", 16)
        ds.save_as(src / f"c{label}" / "s.dcm", enforce_file_format=True)
    before = _tree(src)
    out = tmp_path / "out"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(src), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "s.dcm", "outside the checkpoint's intensity range [0, 255]")
    assert not out.exists() and _tree(src) == before


def test_lossy_jpeg_output_is_reported(trained, tmp_path, capsys):
    from PIL import Image

    from monai_salm.io import read_manifest

    _, ckpt = trained
    src = _png_folder(tmp_path / "src")
    for png in list(src.rglob("*.png"))[:3]:
        Image.open(png).save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    out = tmp_path / "out"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(src), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: 3 JPEG file(s)" in err and "lossy" in err
    jpeg = [e for e in read_manifest(out / "manifest.csv") if e.format == "jpeg"]
    assert len(jpeg) == 3  # their measured change is what the manifest records


def test_full_disk_gives_one_line_and_no_partial_output(trained, tmp_path, capsys, monkeypatch):
    import errno

    import monai_salm.io.writers as writers

    data, ckpt = trained
    pngs = _png_folder(tmp_path / "pngs")
    before = _tree(pngs)
    real = writers.write_image
    calls = []

    def full_disk(meta, array, dest, *args, **kwargs):  # the third file finds the disk full
        calls.append(dest)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        return real(meta, array, dest, *args, **kwargs)

    monkeypatch.setattr(writers, "write_image", full_disk)
    out = tmp_path / "out"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(pngs), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "No space left on device", "img")
    assert not out.exists() and _tree(pngs) == before
    monkeypatch.setattr("monai_salm.workflows.npz_release.save_npz",
                        lambda path, arrays: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device",
                                                                          str(path))))
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r.npz"),
                 "--quiet"]) == 2
    _one_error_line(capsys, "r.npz", "No space left on device")
    assert not (tmp_path / "r.npz").exists()
