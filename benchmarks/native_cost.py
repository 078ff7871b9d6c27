"""Cost of SALM on this machine: release and training against the floor, and release cost and memory against size.

Every table prints medians of repeated runs measured side by side in one process (or, for peak memory, one fresh
process per case, so each peak is its own). Ratios, not absolute times, are what carry over to other machines.

    python benchmarks/native_cost.py floor            # release (per mode) and training per image vs the floor
    python benchmarks/native_cost.py train_batch      # training per image at the default batch (128) vs the floor
    python benchmarks/native_cost.py refresh          # the same, with the mask refresh from a subset or only once
    python benchmarks/native_cost.py sizes            # class-mask release time and peak memory against native size
    python benchmarks/native_cost.py files            # 512x512x300 CT (NIfTI, DICOM series), 2048^2 radiograph
    python benchmarks/native_cost.py train_sizes      # training time/memory at a fixed working grid vs native size
    python benchmarks/native_cost.py decode           # decoding a NIfTI folder once vs once per epoch
    python benchmarks/native_cost.py reorder          # NIfTI volume to C order: tiled copy vs np.ascontiguousarray
    python benchmarks/native_cost.py em --data ../shared/data/breastmnist_28.npz   # EM's time vs SALM's
    python benchmarks/native_cost.py all --json docs/figures/native_cost.json      # everything; plots with --plot
    python benchmarks/native_cost.py floor sizes --device cuda                      # the CUDA path (AMP on)

The floor is what any per-image method pays at least: one surrogate forward+backward plus one generator forward
per image, at the same size and batch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_salm.api import DEFAULTS, protect_tensor, surrogate_optimizer, train_salm
from monai_salm.engines import SALMSettings, load_protection, save_protection
from monai_salm.networks import NoiseGenerator, build_classifier
from monai_salm.transforms.functional import call_generator

SIZES_2D = [28, 64, 128, 256, 512, 1024, 2048]
SIZES_3D = [(28, 28, 28), (64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 300)]
#: largest native size (positions) at which the sizes table also times the floor
FLOOR_NATIVE_MAX = 512 * 512


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in rounds (each function once per round), so that a change in the
    machine's load during the run affects all of them alike and their ratios stay comparable."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, not inherited from a forking parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(path: Path, work: tuple[int, ...], mask_mode: str = "class", num_classes: int = 2,
                    pattern: str = "learned", image_term: bool = True) -> Path:
    """A checkpoint with the default networks at the working grid ``work`` (untrained: cost does not depend on it)."""
    dims = len(work)
    generator_kwargs = {"pattern_size": list(work), "pattern_cell": DEFAULTS["block"], "pattern_kind": pattern,
                        "image_term": image_term}
    generator = NoiseGenerator(dims, 1, num_classes, **generator_kwargs)
    surrogate = build_classifier("resnet18", dims, 1, num_classes)
    settings = SALMSettings(spatial_dims=dims, in_channels=1, num_classes=num_classes, image_size=work,
                            epsilon=DEFAULTS["epsilon"], k=DEFAULTS["k"], mask_mode=mask_mode,
                            intensity={"kind": "window", "lo": -1000.0, "hi": 1000.0, "clip": True},
                            generator=generator_kwargs)
    scores = torch.rand(num_classes, *work) if mask_mode == "class" else None
    return save_protection(path, settings, generator, surrogate, scores)


def _floor_fn(surrogate, generator, x, y):
    """One surrogate forward+backward (to the input) and one generator forward on the batch ``x``."""
    def floor():
        xx = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(surrogate(xx), y)
        torch.autograd.grad(loss, xx)
        with torch.no_grad():
            call_generator(generator, x, y)

    return floor


def _supervised_step_fn(surrogate, x, y):
    """One ordinary training step of (a copy of) the surrogate on the batch ``x``, with SALM's surrogate optimizer:
    forward, backward to the weights, optimizer step. What training the classifier alone costs per batch."""
    net = copy.deepcopy(surrogate).train()
    optimizer = surrogate_optimizer(net.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    return step


def _training_fns(size, batch: int, train_images: int, trainings, device: str) -> dict:
    """One 1-epoch and one 2-epoch training per case, so one epoch's cost is the difference: the setup, the first
    masks and the final mask refresh are paid once per run, not per epoch. The stop rule is off, so the 2-epoch run
    trains both epochs."""
    images, labels = torch.rand(train_images, 1, *size), torch.randint(0, 2, (train_images,))
    return {f"{name}{epochs}": functools.partial(
        train_salm, images, labels, 2, epochs=epochs, warmup_epochs=0, batch_size=batch,
        epsilon=DEFAULTS["epsilon"], device=device, stop_accuracy=None, **options)
        for name, options in trainings for epochs in (1, 2)}


def _training_columns(row: dict, seconds: dict, trainings, train_images: int, floor_s: float) -> None:
    for name, _ in trainings:
        epoch_s = seconds[f"{name}2"] - seconds[f"{name}1"]
        row[f"{name}_ms_per_image_epoch"] = 1000 * epoch_s / train_images
        row[f"{name}_x_floor"] = epoch_s / train_images / floor_s


def floor_table(sizes=((28, 28), (64, 64), (28, 28, 28)), batch: int = 16, train_images: int = 32,
                device: str = "cpu") -> list[dict]:
    """Release per mask mode and training per image-epoch, as ratios to the floor, at the working grid's size."""
    rows = []
    for size in sizes:
        tmp = Path(tempfile.mkdtemp())
        x = torch.rand(batch, 1, *size, device=device)
        y = torch.randint(0, 2, (batch,), device=device)
        loaded = {mode: load_protection(make_checkpoint(tmp / f"{mode}.pt", size, mode), device)
                  for mode in ("class", "sample")}
        loaded["class_texture"] = load_protection(make_checkpoint(tmp / "texture.pt", size, "class", pattern="texture"),
                                                  device)
        loaded["class_pattern_only"] = load_protection(
            make_checkpoint(tmp / "pattern_only.pt", size, "class", image_term=False), device)
        _, generator, surrogate, _ = loaded["sample"]
        fns = {"floor": _floor_fn(surrogate, generator, x, y)}
        for mode, (s, g, sur, scores) in loaded.items():
            fns[f"release_{mode}"] = functools.partial(protect_tensor, x, y, s, g, sur, scores, batch_size=batch,
                                                       device=device)
        trainings = (("train", {}), ("train_texture", {"pattern": "texture"}),
                     ("train_pattern_only", {"image_term": False}), ("train_plain", {"robust_to": None}),
                     ("train_joint", {"joint_step": True}))
        fns.update(_training_fns(size, batch, train_images, trainings, device))
        seconds = _device_rounds(fns, device, repeats=5)
        row, floor_s = _floor_row(size, batch, seconds)
        for mode in loaded:
            row[f"release_{mode}_ms"] = 1000 * seconds[f"release_{mode}"] / batch
            row[f"release_{mode}_x_floor"] = seconds[f"release_{mode}"] / batch / floor_s
        _training_columns(row, seconds, trainings, train_images, floor_s)
        rows.append(row)
        print_row(row)
    return rows


