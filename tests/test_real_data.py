"""Real-data checks on ../shared/data (slow; run with ``python -m pytest -q -m slow``)."""

import json
from pathlib import Path

import numpy as np
import pytest

from monai_salm.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.slow


def _require(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available (real data lives in ../shared/data)")
    return path


@pytest.mark.parametrize("name, k, eps", [("bloodmnist_28.npz", 0.1, "20/255"), ("adrenalmnist3d_28.npz", 0.05, "28/255")])
def test_train_protect_budget_on_real_data(tmp_path, name, k, eps):
    data = _require(name)
    ckpt, out = tmp_path / "salm.pt", tmp_path / "protected.npz"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--limit", "256", "--epochs", "1", "--k", str(k), "--eps", eps, "--quiet"]) == 0
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--splits", "train",
                 "--quiet"]) == 0
    with np.load(data) as f, np.load(out) as g:
        clean, prot = f["train_images"], g["train_images"]
        assert np.array_equal(f["test_images"], g["test_images"])
    assert prot.dtype == clean.dtype and prot.shape == clean.shape
    diff = np.abs(prot.astype(int) - clean.astype(int))
    assert diff.max() <= round(eval(eps) * 255)
    changed = diff.any(-1) if clean.ndim == 4 and clean.shape[-1] == 3 else diff > 0
    assert changed.mean() <= k + 1e-9
    mse = (diff.astype(float) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) >= 32.0


def test_evaluation_harness_on_breastmnist(tmp_path):
    """The evaluation path end to end on real data: SALM, a baseline, victims with and without a countermeasure."""
    data = _require("breastmnist_28.npz")
    ckpt, prot, noise = tmp_path / "salm.pt", tmp_path / "salm.npz", tmp_path / "noise.npz"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--quiet"]) == 0
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(prot), "--quiet"]) == 0
    assert main(["baseline", "--method", "random-noise", "--checkpoint", str(ckpt), "--data", str(data), "--out",
                 str(noise), "--quiet"]) == 0
    reports = {}
    for name, train, cms in (("clean", data, ""), ("salm", prot, ""), ("noise", noise, ""), ("median", prot, "median")):
        out = tmp_path / name
        args = ["evaluate", "--train", str(train), "--test", str(data), "--out", str(out), "--epochs", "20", "--quiet"]
        assert main(args + (["--countermeasure", cms] if cms else [])) == 0
        reports[name] = json.loads((out / "report.json").read_text())
        assert (out / "learning_curves.png").stat().st_size > 1000 and len(reports[name]["history"]) == 20
    # the competent attacker learns BreastMNIST (MedMNIST v2 ResNet-18: 0.90) at its validation-selected epoch
    assert reports["clean"]["selected_auc"] >= 0.8
    assert reports["salm"]["selected_auc"] < reports["clean"]["selected_auc"] - 0.1  # protection holds at that epoch
    assert reports["salm"]["selected_auc"] < reports["noise"]["selected_auc"]  # and beats uniform noise in its masks
    assert reports["median"]["countermeasures"] == ["median:3"]
