import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from monai_salm.cli import main

from conftest import make_medmnist

FAST = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli2d")
    data = root / "data.npz"
    arrays = make_medmnist(data, n=32, shape=(16, 16), num_classes=3, rgb=True)
    ckpt = root / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--k", "0.1", "--eps", "20/255", *FAST]) == 0
    return root, data, arrays, ckpt


def test_train_then_protect_keeps_format(trained_2d, capsys):
    root, data, arrays, ckpt = trained_2d
    out = root / "protected.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "changed pixels" in printed and "PSNR" in printed
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    assert set(got) == set(arrays)
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    for key in ("train_labels", "val_labels", "test_labels"):
        assert np.array_equal(got[key], arrays[key]), key
    for split in ("train", "val", "test"):  # the whole release is protected by default
        diff = np.abs(got[f"{split}_images"].astype(int) - arrays[f"{split}_images"].astype(int))
        assert 0 < diff.max() <= 20
        changed = diff.any(-1).reshape(len(diff), -1).sum(1)
        assert changed.max() <= round(0.1 * 256)
        assert (changed > 0).all()


def test_protect_refuses_existing_output(trained_2d, capsys):
    root, data, _, ckpt = trained_2d
    out = root / "exists.npz"
    out.write_bytes(b"keep me")
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def _bad_file(path, mutate):
    arrays = make_medmnist(path, n=16, shape=(16, 16), num_classes=3, rgb=True)
    arrays = mutate(arrays)
    np.savez(path, **arrays)
    return path


BAD = {
    "missing key": (lambda a: {k: v for k, v in a.items() if k != "train_labels"}, "missing key 'train_labels'"),
    "wrong dims": (lambda a: {**a, "train_images": a["train_images"][..., 0, 0]}, "must be (N,H,W)"),
    "NaN image": (lambda a: {**a, "train_images": np.full((16, 16, 16, 3), np.nan, np.float32)}, "NaN"),
    "label count": (lambda a: {**a, "train_labels": a["train_labels"][:3]}, "train_labels"),
    "float labels": (lambda a: {**a, "train_labels": a["train_labels"].astype(float)}, "integers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_one_line_error(tmp_path, capsys, case):
    mutate, message = BAD[case]
    data = _bad_file(tmp_path / "bad.npz", mutate)
    out = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("monai-salm: error:") and message in err and str(data) in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [(["--k", "1.5"], "k"), (["--k", "0"], "k"), (["--eps", "2"], "epsilon"), (["--eps", "0"], "epsilon")])
def test_bad_budget(tmp_path, capsys, args, message):
    data = tmp_path / "ok.npz"
    make_medmnist(data, n=16)
    out = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(out), *args, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_labels_out_of_range(tmp_path, capsys):
    data = tmp_path / "ok.npz"
    make_medmnist(data, n=16, num_classes=3)
    out = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(out), "--num-classes", "2", *FAST]) == 2
    assert "labels" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("shape, rgb, message", [((16, 16, 16), False, "2D"), ((16, 16), False, "channel")])
def test_checkpoint_mismatch(trained_2d, tmp_path, capsys, shape, rgb, message):
    _, _, _, ckpt = trained_2d
    data = tmp_path / "other.npz"
    make_medmnist(data, n=8, shape=shape, rgb=rgb)
    before = data.read_bytes()
    out = tmp_path / "p.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and data.read_bytes() == before
    assert not list(tmp_path.glob(".p.npz*"))