#: the refresh table's trainings: every image scored at each epoch's mask refresh (the default), a subset of 64
#: (``refresh_samples``), and no refresh after the first (the limit of a fixed subset as the data grow)
REFRESH_TRAININGS = (("train", {}), ("train_refresh64", {"refresh_samples": 64}),
                     ("train_refresh_once", {"mask_refresh": 0}))


def train_batch_table(sizes=((28, 28), (64, 64), (28, 28, 28)), batch: int = DEFAULTS["batch_size"],
                      repeats: int = 3, device: str = "cpu",
                      trainings=(("train", {}), ("train_joint", {"joint_step": True}))) -> list[dict]:
    """Training per image-epoch at the default batch (two batches per epoch), per training (the default and the joint
    step unless given), against the floor at that batch: the per-batch costs (optimizer steps, engine events) are
    shared by as many images as in a real training, where the floor table's batch of 16 shares them by 16. Also
    against one ordinary training step of the surrogate per image (its backward computes weight gradients, which
    the floor's does not)."""
    rows = []
    for size in sizes:
        _, generator, surrogate, _ = load_protection(
            make_checkpoint(Path(tempfile.mkdtemp()) / "sample.pt", size, "sample"), device)
        x = torch.rand(batch, 1, *size, device=device)
        y = torch.randint(0, 2, (batch,), device=device)
        fns = {"floor": _floor_fn(surrogate, generator, x, y), "supervised": _supervised_step_fn(surrogate, x, y)}
        fns.update(_training_fns(size, batch, 2 * batch, trainings, device))
        seconds = _device_rounds(fns, device, repeats=repeats, warmup=0)
        row, floor_s = _floor_row(size, batch, seconds)
        row["supervised_ms"] = 1000 * seconds["supervised"] / batch
        row["supervised_x_floor"] = seconds["supervised"] / batch / floor_s
        _training_columns(row, seconds, trainings, 2 * batch, floor_s)
        for name, _ in trainings:
            row[f"{name}_x_supervised"] = row[f"{name}_ms_per_image_epoch"] / row["supervised_ms"]
        rows.append(row)
        print_row(row)
    return rows


