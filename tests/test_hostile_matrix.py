"""Bad inputs thrown at the command line, the bundle and the MONAI Label task, each checked the same way.

For every case: exit code 2 (the bundle: an error whose cause names the file and the problem; the MONAI Label core: a
one-line ValueError, which the task turns into HTTP 404/422), one error line that names the file or option and the
problem, and the whole working folder byte-identical afterwards: inputs unchanged and no output, partial or hidden,
left behind. The task's HTTP layer itself is tested in ``test_monailabel_app.py`` where monailabel is installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import make_medmnist
from PIL import Image
from pydicom.data import get_testdata_file

from monai_salm.cli import main

FAST = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A trained 8-bit checkpoint and its data, copied into each case's folder."""
    root = tmp_path_factory.mktemp("matrix")
    make_medmnist(root / "d.npz", n=32, shape=(16, 16))
    assert main(["train", "--data", str(root / "d.npz"), "--out", str(root / "salm.pt"), *FAST]) == 0
    return root


def pngs(root: Path, n: int = 3, size: int = 16, mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for label in (0, 1):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            a = np.clip(rng.integers(0, 120, shape) + 100 * label, 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{label}" / f"img{i}.png")
    return root


def npz(root: Path, name: str = "bad.npz", **edits) -> Path:
    arrays = dict(np.load(root / "d.npz"))
    for key, value in edits.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(root / name, **arrays)
    return root / name


def edited_checkpoint(root: Path, edit: Callable[[dict], None]) -> Path:
    payload = torch.load(root / "salm.pt", weights_only=False)
    edit(payload)
    torch.save(payload, root / "edited.pt")
    return root / "edited.pt"


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def datalist(root: Path, entries: list, name: str = "list.json") -> Path:
    (root / name).write_text(json.dumps({"training": entries}))
    return root / name


def _nan_weights(payload):
    first = next(iter(payload["generator"]))
    payload["generator"][first] = payload["generator"][first] * float("nan")


def _train(data, *extra):
    return ["train", "--data", str(data), "--out", "{w}/c.pt", *FAST, *extra]


def _protect(data, *extra, out="{w}/out", ckpt="{w}/salm.pt"):
    return ["protect", "--checkpoint", ckpt, "--data", str(data), "--out", out, "--quiet", *extra]


# name -> (build(w) -> argv, words the error line must hold); w is the case's working folder, holding a copy of
# d.npz and salm.pt. "{w}" in an argument is replaced by it.
CASES: dict[str, tuple[Callable[[Path], list], tuple[str, ...]]] = {
    # training data
    "train: missing data": (lambda w: _train(w / "nope.npz"), ("nope.npz", "not found")),
    "train: folder without classes": (lambda w: (w / "flat").mkdir() or _train(w / "flat"), ("flat", "no class")),
    "train: npz without labels": (lambda w: _train(npz(w, train_labels=None)), ("bad.npz", "train_labels")),
    "train: float labels": (lambda w: _train(npz(w, train_labels=np.full((32, 1), 0.5))), ("bad.npz", "label")),
    "train: negative labels": (lambda w: _train(npz(w, train_labels=-np.ones((32, 1), dtype=np.int64))),
                               ("bad.npz", "label")),
    "train: NaN images": (lambda w: _train(npz(w, train_images=np.full((32, 16, 16), np.nan, np.float32))),
                          ("bad.npz", "NaN")),
    "train: 5-D images": (lambda w: _train(npz(w, train_images=np.zeros((32, 2, 2, 16, 16, 3), np.uint8))),
                          ("bad.npz", "must be")),
    "train: empty train split": (lambda w: _train(npz(w, train_images=np.zeros((0, 16, 16), np.uint8),
                                                      train_labels=np.zeros((0, 1), np.uint8))),
                                 ("bad.npz", "no images")),
    "train: one class": (lambda w: _train(npz(w, train_labels=np.zeros((32, 1), np.uint8))),
                         ("bad.npz", "two classes")),
    "train: corrupt png": (lambda w: (pngs(w / "p") / "c1" / "img2.png").write_bytes(b"not a png") and
                           _train(w / "p"), ("img2.png",)),
    "train: empty class folder": (lambda w: (pngs(w / "p") / "c2").mkdir() or _train(w / "p"), ("c2", "empty")),
    "train: image at the top level": (lambda w: shutil.copy(pngs(w / "p") / "c0" / "img0.png", w / "p" / "x.png")
                                      and _train(w / "p"), ("x.png", "no class")),
    "train: datalist not JSON": (lambda w: _train(write(w / "l.json", b"{oops")), ("l.json", "JSON")),
    "train: datalist entry without label": (lambda w: _train(datalist(pngs(w / "p").parent, [
        {"image": "p/c0/img0.png"}, {"image": "p/c1/img0.png", "label": 1}])), ("img0.png", "label")),
    "train: datalist missing image": (lambda w: _train(datalist(pngs(w / "p").parent, [
        {"image": "p/c0/gone.png", "label": 0}, {"image": "p/c1/img0.png", "label": 1}])), ("gone.png", "not found")),
    "train: datalist duplicate": (lambda w: _train(datalist(pngs(w / "p").parent, [
        {"image": "p/c0/img0.png", "label": 0}, {"image": "p/c1/img0.png", "label": 1},
        {"image": "p/c0/img0.png", "label": 1}])), ("img0.png", "listed twice")),
    "train: mixed sizes without --work-size": (lambda w: (Image.fromarray(np.zeros((20, 24), np.uint8)).save(
        pngs(w / "p") / "c0" / "odd.png")) or _train(w / "p"), ("odd.png", "--work-size")),
    # training options and outputs
    "train: k of 0": (lambda w: _train(w / "d.npz", "--k", "0"), ("k",)),
    "train: k above 1": (lambda w: _train(w / "d.npz", "--k", "1.5"), ("k",)),
    "train: epsilon above 1": (lambda w: _train(w / "d.npz", "--eps", "2"), ("epsilon",)),
    "train: bad work size": (lambda w: _train(w / "d.npz", "--work-size", "abc"), ("work",)),
    "train: bad intensity": (lambda w: _train(w / "d.npz", "--intensity", "window:5:1"), ("intensity", "window")),
    "train: negative limit": (lambda w: _train(w / "d.npz", "--limit", "-1"), ("limit",)),
    "train: spread larger than the image": (lambda w: _train(w / "d.npz", "--spread", "99"), ("spread",)),
    "train: absurd class count": (lambda w: _train(w / "d.npz", "--num-classes", "100000"), ("classes",)),
    "train: out is the data": (lambda w: ["train", "--data", str(w / "d.npz"), "--out", str(w / "d.npz"), *FAST],
                               ("d.npz", "training data")),
    "train: out is a folder": (lambda w: (w / "dir").mkdir() or ["train", "--data", str(w / "d.npz"), "--out",
                                                                  str(w / "dir"), *FAST], ("dir", "folder")),
    "train: out a broken symlink": (lambda w: (w / "link.pt").symlink_to(w / "gone" / "x.pt") or [
        "train", "--data", str(w / "d.npz"), "--out", str(w / "link.pt"), *FAST], ("link.pt", "symbolic link")),
    "train: bad device": (lambda w: _train(w / "d.npz", "--device", "banana"), ("banana", "device")),
    "train: oversized seed": (lambda w: _train(w / "d.npz", "--seed", str(2**40)), ("seed",)),
    # release
    "protect: missing checkpoint": (lambda w: _protect(w / "d.npz", out="{w}/r.npz", ckpt="{w}/none.pt"),
                                    ("none.pt", "no such file")),
    "protect: garbage checkpoint": (lambda w: _protect(w / "d.npz", out="{w}/r.npz", ckpt=str(
        write(w / "junk.pt", b"\x00junk" * 50))), ("junk.pt", "not a readable")),
    "protect: NaN weights": (lambda w: _protect(w / "d.npz", out="{w}/r.npz", ckpt=str(edited_checkpoint(
        w, _nan_weights))), ("edited.pt", "NaN")),
    "protect: epsilon 50": (lambda w: _protect(w / "d.npz", out="{w}/r.npz", ckpt=str(edited_checkpoint(
        w, lambda p: p["settings"].update(epsilon=50.0)))), ("edited.pt", "epsilon")),
    "protect: npz out without suffix": (lambda w: _protect(w / "d.npz", out="{w}/release"), ("release", ".npz")),
    "protect: npz out is the input": (lambda w: _protect(w / "d.npz", "--overwrite", out="{w}/d.npz"),
                                      ("d.npz", "input")),
    "protect: unknown split": (lambda w: _protect(w / "d.npz", "--splits", "holdout", out="{w}/r.npz"),
                               ("holdout",)),
    "protect: class not in checkpoint": (lambda w: _protect(w / "d.npz", "--classes", "9", out="{w}/r.npz"),
                                         ("9", "not classes")),
    "protect: fraction 0": (lambda w: _protect(w / "d.npz", "--fraction", "0", out="{w}/r.npz"), ("fraction",)),
    "protect: out inside the input": (lambda w: _protect(pngs(w / "p"), out=str(w / "p" / "out")),
                                      ("out", "inside the input")),
    "protect: truncated png": (lambda w: (pngs(w / "p") / "c1" / "img2.png").write_bytes(
        (w / "p" / "c1" / "img0.png").read_bytes()[:60]) and _protect(w / "p"), ("img2.png",)),
    "protect: rgb against grey": (lambda w: _protect(pngs(w / "p", mode="RGB")), ("img0.png", "channel")),
    "protect: 2D and 3D mixed": (lambda w: nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)),
                                                    pngs(w / "p") / "c0" / "vol.nii.gz") or _protect(w / "p"),
                                 ("vol.nii.gz",)),
    "protect: 16-bit against 8-bit": (lambda w: _dicom_3000(w / "p") or _protect(w / "p"),
                                      ("s.dcm", "intensity range")),
    "protect: broken symlink out": (lambda w: (w / "link").symlink_to(w / "gone") or _protect(
        pngs(w / "p"), out=str(w / "link")), ("link", "symbolic link")),
    "protect: resume into another release": (lambda w: _other_release(w) or _protect(
        w / "p", "--resume", "--seed", "3", out=str(w / "rel")), ("rel", "another checkpoint or seed")),
    "protect: empty datalist": (lambda w: _protect(write(w / "e.json", b'{"training": [], "test": []}')),
                                ("e.json", "no images")),
    "train: empty datalist": (lambda w: _train(write(w / "e.json", b'{"training": []}')), ("e.json", "no images")),
    "protect: resume with npz": (lambda w: _protect(w / "d.npz", "--resume", out="{w}/r.npz"), ("--resume",)),
    # other commands
    "verify: not a release": (lambda w: ["verify", "--release", str(w), "--original", str(w)], ("manifest",)),
    "evaluate: missing test data": (lambda w: ["evaluate", "--train", str(w / "d.npz"), "--test", str(w / "no.npz"),
                                               "--out", str(w / "ev"), "--epochs", "1", "--quiet"],
                                    ("no.npz", "not found")),
    "slim: sample-mode checkpoint": (lambda w: ["slim", "--checkpoint", str(edited_checkpoint(
        w, lambda p: p["settings"].update(mask_mode="sample"))), "--out", str(w / "s.pt")], ("sample",)),
}