def test_3d_train_protect_evaluate(tmp_path):
    data = tmp_path / "vol.npz"
    arrays = make_medmnist(data, n=16, shape=(12, 12, 12), num_classes=2)
    ckpt, out, rep = tmp_path / "salm.pt", tmp_path / "p.npz", tmp_path / "report"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--k", "50", "--eps", "0.1", *FAST]) == 0
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        prot = f["train_images"]
    diff = prot.astype(int) - arrays["train_images"].astype(int)
    assert ((diff != 0).reshape(16, -1).sum(1) <= 50).all() and np.abs(diff).max() <= round(0.1 * 255)
    assert main(["evaluate", "--train", str(out), "--test", str(data), "--epochs", "1", "--out", str(rep), "--quiet"]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert {"accuracy", "balanced_accuracy", "auc", "best_accuracy", "best_auc", "history"} <= set(report)
    assert len(report["history"]) == 1


@pytest.mark.parametrize("cmd", [[], ["train"], ["protect"], ["evaluate"], ["baseline"]])
def test_help_for_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0 and "usage: monai-salm" in capsys.readouterr().out


def test_module_entry_point_exit_code(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "monai_salm.cli", "train", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "c.pt")],
        capture_output=True, text=True,
    )
    assert res.returncode == 2 and "file not found" in res.stderr


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0  # with progress bars, as in the README
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["psnr_db"] >= 32.0 and 0 < summary["changed_pixel_fraction"] <= 0.1
    # the small victim, trained on each copy and tested on the clean test split; both accuracies are printed
    assert summary["chance_accuracy"] == pytest.approx(1 / 3) and summary["victim"] == "small"
    for name in ("clean", "protected"):
        accuracy = summary[f"{name}_victim_accuracy"]
        report = json.loads((out / f"victim_{name}" / "report.json").read_text())
        assert report["recipe"]["network"] == "cnn" and report["selected_accuracy"] == pytest.approx(accuracy)
        assert report["train_data"] == str(out / ("demo.npz" if name == "clean" else "demo_protected.npz"))
        assert f"{accuracy:.3f}" in printed
    assert summary["clean_victim_accuracy"] >= 0.9  # the classes are easy to tell apart on clean images
    picture = Image.open(out / "demo_protection.png")
    assert picture.format == "PNG" and picture.size[1] > picture.size[0]  # one row per image: 6 rows, 4 panels
    assert str(out / "demo_protection.png") in summary["files"]
    with np.load(out / "demo.npz") as clean, np.load(out / "demo_protected.npz") as prot:
        assert clean["train_images"].shape == (360, 28, 28) and set(np.unique(clean["train_labels"])) == {0, 1, 2}
        assert not np.array_equal(clean["test_images"], prot["test_images"])  # every split is released protected
        np.testing.assert_array_equal(clean["test_labels"], prot["test_labels"])
    assert main(["demo", "--out", str(out), "--epochs", "1", "--quiet"]) == 2  # non-empty folder refused


def test_train_stop_accuracy_stops_early_or_never(tmp_path, capsys):
    data = tmp_path / "data.npz"
    make_medmnist(data, n=24, shape=(16, 16), num_classes=2)
    fast = ["--warmup-epochs", "0", "--batch-size", "16", "--quiet"]
    runs = {"0.01": 1, "none": 2}  # any running accuracy reaches 0.01 in the first epoch; "none" runs every epoch
    for value, epochs_run in runs.items():
        ckpt = tmp_path / f"{value}.pt"
        assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "2", "--stop-accuracy", value,
                     *fast]) == 0
        extra = torch.load(ckpt, map_location="cpu", weights_only=True)["extra"]
        assert extra["epochs_run"] == epochs_run
        assert extra["stop_accuracy"] == (None if value == "none" else 0.01)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "bad.pt"), "--stop-accuracy", "1.5", *fast])
    assert "accuracy in (0, 1]" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()


def test_train_refresh_samples_is_recorded_and_checked(tmp_path, capsys):
    data = tmp_path / "data.npz"
    make_medmnist(data, n=24, shape=(16, 16), num_classes=2)
    fast = ["--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", "--stop-accuracy", "none", "--quiet"]
    ckpt = tmp_path / "subset.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--refresh-samples", "8", *fast]) == 0
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["extra"]["refresh_samples"] == 8
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "bad.pt"), "--refresh-samples", "-1", *fast])
    assert "non-negative integer" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()


def test_train_with_reader_term_records_it(tmp_path, capsys):
    data = tmp_path / "data.npz"
    make_medmnist(data, n=24, shape=(16, 16), num_classes=2)
    ckpt = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--reader-weight", "0.5", "--reader-epochs", "1",
                 "--reader-target", "uniform", *FAST]) == 0
    extra = torch.load(ckpt, map_location="cpu", weights_only=True)["extra"]
    assert (extra["reader_weight"], extra["reader_epochs"], extra["reader_target"]) == (0.5, 1, "uniform")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "bad.pt"), "--reader-target", "anatomy", *FAST])
    assert "invalid choice" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()