def _device_rounds(fns: dict, device: str, repeats: int, warmup: int = 1) -> dict:
    """``interleaved_median_seconds`` of ``fns``, each call waiting for the GPU's queued work on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def synced(fn):
        def run():
            fn()
            sync()
        return run

    return interleaved_median_seconds({name: synced(fn) for name, fn in fns.items()}, repeats=repeats, warmup=warmup)


def _floor_row(size: tuple[int, ...], batch: int, seconds: dict) -> tuple[dict, float]:
    """A table row started with the floor's time per image, and that time in seconds."""
    floor_s = seconds["floor"] / batch
    return {"size": "x".join(map(str, size)), "batch": batch, "floor_ms": 1000 * floor_s}, floor_s


def child(task: str, arg: str, device: str = "cpu") -> dict:
    """Run one memory-measured case in a fresh interpreter; returns its JSON line."""
    out = subprocess.run([sys.executable, __file__, "_child", task, arg, device], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return {"case": f"{task} {arg}", "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _release_case(native: tuple[int, ...], work: tuple[int, ...], device: str = "cpu", repeats: int = 3) -> dict:
    tmp = Path(tempfile.mkdtemp())
    settings, generator, surrogate, scores = load_protection(make_checkpoint(tmp / "c.pt", work), device)
    x = torch.rand(1, 1, *native)
    y = torch.tensor([1])
    base = peak_rss_mb()
    seconds = median_seconds(
        lambda: protect_tensor(x, y, settings, generator, None, scores, batch_size=1, device=device), repeats=repeats)
    row = {"native": "x".join(map(str, native)), "work": "x".join(map(str, work)), "release_s": seconds,
           "peak_rss_mb": peak_rss_mb(), "input_mb": x.numel() * 4 / 2**20, "baseline_rss_mb": base}
    if np.prod(native) <= FLOOR_NATIVE_MAX:  # what a per-image method working at the native size pays at least
        floor_generator = NoiseGenerator(len(native), 1, 2).to(device).eval()
        surrogate = build_classifier("resnet18", len(native), 1, 2).to(device).eval()

        def floor():
            xx = x.to(device).clone().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(surrogate(xx), y.to(device)), xx)
            with torch.no_grad():
                floor_generator(xx.detach(), y.to(device))

        row["floor_native_s"] = median_seconds(floor, repeats=repeats)
        row["release_x_floor_native"] = seconds / row["floor_native_s"]
    return row


def sizes_table(device: str = "cpu") -> list[dict]:
    rows = []
    for s in SIZES_2D:
        rows.append(child("release", f"{s},{s}:64,64", device))
        print_row(rows[-1])
    for s in SIZES_3D:
        rows.append(child("release", f"{','.join(map(str, s))}:32,32,32", device))
        print_row(rows[-1])
    return rows


def _write_ct(root: Path, shape=(512, 512, 300), kind: str = "nifti") -> Path:
    """A synthetic int16 CT-like volume (body ellipse in air) in one class folder, as NIfTI or a DICOM series."""
    rng = np.random.default_rng(0)
    _, yy, xx = np.ogrid[: shape[2], : shape[1], : shape[0]]
    body = ((xx - shape[0] / 2) / (0.4 * shape[0])) ** 2 + ((yy - shape[1] / 2) / (0.3 * shape[1])) ** 2 < 1
    vol = np.where(body, 40, -1000).astype(np.int16).transpose(2, 1, 0)  # (x, y, z)
    vol = np.broadcast_to(vol, shape).copy()
    vol += rng.integers(-20, 20, size=shape, dtype=np.int16)
    folder = root / "data"
    folder.mkdir(parents=True)
    if kind == "nifti":
        import nibabel as nib

        nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.25, 1.0])), folder / "ct.nii.gz")
        return _datalist(folder, "ct.nii.gz")
    else:
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

        series = folder / "series"
        series.mkdir()
        study, series_uid = generate_uid(), generate_uid()
        for z in range(shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(series / f"{z:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series_uid, "CT"
            ds.Rows, ds.Columns = shape[1], shape[0]
            ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.25
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 1.25 * z], [1, 0, 0, 0, 1, 0]
            ds.InstanceNumber = z + 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            ds.PixelData = np.ascontiguousarray(vol[:, :, z].T).tobytes()
            ds.save_as(series / f"{z:04d}.dcm", enforce_file_format=True)
    return _datalist(folder, "series")


def _datalist(folder: Path, image: str) -> Path:
    """A one-image MONAI datalist (class 0 of 2) next to the image."""
    (folder / "datalist.json").write_text(json.dumps({"training": [{"image": image, "label": 0}]}))
    return folder / "datalist.json"


def _write_radiograph(root: Path, size: int = 2048) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "data"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    img = (20000 + 15000 * np.sin(xx / 97.0) * np.cos(yy / 131.0) + rng.normal(0, 500, (size, size))).astype(np.uint16)
    Image.fromarray(img).save(folder / "cxr.png")
    return _datalist(folder, "cxr.png")


def _file_case(kind: str) -> dict:
    from monai_salm.workflows import protect_files

    root = Path(tempfile.mkdtemp())
    if kind == "radiograph":
        data = _write_radiograph(root)
        work = (64, 64)
    else:
        data = _write_ct(root, kind=kind)
        work = (32, 32, 32)
    ckpt = make_checkpoint(root / "c.pt", work)
    base = peak_rss_mb()
    start = time.perf_counter()
    protect_files(ckpt, data, root / "out")
    seconds = time.perf_counter() - start
    return {"case": kind, "protect_s": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base}


def reorder_table(shape=(512, 512, 300)) -> list[dict]:
    """The NIfTI reader's Fortran-to-C float32 copy of a CT volume: tiled (the reader's) against numpy's."""
    from monai_salm.io.utils import c_order_copy

    volume = np.asfortranarray(np.random.default_rng(0).integers(-1000, 1000, shape, dtype=np.int16))
    times = interleaved_median_seconds({
        "np.ascontiguousarray": lambda: np.ascontiguousarray(volume, dtype=np.float32),
        "c_order_copy": lambda: c_order_copy(volume, np.float32),
    })
    row = {"shape": "x".join(map(str, shape)), **{f"{k}_s": v for k, v in times.items()},
           "speedup": times["np.ascontiguousarray"] / times["c_order_copy"]}
    print_row(row)
    return [row]


def files_table() -> list[dict]:
    rows = []
    for kind in ("radiograph", "nifti", "dicom"):
        rows.append(child("file", kind))
        print_row(rows[-1])
    return rows


def _train_case(native: int, work: int = 32, n: int = 16) -> dict:
    """Train one epoch from a class folder of ``n`` PNGs of ``native`` px at a ``work`` px working grid."""
    from PIL import Image

    from monai_salm.cli import main

    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / "data" / str(label)).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (native, native), dtype=np.uint8)).save(
                root / "data" / str(label) / f"{i}.png")
    start = time.perf_counter()
    main(["train", "--data", str(root / "data"), "--out", str(root / "c.pt"), "--work-size", str(work), "--epochs",
          "1", "--warmup-epochs", "0", "--batch-size", "8", "--quiet"])
    return {"native": native, "work": work, "images": n, "train_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb()}


def train_sizes_table() -> list[dict]:
    rows = []
    for native in (64, 256, 1024):
        rows.append(child("train", str(native)))
        print_row(rows[-1])
    return rows


def decode_table(n: int = 16, shape=(96, 96, 64), work: int = 32) -> list[dict]:
    """Decoding a folder of NIfTI volumes once (what training does) against an epoch of training on the decoded grid.

    Training reads every file once into memory on the working grid (as a MONAI ``CacheDataset`` with a full cache
    would); decoding every epoch instead would add the decode pass to each epoch.
    """
    import nibabel as nib

    from monai_salm.workflows import load_training_arrays

    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / str(label)).mkdir()
        for i in range(n // 2):
            vol = (rng.normal(0, 200, shape) + 100 * label).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), root / str(label) / f"v{i}.nii.gz")
    decode = median_seconds(lambda: load_training_arrays(root, "window:-1000:1000", work_size=work), repeats=3,
                            warmup=0)
    data = load_training_arrays(root, "window:-1000:1000", work_size=work)
    epoch = median_seconds(lambda: train_salm(data.images, data.labels, 2, epochs=1, warmup_epochs=0, batch_size=8,
                                              epsilon=DEFAULTS["epsilon"]), repeats=3, warmup=0)
    row = {"files": n, "shape": "x".join(map(str, shape)), "work": work, "decode_s": decode, "epoch_s": epoch,
           "decode_every_epoch_x": (decode + epoch) / epoch}
    print_row(row)
    return [row]


