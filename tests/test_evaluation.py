"""Evaluation harness: metrics on known predictions, victims, reports, plots, baselines and selection via the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from monai_salm.cli import main
from monai_salm.evaluation import (
    classification_metrics,
    markdown_table,
    plot_image_grid,
    plot_sweep,
    train_victim,
)
from monai_salm.evaluation.countermeasures import differentiable_view
from monai_salm.networks import CLASSIFIERS, build_classifier

from conftest import make_medmnist

REPORT_KEYS = {"accuracy", "balanced_accuracy", "auc", "best_accuracy", "best_auc", "history", "per_class_accuracy",
               "train_seconds", "recipe", "countermeasures"}


def _is_png(path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100


def test_metrics_on_known_binary_predictions():
    labels = torch.tensor([0, 0, 0, 1, 1])
    p1 = torch.tensor([0.1, 0.4, 0.6, 0.3, 0.9])  # positives 0.3, 0.9 vs negatives 0.1, 0.4, 0.6 -> AUC 4/6
    m = classification_metrics(torch.stack([1 - p1, p1], 1), labels)
    assert m["accuracy"] == pytest.approx(3 / 5)  # predictions 0 0 1 0 1
    assert m["per_class_accuracy"] == {0: pytest.approx(2 / 3), 1: pytest.approx(1 / 2)}
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["auc"] == pytest.approx(4 / 6)


def test_metrics_on_known_multiclass_predictions():
    labels = torch.tensor([0, 1, 2, 2])
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    # one-vs-rest: class 0 ranks its positive above 2 of 3 negatives... computed by hand:
    # c0: pos 0.8 vs neg 0.2,0.5,0.1 -> 1; c1: pos 0.7 vs 0.1,0.1,0.1 -> 1; c2: pos 0.4,0.8 vs 0.1,0.1 -> 1
    assert m["auc"] == pytest.approx(1.0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", [n for n in CLASSIFIERS if n not in ("resnet34", "resnet50")])
def test_victim_networks_on_medmnist_sizes(name, spatial_dims):
    x = torch.rand(2, 1, *(28,) * spatial_dims)
    net = build_classifier(name, spatial_dims, 1, 3, x.shape[2:]).eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3)


def test_vit_rejects_indivisible_size():
    with pytest.raises(ValueError, match="patch size"):
        build_classifier("vit", 2, 1, 2, (30, 30))


def _separable(n=48, shape=(12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, *shape, generator=g) * 0.4 + y.view(-1, 1, 1, 1) * 0.5).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("cms", ["", "median,mixup", "adversarial:4/255,crop,cutout", "jpeg,rotate"])
def test_train_victim_report(tiny_classifier, cms):
    x, y = _separable()
    report = train_victim(x, y, x[:16], y[:16], 2, epochs=2, network=tiny_classifier(2, 1, 2), batch_size=16,
                          countermeasures=cms)
    assert REPORT_KEYS <= set(report)
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert all(0 <= h["train_accuracy"] <= 1 for h in report["history"])
    assert report["best_accuracy"] == max(h["accuracy"] for h in report["history"])
    assert len(report["countermeasures"]) == (len(cms.split(",")) if cms else 0)


def test_train_victim_learns_separable_data(tiny_classifier):
    x, y = _separable(96)
    report = train_victim(x, y, x, y, 2, epochs=6, network=tiny_classifier(2, 1, 2), batch_size=16, lr=1e-2)
    assert report["best_accuracy"] >= 0.9


def test_train_victim_errors(tiny_classifier):
    x, y = _separable()
    with pytest.raises(ValueError, match="differ in shape"):
        train_victim(x, y, x[:, :, :8], y, 2, epochs=1, network=tiny_classifier(2, 1, 2))
    with pytest.raises(ValueError, match="optimizer"):
        train_victim(x, y, x, y, 2, epochs=1, network=tiny_classifier(2, 1, 2), optimizer="lbfgs")
    with pytest.raises(ValueError, match="unknown countermeasure|not a countermeasure|valid"):
        train_victim(x, y, x, y, 2, epochs=1, network=tiny_classifier(2, 1, 2), countermeasures="sharpen")


def test_differentiable_view_gradients():
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    differentiable_view("median")(x).sum().backward()
    assert x.grad is not None and 0 < int((x.grad != 0).sum()) <= x.numel()
    x.grad = None
    out = differentiable_view("bitdepth:2")(x)
    assert len(torch.unique(out.detach())) <= 4
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
    with pytest.raises(ValueError, match="preprocess"):
        differentiable_view("mixup")
    with pytest.raises(ValueError, match="flip, crop, rotate and cutout"):
        differentiable_view("gamma")


def test_differentiable_view_rotates_each_sample():
    x = torch.rand(32, 1, 9, 9, requires_grad=True)
    out = differentiable_view("rotate:15", seed=1)(x)
    turned = [k for sample, moved in zip(x.detach(), out.detach())
              for k in range(4) if torch.equal(moved, torch.rot90(sample, k, dims=(-2, -1)))]
    assert 4 <= len(turned) <= 28 and any(k > 0 for k in turned)  # no small rotation drawn: a pure quarter turn
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    wide = torch.rand(32, 1, 6, 9)
    out = differentiable_view("rotate:15", seed=1)(wide)
    assert out.shape == wide.shape  # a non-square plane turns by half turns only
    assert any(torch.equal(m, s.flip((-2, -1))) for s, m in zip(wide, out))
    assert differentiable_view("rotate:15", seed=2)(torch.rand(3, 1, 5, 6, 6)).shape == (3, 1, 5, 6, 6)


def test_differentiable_view_cuts_one_hole_per_sample():
    x = (0.1 + torch.rand(8, 2, 10, 12)).requires_grad_()
    out = differentiable_view("cutout:0.5", seed=0)(x)
    holes = (out.detach() == 0)
    assert all(int(h.sum()) == 2 * 5 * 6 for h in holes)  # half of each side, every channel
    assert len({tuple(h.nonzero()[0].tolist()) for h in holes}) > 1  # placed per sample
    out.sum().backward()
    assert torch.equal(x.grad == 0, holes)
    assert all(int(h.sum()) == 2 * 3 * 3 for h in differentiable_view("cutout:3")(x.detach()) == 0)


def test_differentiable_view_flips_and_shifts_each_sample():
    x = torch.rand(16, 2, 6, 7, requires_grad=True)
    out = differentiable_view("crop:2", seed=3)(x)
    assert out.shape == x.shape
    for sample, moved in zip(x.detach(), out.detach()):
        padded = torch.nn.functional.pad(sample, [2, 2, 2, 2])
        windows = [padded[:, 2 - a : 8 - a, 2 - b : 9 - b] for a in range(-2, 3) for b in range(-2, 3)]
        assert any(torch.equal(moved, w) for w in windows)  # an integer shift of up to 2 with zero fill
    assert len({tuple(torch.nonzero(o[0] == 0).flatten().tolist()) for o in out.detach()}) > 1  # per sample
    out.sum().backward()
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and x.grad.sum() > 0  # values moved, gradients follow
    assert torch.equal(differentiable_view("crop:2", seed=3)(x), out)  # the seed fixes the draws
    volume = torch.rand(3, 1, 4, 5, 6)
    assert torch.equal(differentiable_view("flip:1")(volume), volume.flip((2, 3, 4)))
    with pytest.raises(ValueError, match="probability"):
        differentiable_view("flip:0")


def test_markdown_table():
    text = markdown_table([{"a": 0.12345, "b": None}, {"a": "x", "b": 3}], ["a", "b"], ["A", "B"])
    assert text.splitlines() == ["| A | B |", "|---|---|", "| 0.123 | – |", "| x | 3 |"]


def test_plots(tmp_path):
    clean = torch.rand(3, 3, 16, 16)
    prot = clean.clone()
    prot[:, :, 2, 3] = 1.0
    assert _is_png(plot_image_grid(clean, prot, None, tmp_path / "grid.png", title="t"))
    vol = torch.rand(2, 1, 8, 8, 8)
    assert _is_png(plot_image_grid(vol, vol.clamp(0.1, 1), vol > 0.5, tmp_path / "grid3d.png"))
    assert _is_png(plot_sweep({"a": [(0.1, 0.5), (0.05, 0.7)]}, tmp_path / "k.png", "k", "accuracy"))


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    data = root / "data.npz"
    arrays = make_medmnist(data, n=40, shape=(12, 12), num_classes=3)
    ckpt = root / "salm.pt"
    fast = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--quiet"]
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--k", "0.1", "--eps", "20/255", *fast]) == 0
    return root, data, arrays, ckpt


def test_evaluate_cli_writes_report_summary_and_curves(tiny_npz, capsys):
    root, data, _, _ = tiny_npz
    out = root / "report"
    args = ["evaluate", "--train", str(data), "--test", str(data), "--epochs", "2", "--batch-size", "16", "--out",
            str(out), "--countermeasure", "median,flip", "--no-flips", "--optimizer", "sgd", "--lr", "0.01", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and len(report["history"]) == 2
    assert report["recipe"]["optimizer"] == "sgd" and report["recipe"]["flips"] is False
    assert report["countermeasures"] == ["median:3", "flip:0.5"] and report["test_n"] == 10
    assert "| final |" in (out / "summary.md").read_text()
    assert _is_png(out / "learning_curves.png")
    assert "countermeasures: median:3, flip:0.5" in capsys.readouterr().out


def test_evaluate_cli_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(6):
                img = rng.integers(0, 100, (12, 12)) + (100 if label == "b" else 0)
                Image.fromarray(img.astype(np.uint8)).save(tmp_path / split / label / f"{i}.png")
    out = tmp_path / "report"
    assert main(["evaluate", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--epochs", "1",
                 "--victim", "efficientnet-b0", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    # no validation split in a class folder: the attacker holds out a stratified 10% (one image per class here)
    assert report["train_n"] == 10 and report["validation"] == {"protected_val": 2}
    assert report["release_splits"] == {"class folder": 12}
    assert report["test_n"] == 12 and report["recipe"]["network"] == "efficientnet-b0"
    assert report["selected_by"] == "protected_val" and report["selected_epoch"] == 1


def test_evaluate_cli_bad_countermeasure(tiny_npz, capsys):
    root, data, _, _ = tiny_npz
    assert main(["evaluate", "--train", str(data), "--test", str(data), "--out", str(root / "bad"),
                 "--countermeasure", "sharpen", "--quiet"]) == 2
    assert "sharpen" in capsys.readouterr().err and not (root / "bad" / "report.json").exists()


def _changed(a, b):
    return (a.astype(int) != b.astype(int)).reshape(len(a), -1)


@pytest.mark.parametrize("method", ["random-noise", "ops", "em"])
def test_baseline_cli(tiny_npz, method, capsys):
    root, data, arrays, ckpt = tiny_npz
    out = root / f"{method}.npz"
    extra = ["--checkpoint", str(ckpt)] if method == "random-noise" else []
    assert main(["baseline", "--method", method, "--data", str(data), "--out", str(out), "--eps", "8/255",
                 "--overwrite", "--quiet", *extra]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["protect_seconds"] >= 0 and report["method"] == method
    with np.load(out) as f:
        prot = {k: f[k] for k in f.files}
    clean = arrays["train_images"]
    diff = np.abs(prot["train_images"].astype(int) - clean.astype(int))
    np.testing.assert_array_equal(prot["test_images"], arrays["test_images"])
    if method == "ops":
        assert (_changed(prot["train_images"], clean).sum(1) <= 1).all()
    else:
        assert diff.max() <= math.ceil(8 / 255 * 255)
    if method == "random-noise":  # confined to SALM's k = 10% mask
        assert (_changed(prot["train_images"], clean).sum(1) <= round(0.1 * 144)).all()


def test_baseline_random_noise_needs_checkpoint(tiny_npz, capsys):
    root, data, _, _ = tiny_npz
    assert main(["baseline", "--method", "random-noise", "--data", str(data), "--out", str(root / "x.npz")]) == 2
    assert "--checkpoint" in capsys.readouterr().err and not (root / "x.npz").exists()


def test_protect_selected_classes_and_fraction(tiny_npz):
    root, data, arrays, ckpt = tiny_npz
    clean, labels = arrays["train_images"], arrays["train_labels"].reshape(-1)
    out = root / "classes.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--classes", "0", "2",
                 "--quiet"]) == 0
    with np.load(out) as f:
        changed = _changed(f["train_images"], clean).any(1)
    assert not changed[labels == 1].any() and changed[labels != 1].mean() > 0.9
    out = root / "fraction.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--fraction", "0.5",
                 "--quiet"]) == 0
    with np.load(out) as f:
        changed = _changed(f["train_images"], clean).any(1)
    for c in range(3):  # 40 images, classes of 14/13/13: round(0.5 * n) protected per class at most
        assert changed[labels == c].sum() <= round(0.5 * (labels == c).sum())
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(root / "f.npz"),
                 "--fraction", "1.5", "--quiet"]) == 2
