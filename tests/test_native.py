"""Native resolution: one checkpoint trained on a working grid protects scans of any size at their own size."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PIL

from monai_salm.api import protect_tensor
from monai_salm.cli import main
from monai_salm.engines import SALMSettings, load_protection, protection_transforms, save_protection
from monai_salm.io import read_manifest
from monai_salm.networks import NoiseGenerator, build_classifier
from monai_salm.transforms.functional import perturb, resize_images, to_grid, topk_mask
from monai_salm.workflows import load_training_arrays

CLI_FAST = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--quiet"]
EPS = 20 / 255


def _class_checkpoint(path, size, mask_mode="class", block=2, num_classes=2):
    """A random (untrained) checkpoint: enough to check where and how much the release changes."""
    torch.manual_seed(0)
    dims = len(size)
    generator = NoiseGenerator(dims, 1, num_classes, channels=(4, 8), strides=(2,), pattern_size=size,
                               pattern_cell=block)
    surrogate = build_classifier("resnet18", dims, 1, num_classes)
    settings = SALMSettings(spatial_dims=dims, in_channels=1, num_classes=num_classes, image_size=tuple(size),
                            epsilon=EPS, k=0.1, mask_mode=mask_mode,
                            generator={"channels": [4, 8], "strides": [2], "pattern_size": list(size),
                                       "pattern_cell": block})
    scores = torch.rand(num_classes, *size) if mask_mode == "class" else None
    return save_protection(path, settings, generator, surrogate, scores)


def test_to_grid_and_resize():
    work = torch.zeros(1, 1, 4, 4)
    work[0, 0, 1, 2] = 1
    native = to_grid(work, (8, 8))
    assert native.shape == (1, 1, 8, 8) and native.sum() == 4 and native[0, 0, 2:4, 4:6].eq(1).all()
    assert to_grid(work, (4, 4)) is work
    assert to_grid(work.bool(), (5, 7)).dtype == torch.bool
    x = torch.rand(2, 3, 12, 10, 8)
    assert resize_images(x, (6, 5, 4)).shape == (2, 3, 6, 5, 4)  # area (shrink)
    assert resize_images(x, (24, 5, 4)).shape == (2, 3, 24, 5, 4)  # linear (mixed)
    assert torch.allclose(resize_images(x, (6, 5, 4)), torch.nn.functional.avg_pool3d(x, 2))
    with pytest.raises(ValueError, match="working grid of 2 dimension"):
        resize_images(x, (6, 5))


@pytest.mark.parametrize("native", [(16, 16), (37, 23), (64, 48), (9, 7)])
def test_perturb_on_a_working_grid(native):
    """The change is made on the working grid and mapped by nearest neighbour: zero outside, at most eps inside."""
    torch.manual_seed(0)
    work = (16, 16)
    x = torch.rand(3, 2, *native)
    mask = topk_mask(torch.rand(3, *work), 0.1)
    raw = torch.randn(3, 2, *work) * 3
    out = perturb(x, mask, raw, EPS)
    inside = to_grid(mask.bool(), native).expand_as(x)
    assert out.shape == x.shape
    assert torch.equal(out[~inside], x[~inside])
    assert (out - x).abs().max() <= EPS + 1e-6 and out.min() >= 0 and out.max() <= 1
    expected = (x + to_grid(mask * EPS * torch.tanh(raw), native)).clamp(0, 1)
    assert torch.equal(out[inside], expected[inside])
    if native == work:  # same grid: the plain SALM formula
        assert torch.equal(out, torch.where(mask.bool().expand_as(x), (x + mask * EPS * torch.tanh(raw)).clamp(0, 1), x))


@pytest.mark.parametrize("size, native", [((16, 16), (40, 28)), ((8, 8, 8), (12, 20, 9))])
@pytest.mark.parametrize("mask_mode", ["class", "sample"])
def test_protect_tensor_any_size(tmp_path, size, native, mask_mode):
    settings, generator, surrogate, scores = load_protection(_class_checkpoint(tmp_path / "c.pt", size, mask_mode))
    x = torch.rand(2, 1, *native)
    y = torch.tensor([0, 1])
    out, masks = protect_tensor(x, y, settings, generator, surrogate, scores)
    assert out.shape == x.shape and masks.shape == (2, 1, *native)
    assert torch.equal(out[~masks.expand_as(x)], x[~masks.expand_as(x)])
    assert (out - x).abs().max() <= EPS + 1e-6
    # the native mask is the working-grid mask mapped onto the image's grid
    if mask_mode == "class":
        expected = to_grid(topk_mask(scores[y], settings.k).bool(), native)
        assert torch.equal(masks, expected)
    assert 0.05 < masks.float().mean() < 0.2  # about k = 0.1 of the native positions


@pytest.mark.parametrize("size, native", [((16, 16), (30, 44)), ((8, 8, 8), (10, 13, 7))])
def test_protection_transforms_any_size_match_protect_tensor(tmp_path, size, native):
    ckpt = _class_checkpoint(tmp_path / "c.pt", size)
    settings, generator, surrogate, scores = load_protection(ckpt)
    transforms = protection_transforms(ckpt)
    x = torch.rand(1, *native)
    out = transforms({"image": x, "label": 1})
    assert out["image"].shape == x.shape and out["salm_mask"].shape == (1, *native)
    expected, mask = protect_tensor(x[None], torch.tensor([1]), settings, generator, surrogate, scores)
    assert torch.equal(out["image"], expected[0]) and torch.equal(out["salm_mask"].bool(), mask[0])


def test_slim_checkpoint_protects_identically(tmp_path, capsys):
    ckpt = _class_checkpoint(tmp_path / "full.pt", (16, 16))
    slim = tmp_path / "release.pt"
    assert main(["slim", "--checkpoint", str(ckpt), "--out", str(slim)]) == 0
    assert slim.stat().st_size < 10e6 and slim.stat().st_size < ckpt.stat().st_size / 5
    full, lean = load_protection(ckpt), load_protection(slim)
    assert lean[2] is None
    x, y = torch.rand(3, 1, 21, 35), torch.tensor([0, 1, 1])
    assert torch.equal(protect_tensor(x, y, *full)[0], protect_tensor(x, y, *lean)[0])
    assert main(["slim", "--checkpoint", str(ckpt), "--out", str(slim)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    sample = _class_checkpoint(tmp_path / "sample.pt", (16, 16), mask_mode="sample")
    assert main(["slim", "--checkpoint", str(sample), "--out", str(tmp_path / "s.pt")]) == 2
    assert "need the surrogate" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()
    with pytest.raises(ValueError, match="need the surrogate"):
        protect_tensor(x, y, *load_protection(sample)[:2], None, None)


def _mixed_pngs(root, sizes=((16, 16), (24, 20), (13, 31))):
    rng = np.random.default_rng(0)
    for label, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            a = np.clip(rng.integers(0, 120, (h, w)) + 100 * label, 0, 255).astype(np.uint8)
            PIL.fromarray(a).save(root / name / f"img{i}.png")
    return root


def test_cli_mixed_size_folder(tmp_path, capsys):
    data = _mixed_pngs(tmp_path / "data")
    ckpt = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), *CLI_FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "benign/img1.png: image size (20, 24) differs from (16, 16) of" in err and "--work-size" in err
    assert len(err.splitlines()) == 1 and not ckpt.exists()
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--work-size", "16", *CLI_FAST]) == 0
    assert load_protection(ckpt)[0].image_size == (16, 16)
    out = tmp_path / "out"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    eps_units = 20  # 20/255 of 0-255: the stored units
    for src in sorted(data.rglob("*.png")):
        a = np.asarray(PIL.open(src)).astype(int)
        b = np.asarray(PIL.open(out / src.relative_to(data))).astype(int)
        assert a.shape == b.shape  # released at its own size
        assert 0 < np.abs(b - a).max() <= eps_units
        assert (b != a).mean() <= 0.2
    assert len(read_manifest(out / "manifest.csv")) == 6
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x.pt"), "--work-size", "16,a"]) == 2
    assert "work size must be" in capsys.readouterr().err


def test_work_size_training_arrays_3d_anisotropic(tmp_path):
    """Volumes of different shapes and spacings read onto one grid; each is released at its own shape and affine."""
    rng = np.random.default_rng(0)
    shapes = [((20, 16, 8), (0.8, 0.8, 2.5)), ((12, 12, 12), (1.0, 1.0, 1.0)), ((9, 15, 5), (1.2, 0.7, 3.0))]
    for label, name in enumerate(("a", "b")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i, (shape, spacing) in enumerate(shapes):
            vol = (rng.normal(0, 200, shape) + 300 * label).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, np.diag([*spacing, 1.0])), tmp_path / "data" / name / f"v{i}.nii.gz")
    data = load_training_arrays(tmp_path / "data", work_size="8,8,6")
    assert data.images.shape == (6, 1, 8, 8, 6) and data.images.min() >= 0 and data.images.max() <= 1
    ckpt = tmp_path / "salm.pt"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(ckpt), "--work-size", "8,8,6",
                 "--block", "2", *CLI_FAST]) == 0
    out = tmp_path / "out"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--quiet"]) == 0
    for src in sorted((tmp_path / "data").rglob("*.nii.gz")):
        a, b = nib.load(src), nib.load(out / src.relative_to(tmp_path / "data"))
        assert b.shape == a.shape and np.array_equal(b.affine, a.affine)
        diff = np.abs(b.get_fdata() - a.get_fdata())
        assert 0 < (diff > 0).mean() <= 0.2


def test_evaluate_at_the_attackers_input_size(tmp_path):
    """The victim trains and tests at its own size; a release of mixed native sizes needs one."""
    data = _mixed_pngs(tmp_path / "data", sizes=((16, 16), (24, 20), (13, 31), (18, 18), (16, 22)))
    out = tmp_path / "report"
    args = ["evaluate", "--train", str(data), "--test", str(data), "--epochs", "1", "--victim", "vit",
            "--out", str(out), "--quiet"]
    assert main(args) == 2 and not out.exists()
    assert main([*args, "--victim-size", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input_size"] == [8, 8] and report["train_n"] == 10


def test_amp_on_cpu_keeps_the_bounds(tmp_path):
    """Mixed precision (bfloat16 autocast on CPU) trains and releases; the perturbation stays float32-exact."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 16, 16), torch.randint(0, 2, (16,))
    from monai_salm.api import train_salm

    trainer, settings = train_salm(x, y, 2, epochs=1, warmup_epochs=0, batch_size=8, amp=True)
    assert trainer.amp and not trainer.surrogate_scaler.is_enabled()  # no gradient scaler for bfloat16
    out, masks = protect_tensor(x, y, settings, trainer.generator, trainer.surrogate, trainer.class_scores, amp=True)
    assert out.dtype == torch.float32 and torch.equal(out[~masks.expand_as(x)], x[~masks.expand_as(x)])
    assert (out - x).abs().max() <= settings.epsilon + 1e-7
    plain, _ = protect_tensor(x, y, settings, trainer.generator, trainer.surrogate, trainer.class_scores, amp=False)
    assert (out - plain).abs().max() <= settings.epsilon  # same masks; the noise differs only by precision
    assert torch.equal(masks, protect_tensor(x, y, settings, trainer.generator, None, trainer.class_scores)[1])