def em_table(data: str, limit: int) -> list[dict]:
    """EM's time to its protection against SALM's (training + release), on the same images."""
    from monai_salm.data import load_npz, split_arrays, to_tensor
    from monai_salm.evaluation.baselines import error_minimizing_noise

    images, labels = split_arrays(load_npz(data), "train")
    x, y = to_tensor(images[:limit]), torch.from_numpy(labels[:limit]).long()
    num_classes = int(labels.max()) + 1
    salm, salm_epochs = {}, {}
    # the first three train the fixed epochs; "stop" is the default, which stops by EM's own rule (surrogate
    # accuracy 0.99 on the protected batches)
    fixed = {"stop_accuracy": None}
    cases = (("learned", fixed), ("texture", {**fixed, "pattern": "texture"}),
             ("joint", {**fixed, "joint_step": True}), ("stop", {}))
    for name, options in cases:
        start = time.perf_counter()
        trainer, settings = train_salm(x, y, num_classes, epsilon=DEFAULTS["epsilon"], **options)
        protect_tensor(x, y, settings, trainer.generator, trainer.surrogate, trainer.class_scores)
        salm[name] = time.perf_counter() - start
        salm_epochs[name] = trainer.state.epoch
    start = time.perf_counter()
    _, info = error_minimizing_noise(x, y, num_classes, DEFAULTS["epsilon"])
    em = time.perf_counter() - start
    row = {"data": Path(data).name, "images": len(y), "salm_s": salm["learned"], "salm_texture_s": salm["texture"],
           "em_s": em, "em_rounds": info.get("rounds"), "em_over_salm": em / salm["learned"],
           "em_over_salm_texture": em / salm["texture"], "salm_joint_s": salm["joint"],
           "em_over_salm_joint": em / salm["joint"], "salm_stop_s": salm["stop"], "salm_stop_epochs": salm_epochs["stop"],
           "em_over_salm_stop": em / salm["stop"]}
    print_row(row)
    return [row]


