"""``monai-salm`` command line: train, protect, evaluate, baseline, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_salm.api import DEFAULTS, protect_tensor, train_salm
from monai_salm.data import SPLITS, from_tensor, load_npz, save_npz, split_arrays, to_tensor
from monai_salm.engines import load_protection, save_protection
from monai_salm.engines.trainer import PLACEMENTS, READER_TARGETS
from monai_salm.engines.distributed import SharedError, barrier, distributed_context, is_main, world_size
from monai_salm.evaluation import COUNTERMEASURES, RECIPES
from monai_salm.networks import CLASSIFIERS
from monai_salm.networks.generator import PATTERNS

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """An input problem reported as one line and exit code 2."""


class VerifyFailed(Exception):
    """``verify`` found a release that fails a check (exit code 1; the table says which)."""


def _k(text: str) -> float | int:
    """``0.1`` -> fraction, ``50`` -> count."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be a fraction in (0, 1] or an integer count, got {text!r}") from None


def _count(text: str) -> int:
    """A non-negative integer (``--limit``, ``--refresh-samples``)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _eps(text: str) -> float:
    """``8/255`` or ``0.03``."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"epsilon must be a number such as 0.08 or 20/255, got {text!r}") from None


def _stop_accuracy(text: str) -> float | None:
    """``--stop-accuracy``: a protected accuracy in (0, 1], or ``none`` to train every epoch."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1] or 'none', got {text!r}")
    return value


def _device(text: str) -> str:
    """A ``--device`` value checked up front: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def _seed(text: str) -> int:
    """A ``--seed``: an integer in [0, 2**32), the range every random generator used here accepts."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def _num_classes(arrays: dict[str, np.ndarray]) -> int:
    return int(max(int(arrays[f"{s}_labels"].max()) for s in SPLITS if f"{s}_labels" in arrays and arrays[f"{s}_labels"].size)) + 1


def _amp(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[getattr(args, "amp", "auto")]


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> dict:
    from monai_salm.workflows import check_checkpoint_output

    check_checkpoint_output(args.out, args.data)
    with distributed_context(args.device) as device:
        return _train_here(args, device)


def _train_here(args: argparse.Namespace, device: torch.device) -> dict:
    """Train on this process (one of several under torchrun: each loads the data, rank 0 reports and saves)."""
    from monai_salm.workflows import has_validation, load_training_arrays, resolve_epsilon

    data = load_training_arrays(args.data, args.intensity, ("training",), limit=args.limit or None,
                                work_size=args.work_size)
    x, labels = data.images, data.labels
    args.eps = resolve_epsilon(args.eps, args.psnr, args.k, x.shape[2:], data.scaling)
    val = None
    if args.monitor_steps:
        if not has_validation(args.data):
            raise CLIError(f"{args.data}: --monitor-steps needs a validation split (.npz val_images/val_labels or a "
                           "datalist 'validation' list).")
        val = load_training_arrays(args.data, data.scaling, ("validation",), reference=data)
    present = sorted({int(v) for v in labels.unique()})
    if len(present) < 2:
        raise CLIError(f"{args.data}: every training image has label {present[0]}; SALM needs images of at least two "
                       "classes.")
    num_classes = args.num_classes or max(data.num_classes, val.num_classes if val is not None else 0)
    if int(labels.max()) >= num_classes:
        raise CLIError(f"{args.data}: labels go up to {int(labels.max())} but --num-classes is {num_classes}.")
    scaling = data.scaling
    say = print if is_main() else (lambda *a, **k: None)
    say(
        f"train: {len(x)} images {tuple(x.shape[1:])} (working grid), {num_classes} classes, k={args.k}, eps={args.eps:.4f} "
        f"({scaling.epsilon_in_units(args.eps):.4g} in original units), mask={args.mask_mode}, "
        f"intensity={scaling.to_dict()}"
    )
    trainer, settings = train_salm(
        x,
        labels,
        num_classes,
        epochs=args.epochs,
        k=args.k,
        epsilon=args.eps,
        mask_mode=args.mask_mode,
        block=args.block,
        rotation_symmetric=args.rotation_symmetric,
        spread=args.spread,
        placement=args.placement,
        pattern_lr=args.pattern_lr,
        image_term=not args.pattern_only,
        label_conditioned=not args.no_label_conditioning,
        class_pattern=not args.no_class_pattern,
        pattern=args.pattern,
        mask_refresh=args.mask_refresh,
        refresh_samples=args.refresh_samples,
        warmup_epochs=args.warmup_epochs,
        generator_steps=args.generator_steps,
        joint_step=args.joint_step,
        adversarial_radius=args.adversarial_radius,
        adversarial_steps=args.adversarial_steps,
        batch_size=args.batch_size,
        stop_accuracy=args.stop_accuracy,
        seed=args.seed,
        device=device,
        progress=not args.quiet,
        val_images=None if val is None else val.images,
        val_labels=None if val is None else val.labels,
        monitor_steps=args.monitor_steps,
        monitor_target=args.monitor_target,
        robust_to=None if args.robust_to.lower() in ("", "none") else args.robust_to,
        reader_weight=args.reader_weight,
        reader_epochs=args.reader_epochs,
        reader_target=args.reader_target,
        amp=_amp(args),
        surrogate=args.surrogate,
    )
    settings = dataclasses.replace(settings, intensity=scaling.to_dict())
    if is_main():
        save_protection(
            args.out,
            settings,
            trainer.generator,
            trainer.surrogate,
            trainer.class_scores,
            extra={"train_seconds": trainer.train_seconds, "epochs_run": trainer.state.epoch, "data": str(args.data),
                   "robust_to": args.robust_to, "processes": world_size(), "spread": args.spread,
                   "rotation_symmetric": args.rotation_symmetric,
                   "placement": args.placement, "pattern_lr": args.pattern_lr, "joint_step": args.joint_step,
                   "adversarial_radius": args.adversarial_radius, "adversarial_steps": args.adversarial_steps,
                   "reader_weight": args.reader_weight, "reader_epochs": args.reader_epochs,
                   "reader_target": args.reader_target, "stop_accuracy": args.stop_accuracy,
                   "refresh_samples": args.refresh_samples},
        )
    barrier()
    summary = {
        "checkpoint": str(args.out),
        "epochs_run": trainer.state.epoch,
        "protected_accuracy": trainer.state.metrics.get("protected_accuracy"),
        "train_seconds": round(trainer.train_seconds, 1),
        "fresh_clean_accuracy": trainer.state.metrics.get("fresh_clean_accuracy"),
        "intensity": scaling.to_dict(),
        "processes": world_size(),
    }
    say(json.dumps(summary))
    return summary


def _slim(args: argparse.Namespace) -> dict:
    from monai_salm.engines import slim_protection

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out}: already exists (pass --overwrite to replace it).")
    slim_protection(args.checkpoint, out)
    report = {"checkpoint": str(args.checkpoint), "out": str(out), "bytes": out.stat().st_size,
              "full_bytes": Path(args.checkpoint).stat().st_size}
    print(f"release checkpoint {out}: {report['bytes'] / 1e6:.2f} MB (full checkpoint {report['full_bytes'] / 1e6:.2f} "
          "MB); it protects exactly as the full one, without the surrogate.")
    print(json.dumps(report))
    return report


def _protect(args: argparse.Namespace) -> dict:
    import logging

    from monai_salm.workflows import protect_dataset

    logging.getLogger("ignite").addHandler(logging.NullHandler())  # errors are reported once, by main
    with distributed_context(args.device) as device:
        report = protect_dataset(args.checkpoint, args.data, args.out, splits=args.splits, classes=args.classes,
                                 fraction=args.fraction, overwrite=args.overwrite, resume=args.resume, device=device,
                                 seed=args.seed, amp=_amp(args), progress=not args.quiet and is_main())
        if not is_main():
            return report
    if "manifest" in report:
        print(f"protected {report['files']} file(s) into {args.out}: max change {report['max_abs_change']:.4g} "
              f"(original units), {report['changed_voxels']} changed voxels; manifest {report['manifest']}")
        if report["lossy_jpeg"]:
            print(f"monai-salm: warning: {report['lossy_jpeg']} JPEG file(s) were written as JPEG, which is lossy: the "
                  "re-encoding changes pixels outside the mask and may exceed epsilon (the manifest gives the measured "
                  "change); convert them to PNG before protecting to keep the guarantees exact.", file=sys.stderr)
    for split in SPLITS:
        if split in report:
            s = report[split]
            print(f"{split}: changed pixels {s['changed_pixel_fraction']:.4f}, max change {s['max_abs_change']:.1f}, "
                  f"PSNR {s['psnr_db']:.2f} dB, SSIM {s['ssim']:.4f}")
    print(json.dumps(report))
    return report


def _verify(args: argparse.Namespace) -> dict:
    from monai_salm.workflows.verify import verify_release

    checks = verify_release(args.release, args.original, args.checkpoint)
    by_image: dict[str, list] = {}
    for c in checks:
        by_image.setdefault(c.image, []).append(c)
    for image, rows in by_image.items():
        failed = [c for c in rows if not c.ok]
        status = "FAIL" if failed else "PASS"
        reasons = "; ".join(f"{c.check} ({c.detail})" if c.detail else c.check for c in failed)
        print(f"{status}  {image}  {len(rows) - len(failed)}/{len(rows)} checks" + (f": {reasons}" if reasons else ""))
    report = {"images": len(by_image), "checks": len(checks), "failed": sum(not c.ok for c in checks)}
    print(f"{'PASS' if not report['failed'] else 'FAIL'}: {report['images']} image(s), {report['checks']} checks, "
          f"{report['failed']} failed")
    print(json.dumps(report))
    if report["failed"]:
        raise VerifyFailed
    return report


def _evaluate(args: argparse.Namespace) -> dict:
    from monai_salm.workflows.evaluate import run_evaluation

    report = run_evaluation(
        args.train, args.test, args.out, victim=args.victim, epochs=args.epochs, intensity=args.intensity,
        limit=args.limit or None, countermeasures=args.countermeasure, seed=args.seed, device=args.device,
        progress=not args.quiet, recipe=args.recipe, val_from=args.val_from, reader_data=args.reader_data,
        input_size=args.victim_size, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        flips=args.flips, shift=args.shift, schedule=args.schedule,
    )
    cms = ", ".join(report["countermeasures"]) or "none"
    recipe = report["recipe"]
    line = f"victim {recipe['network']} ({recipe['name']} recipe, {recipe['epochs']} epochs; countermeasures: {cms}): "
    if "selected" in report:
        line += (f"selected epoch {report['selected_epoch']} (on {report['selected_by']}): accuracy "
                 f"{report['selected_accuracy']:.4f}, AUC {report['selected_auc']:.4f}; ")
    line += (f"final accuracy {report['accuracy']:.4f}, AUC {report['auc']:.4f}; peak accuracy "
             f"{report['best_accuracy']:.4f}, AUC {report['best_auc']:.4f}; {report['train_seconds']:.0f} s")
    for path, r in report.get("reader", {}).items():
        line += f"; reader accuracy clean {r['clean_accuracy']:.4f}, {path} {r['protected_accuracy']:.4f}"
    print(f"{line}; wrote {args.out}/report.json, summary.md, learning_curves.png")
    return report


def _baseline(args: argparse.Namespace) -> dict:
    from monai_salm.evaluation import error_minimizing_noise, one_pixel_shortcut, uniform_noise_in_mask

    from monai_salm.workflows.npz_release import check_npz_scaling, npz_output, release_stats

    out = npz_output(args.out, args.data, args.overwrite)
    arrays = load_npz(args.data)
    images, labels = split_arrays(arrays, "train")
    x, y = to_tensor(images), torch.from_numpy(labels).long()
    num_classes = _num_classes(arrays)
    start = time.perf_counter()
    info: dict = {}
    if args.method == "random-noise":
        if not args.checkpoint:
            raise CLIError("--method random-noise needs --checkpoint: the SALM checkpoint whose masks it fills.")
        try:
            settings, generator, surrogate, class_scores = load_protection(args.checkpoint, args.device)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None
        check_npz_scaling(args.checkpoint, args.data, settings, images.dtype)
        _, masks = protect_tensor(x, y, settings, generator, surrogate, class_scores, device=args.device, seed=args.seed)
        protected = uniform_noise_in_mask(x, masks, args.eps or settings.epsilon, seed=args.seed)
        info["mask_from"] = str(args.checkpoint)
    elif args.method == "em":
        protected, info = error_minimizing_noise(
            x, y, num_classes, args.eps or DEFAULTS["epsilon"], max_rounds=args.rounds, seed=args.seed,
            device=args.device, progress=not args.quiet,
        )
    else:
        protected, info = one_pixel_shortcut(x, y, num_classes)
    seconds = time.perf_counter() - start
    result = dict(arrays)
    result["train_images"] = from_tensor(protected, images)
    stats = release_stats(images, result["train_images"])
    save_npz(out, result)
    report = {"out": str(out), "method": args.method, "protect_seconds": round(seconds, 2), "train": stats,
              "info": {k: v for k, v in info.items() if k not in ("positions", "values")}}
    print(f"{args.method}: changed pixels {stats['changed_pixel_fraction']:.4f}, max change "
          f"{stats['max_abs_change']:.1f}, PSNR {stats['psnr_db']:.2f} dB, {seconds:.1f} s")
    print(json.dumps(report))
    return report


def _demo(args: argparse.Namespace) -> dict:
    from monai_salm.data.demo import DEMO_CLASSES, build_demo_arrays
    from monai_salm.workflows.demo import demo_effect

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"{out}: folder is not empty (pass --overwrite).")
    out.mkdir(parents=True, exist_ok=True)
    data = save_npz(out / "demo.npz", build_demo_arrays(seed=args.seed))
    print(f"demo data: {data} (classes: {', '.join(DEMO_CLASSES)}; patches of scans shipped with pydicom and nibabel)")
    common = ["--device", args.device, "--seed", str(args.seed)] + (["--quiet"] if args.quiet else [])
    parser = build_parser()
    train = _train(parser.parse_args(["train", "--data", str(data), "--out", str(out / "salm.pt"), "--epochs", str(args.epochs), *common]))
    protected = out / "demo_protected.npz"
    report = _protect(parser.parse_args(["protect", "--checkpoint", str(out / "salm.pt"), "--data", str(data), "--out", str(protected), "--overwrite", *common]))
    effect = demo_effect(data, protected, out, seed=args.seed, device=args.device, progress=not args.quiet)
    summary = {
        "surrogate_protected_accuracy": train["protected_accuracy"],
        "psnr_db": report["train"]["psnr_db"],
        "changed_pixel_fraction": report["train"]["changed_pixel_fraction"],
        **effect,
        "files": [str(data), str(out / "salm.pt"), str(protected), effect["picture"]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"protected copy: PSNR {summary['psnr_db']:.2f} dB, changed pixels {summary['changed_pixel_fraction']:.3f}; "
        f"surrogate accuracy on protected images {summary['surrogate_protected_accuracy']:.3f}"
    )
    print(
        f"a small CNN trained on the clean copy scores {effect['clean_victim_accuracy']:.3f} on the clean test "
        f"images, trained on the protected copy {effect['protected_victim_accuracy']:.3f} "
        f"(chance {effect['chance_accuracy']:.3f})"
    )
    print(f"done: wrote {', '.join(summary['files'])}, {out / 'summary.json'}, victim reports in {out}/victim_*/")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-salm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", type=_device, default="cpu",
                       help="torch device (default: cpu; under torchrun, cuda means each process's local GPU)")
        p.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2**32)")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    def amp(p):
        p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                       help="mixed precision for the networks (auto: on for CUDA devices; the perturbation and its "
                            "bounds are float32 either way)")

    p = sub.add_parser("train", help="train SALM's surrogate and generator on a labelled dataset")
    p.add_argument("--data", required=True,
                   help="MedMNIST-format .npz (train split), MONAI datalist .json ('training' list) or a folder with "
                        "one subfolder per class (NIfTI, DICOM, PNG/JPEG, NRRD/MHA; any sizes, see --work-size)")
    p.add_argument("--work-size", default=None,
                   help="working grid SALM trains on, e.g. 64 or 256,256 or 128,128,64: every image is resampled onto "
                        "it as it is read, so training cost follows the grid, not the native size; the checkpoint "
                        "then protects scans of any size at their own resolution (default: the images' size when "
                        "they share one, otherwise the per-axis median)")
    p.add_argument("--intensity", default="auto",
                   help="intensity scaling to [0, 1], stored in the checkpoint: window:LO:HI (e.g. CT "
                        "window:-1000:1000), range:LO:HI, percentile:P:Q, or auto (default: the stored type's range "
                        "for 8-bit data, percentile:0.5:99.5 otherwise)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="maximum min-min epochs")
    p.add_argument("--k", type=_k, default=DEFAULTS["k"], help="fraction (0,1] or count of positions to perturb")
    p.add_argument("--eps", type=_eps, default=None,
                   help="L-inf budget in [0,1] units, e.g. 20/255 (default: the one that meets --psnr)")
    p.add_argument("--psnr", type=float, default=DEFAULTS["psnr"],
                   help="target PSNR of the release in dB: epsilon is chosen for --k so that every release has at "
                        f"least this PSNR (default {DEFAULTS['psnr']:g}; ignored when --eps is given)")
    p.add_argument("--mask-mode", choices=("sample", "class", "random"), default=DEFAULTS["mask_mode"], help="mask kind")
    p.add_argument("--block", type=int, default=DEFAULTS["block"],
                   help="class mode: side in pixels/voxels of the solid cells making up the class masks and patterns "
                        "(1: single positions; cells of 3+ survive median filters, blur and resampling)")
    p.add_argument("--rotation-symmetric", action="store_true", default=DEFAULTS["rotation_symmetric"],
                   help="class mode: make the class masks and pattern unchanged by in-plane 90-degree turns as well as "
                        "flips, so a victim that rotates its inputs still sees each class's own pattern")
    p.add_argument("--spread", type=int, default=DEFAULTS["spread"],
                   help="class mode: spread the mask over N parts per axis, taking about the same share of each (its "
                        "most salient cells first), so that one hole cut out of an image removes little of it "
                        "(default: 1, the most salient cells of the whole image)")
    p.add_argument("--placement", choices=PLACEMENTS, default=DEFAULTS["placement"],
                   help="class mode: put each class mask on the class's most salient cells (salient, the default) or "
                        "on its least salient ones, where clean images carry little of what tells the classes apart")
    p.add_argument("--mask-refresh", type=int, default=DEFAULTS["mask_refresh"], help="recompute masks every N epochs")
    p.add_argument("--refresh-samples", type=_count, default=DEFAULTS["refresh_samples"],
                   help="class masks: refresh from a seeded subset of N training images after the first refresh "
                        "(0: every image)")
    p.add_argument("--warmup-epochs", type=int, default=DEFAULTS["warmup_epochs"],
                   help="epochs the surrogate trains on clean images before the min-min training (default: none, both "
                        "networks start together on the protected images)")
    p.add_argument("--generator-steps", type=int, default=DEFAULTS["generator_steps"], help="generator steps per batch")
    p.add_argument("--joint-step", action="store_true",
                   help="update surrogate and generator from one backward pass per batch instead of one step each "
                        "(one surrogate pass fewer per batch)")
    p.add_argument("--adversarial-radius", type=_eps, default=DEFAULTS["adversarial_radius"],
                   help="train against a robust surrogate: add to each protected batch a PGD change of this L-inf "
                        "radius (e.g. 2/255) that raises the surrogate's loss, so the noise stays a shortcut for an "
                        "attacker who trains adversarially (default 0: off)")
    p.add_argument("--adversarial-steps", type=int, default=DEFAULTS["adversarial_steps"],
                   help="PGD steps of --adversarial-radius (each one more surrogate pass per batch)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="the global batch: under torchrun it is split evenly over the processes")
    p.add_argument("--surrogate", default="resnet18", choices=CLASSIFIERS, help="surrogate network (default: resnet18)")
    p.add_argument("--stop-accuracy", type=_stop_accuracy, default=DEFAULTS["stop_accuracy"],
                   help="stop once the surrogate's accuracy on an epoch's protected batches reaches this (default "
                        f"{DEFAULTS['stop_accuracy']}; 'none': train all --epochs)")
    p.add_argument("--monitor-steps", type=int, default=DEFAULTS["monitor_steps"],
                   help="fresh-model monitor: train a new model this many steps on protected data each epoch (0: off)")
    p.add_argument("--monitor-target", type=float, default=None,
                   help="stop once the fresh model's clean val accuracy is at or below this")
    p.add_argument("--no-label-conditioning", action="store_true", help="generator without labels")
    p.add_argument("--pattern", choices=PATTERNS, default=DEFAULTS["pattern"],
                   help="class pattern inside the masks: learned (cells of learnable values) or texture (a fixed "
                        "stripe or checkerboard texture per class, read by a victim after flips and shifts)")
    p.add_argument("--pattern-only", action="store_true",
                   help="learned pattern without the generator's image-dependent term: each class's change is the "
                        "same for all its images, training is cheaper and a class-mask release is a lookup")
    p.add_argument("--pattern-lr", type=float, default=DEFAULTS["pattern_lr"],
                   help="learning rate of the learned class pattern (default: the generator's); the pattern starts "
                        "from random signs, and at the generator's rate a short training barely moves it")
    p.add_argument("--no-class-pattern", action="store_true", help="one code per class and channel, not a spatial pattern")
    p.add_argument("--robust-to", default=DEFAULTS["robust_to"],
                   help="train through countermeasures applied to half the batches, so the protection survives them: "
                        "preprocessing (e.g. median, blur, resample, bitdepth:4) and the attacker's augmentations "
                        f"(flip, crop:P, rotate:DEGREES, cutout:SIZE); default {DEFAULTS['robust_to']} (a random flip "
                        "per axis and a shift of up to 2 pixels, as a competent attacker augments); none: train on the "
                        "release as it is")
    p.add_argument("--reader-weight", type=float, default=DEFAULTS["reader_weight"],
                   help="keep the release readable by models trained on clean data: first train such a model (the "
                        "reader) on the clean images, then penalise the generator by this weight times the change of "
                        "the reader's outputs on the protected images (KL divergence; default 0: off)")
    p.add_argument("--reader-epochs", type=int, default=DEFAULTS["reader_epochs"],
                   help="epochs the reader trains on the clean images (with --reader-weight)")
    p.add_argument("--reader-target", choices=READER_TARGETS, default=DEFAULTS["reader_target"],
                   help="with --reader-weight: clean (the reader reads a protected image as its original) or uniform "
                        "(it reads no class from it: the change erases what a model trained on clean data reads)")
    p.add_argument("--num-classes", type=int, default=0, help="default: max label + 1")
    p.add_argument("--limit", type=_count, default=0, help="use only the first N training images")
    common(p)
    amp(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("protect", help="protect a dataset (.npz, datalist or class folder) with a trained checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="MedMNIST .npz, MONAI datalist .json or class folder")
    p.add_argument("--out", required=True,
                   help="output .npz for .npz data (same keys, dtypes and shapes); otherwise an output folder that "
                        "receives every image in its format and relative layout, plus manifest.csv")
    p.add_argument("--splits", nargs="+", default=None, choices=SPLITS,
                   help=".npz only: splits to protect (default: every split in the file, the whole release; "
                        "'--splits train' keeps val/test clean, e.g. to evaluate against a clean test split)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help=".npz only: protect only the images of these classes (the others are copied unchanged)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help=".npz only: protect a seeded random fraction of each class's images (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file / use a non-empty folder")
    p.add_argument("--resume", action="store_true",
                   help="datalist / class folder only: complete an interrupted run into --out; copies already there "
                        "are kept, the missing ones written, and manifest.csv covers every image (same checkpoint, "
                        "data and seed)")
    common(p)
    amp(p)
    p.set_defaults(func=_protect)

    p = sub.add_parser("slim", help="write a release checkpoint without the surrogate (class and random masks)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    p.add_argument("--out", required=True, help="release checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_slim)

    p = sub.add_parser("verify", help="check a protected folder against its originals and manifest")
    p.add_argument("--release", required=True, help="the protected folder (with manifest.csv)")
    p.add_argument("--original", required=True, help="the folder it was made from")
    p.add_argument("--checkpoint", default=None,
                   help="the checkpoint that made it: also checks epsilon, the mask and that the release recomputed "
                        "here is the same")
    p.set_defaults(func=_verify)

    p = sub.add_parser("demo", help="offline end-to-end run on the embedded dataset: build, train, protect, then "
                       "train a small victim on the clean and on the protected copy and compare them")
    p.add_argument("--out", default="salm_demo", help="output folder (default: salm_demo)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    common(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "evaluate",
        help="unauthorized-training check: train a fresh victim on --train, test it on the clean test split of --test",
    )
    p.add_argument("--train", required=True,
                   help="(protected) data whose training split the victim learns from: .npz (train split), datalist "
                        ".json ('training' list) or class folder")
    p.add_argument("--test", required=True,
                   help="clean data tested on: .npz (test split), datalist .json ('test' list) or class folder (all)")
    p.add_argument("--out", required=True, help="report folder: report.json, summary.md, learning_curves.png")
    p.add_argument("--recipe", default="competent", choices=tuple(RECIPES),
                   help="victim recipe: competent (default; MedMNIST v2 ResNet protocol with flips and shifts, "
                        "budget capped at 4000 steps, epoch selected on validation AUC), quick (20 epochs, cosine) "
                        "or small (a small CNN, 15 epochs: seconds on small images)")
    p.add_argument("--victim", default=None, choices=CLASSIFIERS, help="victim network (default: the recipe's)")
    p.add_argument("--victim-size", default=None,
                   help="the attacker's input size, e.g. 32 or 64,64,64: training, validation and test images are "
                        "resampled onto it first (default: the images' own size; needed when they differ)")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's budget for this data size")
    p.add_argument("--optimizer", default=None, choices=("adam", "adamw", "sgd"))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (competent: 128 2D, 32 3D)")
    p.add_argument("--schedule", default=None, choices=("multistep", "cosine", "constant"))
    p.add_argument("--shift", type=int, default=None, help="random shifts of up to N pixels/voxels (competent: 2)")
    p.add_argument("--no-flips", dest="flips", action="store_const", const=False, default=None,
                   help="drop the recipe's random flips")
    p.add_argument("--val-from", default="both", choices=("both", "protected", "clean", "none"),
                   help="validation sets the attacker selects its epoch on: the release's val split (protected), "
                        "the clean --test file's val split (clean), both (default; the headline is the better for "
                        "the attacker) or none")
    p.add_argument("--reader-data", nargs="+", default=None,
                   help="protected copies of --test: the selected model also reads their test splits, and the report "
                        "compares its accuracy on each with the clean one (use with a victim trained on clean data)")
    p.add_argument("--countermeasure", default="",
                   help="comma-separated countermeasures the victim applies, NAME or NAME:PARAM: "
                        + "; ".join(f"{k} ({v})" for k, v in COUNTERMEASURES.items()))
    p.add_argument("--intensity", default="auto", help="intensity scaling of the training data (see train --help)")
    p.add_argument("--limit", type=_count, default=0, help="use only the first N training images")
    common(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("baseline", help="protect the train split of a .npz with a baseline method, for comparison")
    p.add_argument("--method", required=True, choices=("random-noise", "em", "ops"),
                   help="random-noise: uniform noise of the same eps in a SALM checkpoint's masks; em: full-image "
                        "sample-wise error-minimizing noise (Huang et al. 2021); ops: one-pixel shortcut (Wu et al. "
                        "2023, model-free, one position per class set to an extreme value). Random-mask SALM is "
                        "'train --mask-mode random'.")
    p.add_argument("--data", required=True, help="MedMNIST-format .npz")
    p.add_argument("--out", required=True, help="output .npz (same keys; train split protected)")
    p.add_argument("--checkpoint", help="random-noise: the SALM checkpoint whose masks (and eps) are used")
    p.add_argument("--eps", type=_eps, default=None,
                   help="L-inf budget (random-noise: default the checkpoint's; em: default the SALM default)")
    p.add_argument("--rounds", type=int, default=10, help="em: maximum min-min rounds (each: 10 surrogate steps, "
                                                          "then 10 PGD steps on every image)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    common(p)
    p.set_defaults(func=_baseline)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 a release that fails verify, 2 bad input)."""
    args = build_parser().parse_args(argv)
    _set_threads(args)
    if getattr(args, "eps", None) is not None and not 0 < args.eps <= 1:
        print(f"monai-salm: error: epsilon must be in (0, 1], got {args.eps}", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except VerifyFailed:
        return 1
    except KeyboardInterrupt:
        hint = ""
        if args.func is _protect and not str(args.data).lower().endswith(".npz"):
            hint = ": the copies finished so far are kept; run the same command with --resume to complete the release"
        print(f"monai-salm: interrupted{hint}", file=sys.stderr)
        return 130
    except OSError as e:  # unwritable or read-only output, full disk, ...: the path and the reason, nothing else
        where = f"{e.filename}: " if e.filename else ""
        print(f"monai-salm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except (CLIError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0" or not isinstance(e, SharedError):  # under torchrun: said once
            print(f"monai-salm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
