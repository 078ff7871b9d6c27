"""Unauthorized-training evaluation of a dataset copy, shared by ``monai-salm evaluate`` and the bundle."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from monai_salm.evaluation import VICTIM_RECIPE, train_victim, write_report
from monai_salm.io.utils import full_suffix
from monai_salm.workflows.arrays import load_training_arrays

__all__ = ["run_evaluation"]


def _test_splits(source: Path) -> tuple[str, ...]:
    """``.npz`` and datalists hold a test split; a class folder is the test set as a whole."""
    return ("test",) if full_suffix(source) in (".npz", ".json") else ("training",)


def run_evaluation(
    train: str | os.PathLike,
    test: str | os.PathLike,
    out_dir: str | os.PathLike,
    victim: str = VICTIM_RECIPE["network"],
    epochs: int = VICTIM_RECIPE["epochs"],
    intensity: str = "auto",
    limit: int | None = None,
    countermeasures: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    **recipe,
) -> dict:
    """Train a fresh victim on the training split of ``train``, test it on the clean test split of ``test``.

    Writes ``report.json``, ``summary.md`` and ``learning_curves.png`` into ``out_dir``.

    Args:
        train: the (protected) dataset: MedMNIST ``.npz`` (its ``train`` split), a MONAI datalist ``.json``
            (its ``training`` list) or a class folder.
        test: the clean dataset: ``.npz`` (``test`` split), datalist (``test`` list) or class folder (all of it).
        out_dir: report folder.
        victim: network name (:data:`monai_salm.networks.CLASSIFIERS`).
        epochs: training epochs.
        intensity: intensity scaling of ``train`` (see :func:`monai_salm.workflows.parse_intensity`); the test
            images are scaled the same way.
        limit: use only the first ``limit`` training images.
        countermeasures: see :func:`monai_salm.evaluation.train_victim`.
        seed: random seed.
        device: torch device.
        progress: show a progress bar.
        recipe: other :func:`~monai_salm.evaluation.train_victim` arguments (``optimizer``, ``lr``,
            ``weight_decay``, ``batch_size``, ``flips``).

    Returns:
        the report (also in ``out_dir/report.json``).

    Raises:
        ValueError: naming the file, for unreadable data or train and test images of different shapes.
    """
    train_data = load_training_arrays(train, intensity, ("training",), limit=limit)
    test_path = Path(test)
    test_data = load_training_arrays(test_path, train_data.scaling, _test_splits(test_path), reference=train_data)
    num_classes = max(train_data.num_classes, test_data.num_classes)
    report = train_victim(
        train_data.images, train_data.labels, test_data.images, test_data.labels, num_classes,
        epochs=epochs, network=victim, countermeasures=countermeasures, seed=seed, device=device,
        progress=progress, **recipe,
    )
    report.update(train_data=str(train), test_data=str(test), train_n=len(train_data.labels),
                  test_n=len(test_data.labels), num_classes=num_classes)
    write_report(report, out_dir)
    return report
