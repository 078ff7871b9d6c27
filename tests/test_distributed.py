"""SALM under torchrun: 2 processes on the CPU with the gloo backend, against one process.

Each torchrun costs about 20 s here (process start and imports), so the default suite keeps the folder release and
the failure test; ``python -m pytest -q -m slow tests/test_distributed.py`` runs the training and bundle tests too.
"""

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.distributed as dist
from conftest import make_medmnist
from test_bundle import make_dicom, make_png

from monai_salm.cli import main
from monai_salm.engines import load_protection

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "salm_protect"
FAST = ["--epochs", "1", "--warmup-epochs", "0", "--quiet", "--threads", "1"]


def torchrun(nproc: int, *args: str, module: str = "monai_salm.cli") -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` on ``nproc`` local processes (torchrun, gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def errors(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("monai-salm: error:")]


def same_tree(a: Path, b: Path, skip=("manifest.csv",)) -> list[str]:
    """Relative paths of the files under ``a``, after checking that ``b`` holds byte-identical files."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    match, mismatch, bad = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not bad, (mismatch, bad)
    return files


def manifest_rows(folder: Path) -> list[list[str]]:
    """The manifest with the output column made relative to ``folder``."""
    rows = [line.split(",") for line in (folder / "manifest.csv").read_text().splitlines()]
    for row in rows[1:]:
        row[1] = str(Path(row[1]).relative_to(folder))
    return rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_ckpt")
    make_medmnist(root / "data.npz", n=64, shape=(16, 16), num_classes=2)
    assert main(["train", "--data", str(root / "data.npz"), "--out", str(root / "salm.pt"), "--batch-size", "16",
                 *FAST]) == 0
    return root / "salm.pt"


@pytest.mark.slow
def test_training_matches_one_process(tmp_path):
    """Same global batch, seed and data: the 2-process checkpoint is the 1-process one up to float rounding.

    Every process gets every other sample of each global batch and DDP averages the gradients, so the updates are
    the same sums taken in another order. The surrogate here is the ViT (layer norm); with batch-norm surrogates
    (the default ResNet-18) the runs differ by design, since on the CPU each process normalises with its own half
    of the batch (``SyncBatchNorm`` is GPU-only). Measured for one epoch: class score maps and surrogate agree to
    about 1e-7, the generator to about 2e-4, because Adam divides tiny gradients by their own tiny running scale
    and so magnifies rounding; over more epochs the difference keeps growing the way any reordering of float sums
    does, so only one epoch is compared.
    """
    data = tmp_path / "data.npz"
    make_medmnist(data, n=64, shape=(16, 16), num_classes=2)
    args = ["train", "--data", data, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--surrogate",
            "vit", "--quiet", "--threads", "1", "--seed", "3"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert main([str(a) for a in args + ["--out", one]]) == 0
    res = torchrun(2, *args, "--out", two)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["processes"] == 2  # one summary, from rank 0
    s1, g1, f1, c1 = load_protection(one)
    s2, g2, f2, c2 = load_protection(two)
    assert s1 == s2
    torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-7)  # class score maps summed over the two shards
    for a, b in zip(f1.state_dict().values(), f2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(g1.state_dict().items(), g2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3, msg=name)


@pytest.mark.slow
def test_refresh_samples_subset_matches_one_process(tmp_path):
    """The refresh subset is chosen from the labels gathered over both processes and sharded between them, so the
    2-process class score maps after refreshes from the subset are the 1-process ones up to the growing rounding
    difference described above (measured after 3 epochs: 1.4e-5 on scores of up to 4e-3)."""
    data = tmp_path / "data.npz"
    make_medmnist(data, n=64, shape=(16, 16), num_classes=3)
    args = ["train", "--data", data, "--epochs", "2", "--stop-accuracy", "1.0", "--batch-size", "16", "--surrogate",
            "vit", "--refresh-samples", "20", "--quiet", "--threads", "1", "--seed", "3"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert main([str(a) for a in args + ["--out", one]]) == 0
    res = torchrun(2, *args, "--out", two)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.testing.assert_close(load_protection(two)[3], load_protection(one)[3], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_batchnorm_surrogate_trains_loads_and_protects(tmp_path):
    data = tmp_path / "data.npz"
    make_medmnist(data, n=64, shape=(16, 16), num_classes=3)
    ckpt = tmp_path / "salm.pt"
    res = torchrun(2, "train", "--data", data, "--out", ckpt, "--batch-size", "16", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"checkpoint"') == 1  # rank 0 reports and writes, once
    settings, _, surrogate, scores = load_protection(ckpt)
    assert settings.num_classes == 3 and scores.shape == (3, 16, 16) and surrogate is not None
    out = tmp_path / "release.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    clean, protected = np.load(data), np.load(out)
    diff = np.abs(protected["train_images"].astype(int) - clean["train_images"].astype(int))
    assert 0 < diff.max() <= round(settings.epsilon * 255)


@pytest.mark.slow
def test_batch_must_split_evenly(tmp_path):
    data = tmp_path / "data.npz"
    make_medmnist(data, n=16, shape=(16, 16))
    res = torchrun(2, "train", "--data", data, "--out", tmp_path / "x.pt", "--batch-size", "5", *FAST)
    assert res.returncode != 0 and not (tmp_path / "x.pt").exists()
    assert any("divisible by the number of processes (2)" in line for line in errors(res))


@pytest.mark.slow
def test_npz_release_is_byte_identical(tmp_path, checkpoint):
    data = tmp_path / "data.npz"
    make_medmnist(data, n=600, shape=(16, 16), num_classes=2)  # 3 batches of 256 in train: both ranks work
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert main(["protect", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(one), "--quiet"]) == 0
    res = torchrun(2, "protect", "--checkpoint", checkpoint, "--data", data, "--out", two, "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()


def test_folder_release_is_byte_identical_dicom_included(tmp_path, checkpoint):
    data = make_png(tmp_path / "data" / "png", n=3)
    make_dicom(tmp_path / "data" / "dcm", n=3)
    for folder in ("benign", "malignant"):  # one class folder layout: PNGs and DICOM slices side by side
        for f in (tmp_path / "data" / "dcm" / ("normal" if folder == "benign" else "nodule")).iterdir():
            ds = pydicom.dcmread(f)  # values 0..255, the range of the 8-bit checkpoint
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
            ds.set_pixel_data(np.clip(ds.pixel_array // 8 + 128, 0, 255).astype(np.int16), "MONOCHROME2", 16)
            ds.save_as(data / folder / f.name, enforce_file_format=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = tmp_path / "a" / "release", tmp_path / "b" / "release"
    assert main(["protect", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(one), "--quiet"]) == 0
    res = torchrun(2, "protect", "--checkpoint", checkpoint, "--data", data, "--out", two, "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    files = same_tree(one, two)
    assert len(files) == 13 and manifest_rows(one) == manifest_rows(two)  # and the release record; one manifest
    uids = {pydicom.dcmread(two / f).SOPInstanceUID for f in files if f.endswith(".dcm")}
    originals = {pydicom.dcmread(data / f).SOPInstanceUID for f in files if f.endswith(".dcm")}
    assert len(uids) == 6 and not uids & originals  # new, unique and repeatable


def test_a_failing_rank_stops_every_rank_and_leaves_nothing(tmp_path, checkpoint):
    data = make_png(tmp_path / "data", n=3)
    good = (data / "malignant" / "img0.png").read_bytes()
    (data / "malignant" / "img2.png").write_bytes(good[: len(good) // 2])  # read on one rank only
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "release"
    res = torchrun(2, "protect", "--checkpoint", checkpoint, "--data", data, "--out", out, "--quiet")
    assert res.returncode != 0
    lines = errors(res)
    assert len(lines) == 1 and "img2.png" in lines[0], res.stderr[-3000:]  # said once, naming the file
    assert not out.exists() or not any(out.rglob("*"))  # the other rank's copies are removed too
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_bundle_multi_gpu_configs_on_cpu(tmp_path):
    """The model-zoo way: ``torchrun -m monai.bundle run`` with the multi-GPU overrides (gloo here)."""
    pytest.importorskip("fire")
    data = make_png(tmp_path / "data", n=4)
    bundle = tmp_path / "bundle"
    common = ["--meta_file", BUNDLE / "configs" / "metadata.json", "--logging_file", BUNDLE / "configs" / "logging.conf",
              "--bundle_root", bundle, "--dataset_dir", data]
    train = ["run", "--config_file", f"['{BUNDLE}/configs/train.json','{BUNDLE}/configs/multi_gpu_train.json']",
             *common, "--max_epochs", "1", "--batch_size", "4", "--warmup_epochs", "0", "--generator_channels",
             "[4,8,16]"]
    res = torchrun(2, *train, module="monai.bundle")
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_protection(bundle / "models" / "model.pt")[0].num_classes == 2
    outs = []
    for nproc, name in ((2, "two"), (1, "one")):
        configs = [f"{BUNDLE}/configs/inference.json"] + ([f"{BUNDLE}/configs/multi_gpu_inference.json"]
                                                          if nproc > 1 else [])
        (tmp_path / name).mkdir()
        out = tmp_path / name / "protected"
        res = torchrun(nproc, "run", "--config_file", str(configs), *common, "--output_dir", out, module="monai.bundle")
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(out)
    assert len(same_tree(*outs)) == 9 and manifest_rows(outs[0]) == manifest_rows(outs[1])


def test_distributed_helpers_without_a_process_group():
    from monai_salm.engines.distributed import all_reduce, gather, rank, unwrap, world_size

    t = torch.ones(2)
    assert world_size() == 1 and rank() == 0 and all_reduce(t) is t and gather("x") == ["x"]
    net = torch.nn.Linear(2, 2)
    assert unwrap(net) is net
