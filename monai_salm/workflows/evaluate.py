"""Unauthorized-training evaluation of a dataset copy, shared by ``monai-salm evaluate`` and the bundle."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_salm.evaluation import classification_metrics, train_victim, write_report
from monai_salm.evaluation.victim import predict_probabilities
from monai_salm.io.utils import full_suffix
from monai_salm.workflows.arrays import load_training_arrays
from monai_salm.workflows.split import has_validation, split_validation

__all__ = ["run_evaluation"]


def _test_splits(source: Path) -> tuple[str, ...]:
    """``.npz`` and datalists hold a test split; a class folder is the test set as a whole."""
    return ("test",) if full_suffix(source) in (".npz", ".json") else ("training",)


def release_splits(source: Path, images: int) -> dict[str, int]:
    """The splits a release holds, with their sizes: what an attacker who downloads it receives (a class folder:
    its ``images``)."""
    suffix = full_suffix(source)
    if suffix == ".npz":
        with np.load(source, allow_pickle=False) as f:
            return {k[: -len("_images")]: int(f[k].shape[0]) for k in f.files if k.endswith("_images")}
    if suffix == ".json":
        data = json.loads(source.read_text())
        return {k: len(v) for k, v in data.items() if isinstance(v, list)}
    return {"class folder": images}


#: share of the training images an attacker holds out for validation when the release has no validation split
HOLDOUT_FRACTION = 0.1


def _validation_sets(train: Path, test: Path, train_data, val_from: str, seed: int):
    """The attacker's training images and validation sets: the release's own val split (or, without one, a
    stratified hold-out of its training images), and/or a clean val split it holds."""
    sets = {}
    if val_from in ("protected", "both"):
        if has_validation(train):
            val = load_training_arrays(train, train_data.scaling, ("validation",), reference=train_data)
        else:
            train_data, val = split_validation(train_data, HOLDOUT_FRACTION, seed=seed)
        sets["protected_val"] = (val.images, val.labels)
    if val_from in ("clean", "both") and has_validation(test):
        val = load_training_arrays(test, train_data.scaling, ("validation",), reference=train_data)
        sets["clean_val"] = (val.images, val.labels)
    if val_from == "clean" and not sets:
        raise ValueError(f"{test}: no validation split (.npz val_images/val_labels or a datalist 'validation' list) "
                         "for --val-from clean.")
    return train_data, sets


def run_evaluation(
    train: str | os.PathLike,
    test: str | os.PathLike,
    out_dir: str | os.PathLike,
    victim: str | None = None,
    epochs: int | None = None,
    intensity: str = "auto",
    limit: int | None = None,
    countermeasures: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    recipe: str = "competent",
    val_from: str = "both",
    reader_data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    input_size: int | str | Sequence[int] | None = None,
    **overrides,
) -> dict:
    """Train a fresh victim on the training split of ``train``, test it on the clean test split of ``test``.

    The attacker selects its epoch on validation data (best validation AUC): on the release's own validation split
    (``protected_val``, what it received; without one, a stratified 10% of the training images held out) and on a
    clean validation split it holds itself (``clean_val``, the ``test`` source's validation split, when it has one:
    the worse case for the data owner). Writes ``report.json``, ``summary.md``
    and ``learning_curves.png`` into ``out_dir``.

    Args:
        train: the (protected) dataset: MedMNIST ``.npz`` (its ``train`` split), a MONAI datalist ``.json``
            (its ``training`` list) or a class folder.
        test: the clean dataset: ``.npz`` (``test`` split), datalist (``test`` list) or class folder (all of it).
        out_dir: report folder.
        victim: network name (:data:`monai_salm.networks.CLASSIFIERS`); default: the recipe's.
        epochs: training epochs; default: the recipe's budget for this training set size.
        intensity: intensity scaling of ``train`` (see :func:`monai_salm.workflows.parse_intensity`); the test
            images are scaled the same way.
        limit: use only the first ``limit`` training images.
        countermeasures: see :func:`monai_salm.evaluation.train_victim`.
        seed: random seed.
        device: torch device.
        progress: show a progress bar.
        recipe: victim recipe name (:data:`monai_salm.evaluation.RECIPES`).
        val_from: ``both``, ``protected`` (the release's val split), ``clean`` (the ``test`` source's val split)
            or ``none`` (final and peak epochs only).
        reader_data: protected releases of the ``test`` data (``.npz`` or datalists whose test split is the
            protected copy of ``test``'s): the victim's selected model also reads each, and ``report["reader"]``
            gives, per release, its accuracy on the protected copy against the clean one. Meant for a victim trained
            on clean data (the authorized user): it measures what protection costs legitimate readers.
        input_size: the attacker's own input size (e.g. ``64`` or ``32,32,32``): every image it trains, validates
            and tests on is resampled onto it first (:func:`~monai_salm.transforms.functional.resize_images`), as an
            attacker training at another resolution would. Needed for releases whose images differ in size.
            Default: the images' own size.
        overrides: other :func:`~monai_salm.evaluation.train_victim` arguments (``optimizer``, ``lr``,
            ``weight_decay``, ``batch_size``, ``flips``, ``shift``, ``schedule``).

    Returns:
        the report (also in ``out_dir/report.json``).

    Raises:
        ValueError: naming the file, for unreadable data, train and test images of different shapes, or no
            validation split when one is asked for.
    """
    if val_from not in ("both", "protected", "clean", "none"):
        raise ValueError(f"val_from must be both, protected, clean or none, got {val_from!r}.")
    train, test_path = Path(train), Path(test)
    train_data = load_training_arrays(train, intensity, ("training",), limit=limit, work_size=input_size)
    received = release_splits(train, len(train_data.labels))
    test_data = load_training_arrays(test_path, train_data.scaling, _test_splits(test_path), reference=train_data)
    train_data, val_sets = _validation_sets(train, test_path, train_data, val_from, seed)
    num_classes = max(train_data.num_classes, test_data.num_classes)
    if isinstance(reader_data, (str, os.PathLike)):
        reader_data = [reader_data]
    readers = {}
    for path in reader_data or ():
        copy = load_training_arrays(Path(path), train_data.scaling, _test_splits(Path(path)), reference=train_data)
        if copy.images.shape != test_data.images.shape or not bool((copy.labels == test_data.labels).all()):
            raise ValueError(f"{path}: its test split is not a copy of {test}'s (shape or labels differ).")
        readers[str(path)] = copy
    report = train_victim(
        train_data.images, train_data.labels, test_data.images, test_data.labels, num_classes, val_sets=val_sets,
        recipe=recipe, epochs=epochs, network=victim, countermeasures=countermeasures, seed=seed, device=device,
        progress=progress, keep_model=bool(readers), **overrides,
    )
    model = report.pop("model", None)
    if readers:
        clean_metrics = classification_metrics(predict_probabilities(model, test_data.images, device), test_data.labels)
        report["reader"] = {path: reader_accuracy(model, clean_metrics, copy, device) for path, copy in readers.items()}
    report.update(release_splits=received, train_data=str(train), test_data=str(test),
                  input_size=list(train_data.image_size), train_n=len(train_data.labels),
                  test_n=len(test_data.labels), num_classes=num_classes,
                  validation={name: len(labels) for name, (_, labels) in val_sets.items()})
    write_report(report, out_dir)
    return report


def reader_accuracy(model, clean_metrics: dict, protected, device: str = "cpu") -> dict:
    """Accuracy/AUC of ``model`` on protected test images next to ``clean_metrics`` (its metrics on the originals)."""
    protected_metrics = classification_metrics(predict_probabilities(model, protected.images, device), protected.labels)
    return {
        "clean_accuracy": clean_metrics["accuracy"],
        "protected_accuracy": protected_metrics["accuracy"],
        "clean_auc": clean_metrics["auc"],
        "protected_auc": protected_metrics["auc"],
        "accuracy_change": protected_metrics["accuracy"] - clean_metrics["accuracy"],
    }