def _dicom_3000(root: Path) -> None:
    for label in (0, 1):
        (root / f"c{label}").mkdir(parents=True)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.set_pixel_data(np.full((16, 16), 3000, dtype=np.int16), "MONOCHROME2", 16)
        ds.save_as(root / f"c{label}" / "s.dcm", enforce_file_format=True)


def _other_release(w: Path) -> None:
    """A finished release of the default seed in ``w/rel`` (part of the case's starting state)."""
    assert main(_protect(pngs(w / "p"), out=str(w / "rel"), ckpt=str(w / "salm.pt"))) == 0


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes (None for folders and symlinks)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def test_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_cli_case(name, assets, tmp_path, capsys):
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(assets / "d.npz", w / "d.npz")
    shutil.copy(assets / "salm.pt", w / "salm.pt")
    build, words = CASES[name]
    argv = [str(a).replace("{w}", str(w)) for a in build(w)]
    capsys.readouterr()
    before = snapshot(w)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects the option itself
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2, (name, code, err)
    assert len(err) == 1, (name, err)
    for word in words:
        assert word.lower() in err[0].lower(), (name, err[0])
    assert snapshot(w) == before, name  # inputs untouched, nothing written, nothing hidden left


def failure_causes(workflow) -> list[str]:
    """Run a bundle workflow that must fail; the messages of the error and of everything that caused it."""
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.run()
    causes, error = [], info.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__ or error.__context__
    return causes