def print_row(row: dict) -> None:
    print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("sizes", []) if "release_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for dims, marker in ((2, "o"), (3, "s")):
        sel = [r for r in rows if r["native"].count("x") == dims - 1]
        voxels = [np.prod([int(v) for v in r["native"].split("x")]) for r in sel]
        axes[0].loglog(voxels, [r["release_s"] for r in sel], marker=marker, label=f"{dims}D")
        axes[1].loglog(voxels, [r["peak_rss_mb"] for r in sel], marker=marker, label=f"{dims}D")
    axes[0].set(xlabel="native positions per scan", ylabel="class-mask release (s, median)")
    axes[1].set(xlabel="native positions per scan", ylabel="peak resident memory (MB)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        task, arg, device = sys.argv[2], sys.argv[3], sys.argv[4]
        if task == "release":
            native, work = (tuple(int(v) for v in part.split(",")) for part in arg.split(":"))
            print(json.dumps(_release_case(native, work, device)))
        elif task == "file":
            print(json.dumps(_file_case(arg)))
        elif task == "train":
            print(json.dumps(_train_case(int(arg))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+",
                        choices=("floor", "train_batch", "refresh", "sizes", "files", "reorder", "train_sizes",
                                 "decode", "em", "all"))
    parser.add_argument("--device", default="cpu", help="torch device of the floor and sizes tables")
    parser.add_argument("--data", default="../shared/data/breastmnist_28.npz", help="em: MedMNIST .npz")
    parser.add_argument("--limit", type=int, default=256, help="em: training images used")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="sizes: write the cost/memory figure here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tables = {"floor": lambda: floor_table(device=args.device),
              "train_batch": lambda: train_batch_table(device=args.device),
              "refresh": lambda: train_batch_table(((28, 28), (28, 28, 28)), device=args.device,
                                                   trainings=REFRESH_TRAININGS),
              "sizes": lambda: sizes_table(args.device),
              "files": files_table, "reorder": reorder_table, "train_sizes": train_sizes_table, "decode": decode_table,
              "em": lambda: em_table(args.data, args.limit)}
    results = {}
    for name, fn in tables.items():
        if name in args.tables or "all" in args.tables:
            print(f"## {name}")
            results[name] = fn()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot and "sizes" in results:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