# The bundle's inference config, in process: name -> (build(w) -> (dataset_dir, overrides), words of the cause).
BUNDLE_CASES: dict[str, tuple[Callable[[Path], tuple[Path, dict]], tuple[str, ...]]] = {
    "bundle: corrupt png": (lambda w: ((pngs(w / "p") / "c1" / "img2.png").write_bytes(b"not a png") and w / "p", {}),
                            ("img2.png",)),
    "bundle: rgb against grey": (lambda w: (pngs(w / "p", mode="RGB"), {}), ("img0.png", "channel")),
    "bundle: 16-bit against 8-bit": (lambda w: (_dicom_3000(w / "p") or w / "p", {}), ("s.dcm", "intensity range")),
    "bundle: output inside the input": (lambda w: (pngs(w / "p"), {"output_dir": str(w / "p" / "out")}),
                                        ("inside the input",)),
    "bundle: unclear overwrite flag": (lambda w: (pngs(w / "p"), {"overwrite": "maybe"}), ("overwrite", "maybe")),
    "bundle: resume into another release": (lambda w: (_other_release(w) or w / "p", {
        "output_dir": str(w / "rel"), "resume": True, "seed": 3}), ("another checkpoint or seed",)),
}


@pytest.mark.parametrize("name", list(BUNDLE_CASES))
def test_bundle_case(name, assets, tmp_path):
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundles" / "salm_protect" / "configs"
    w = tmp_path / "w"
    (w / "bundle" / "models").mkdir(parents=True)
    shutil.copy(assets / "salm.pt", w / "salm.pt")
    shutil.copy(assets / "salm.pt", w / "bundle" / "models" / "model.pt")
    build, words = BUNDLE_CASES[name]
    data, override = build(w)
    override = {"bundle_root": str(w / "bundle"), "dataset_dir": str(data), "output_dir": str(w / "out"), **override}
    before = snapshot(w)
    workflow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                              workflow_type="infer", logging_file=False, **override)
    causes = failure_causes(workflow)
    for word in words:
        assert any(word.lower() in c.lower() for c in causes), (name, causes)
    assert snapshot(w) == before, name


def _label_core():
    """The MONAI Label task's protection core (``apps/monailabel_salm/lib/infers/salm_core.py``), loaded by path."""
    from test_monailabel_app import core

    return core


# The MONAI Label task's file-in, file-out core (the task turns these errors into HTTP 404/422 with the message):
# name -> (build(w) -> (checkpoint, image, class_index), words of the error).
LABEL_CASES: dict[str, tuple[Callable[[Path], tuple], tuple[str, ...]]] = {
    "label: corrupt image": (lambda w: (w / "salm.pt", write(w / "x.png", b"not a png"), 0), ("x.png",)),
    "label: class outside the checkpoint": (lambda w: (w / "salm.pt", pngs(w / "p") / "c0" / "img0.png", 7),
                                            ("class_index 7", "outside")),
    "label: rgb against grey": (lambda w: (w / "salm.pt", pngs(w / "p", mode="RGB") / "c0" / "img0.png", 0),
                                ("channel",)),
    "label: garbage checkpoint": (lambda w: (write(w / "junk.pt", b"junk" * 20), pngs(w / "p") / "c0" / "img0.png",
                                             0), ("junk.pt", "not a readable")),
    "label: 3D image, 2D checkpoint": (lambda w: (w / "salm.pt", _volume(w / "v.nii.gz"), 0), ("3D", "2D")),
}


def _volume(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), path)
    return path


@pytest.mark.parametrize("name", list(LABEL_CASES))
def test_label_case(name, assets, tmp_path):
    core = _label_core()
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(assets / "salm.pt", w / "salm.pt")
    build, words = LABEL_CASES[name]
    ckpt, image, class_index = build(w)
    before = snapshot(w)
    with pytest.raises(ValueError) as info:
        core.SALMProtector(ckpt).protect_file(image, w / "out.png", class_index=class_index)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word.lower() in message.lower(), (name, message)
    assert snapshot(w) == before, name


def test_bundle_training_refuses_an_unusable_checkpoint_path_before_training(tmp_path):
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundles" / "salm_protect" / "configs"
    w = tmp_path / "w"
    data = pngs(w / "p")
    (w / "bundle" / "models" / "model.pt").mkdir(parents=True)  # the checkpoint path is a folder
    before = snapshot(w)
    workflow = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                              workflow_type="train", logging_file=False, bundle_root=str(w / "bundle"),
                              dataset_dir=str(data), max_epochs=1, batch_size=4)
    causes = failure_causes(workflow)
    assert any("model.pt: is a folder" in c for c in causes), causes
    after = {k: v for k, v in snapshot(w).items() if not k.startswith("bundle/logs")}  # TensorBoard's, at build
    assert after == before  # no training state or checkpoint: it stopped before training
