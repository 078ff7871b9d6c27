"""What ``monai-salm demo`` shows after it has protected the embedded dataset: the effect on a model trained on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from monai_salm.data.medmnist import load_npz
from monai_salm.evaluation.report import plot_image_grid
from monai_salm.workflows.evaluate import run_evaluation

__all__ = ["DEMO_VICTIM_RECIPE", "demo_effect"]

#: The victim recipe of the demo (:data:`monai_salm.evaluation.RECIPES`): a small CNN that trains in seconds.
DEMO_VICTIM_RECIPE = "small"


def _picture_images(arrays: dict[str, np.ndarray], index: np.ndarray) -> torch.Tensor:
    """Training images ``index`` of a uint8 MedMNIST file's arrays as ``(N, 1, H, W)`` in [0, 1]."""
    return torch.from_numpy(arrays["train_images"][index].astype(np.float32) / 255.0)[:, None]


def demo_effect(
    data: str | os.PathLike,
    protected: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    per_class: int = 2,
) -> dict:
    """Train the demo victim on the clean and on the protected training split, test both on the clean test split.

    Both victims follow :data:`DEMO_VICTIM_RECIPE` with the same seed, and each reports the clean-test accuracy of
    the epoch an attacker would keep (the best for it over validation on the release's own and on a clean
    validation split, with and without relabelling its outputs, as ``monai-salm evaluate`` does). Also writes
    ``demo_protection.png``: clean, protected, amplified difference and changed positions for ``per_class``
    training images of every class.

    Args:
        data: the clean demo ``.npz`` (uint8 ``train``, ``val``, ``test`` splits).
        protected: its protected copy.
        out_dir: where the two victim reports (``victim_clean/``, ``victim_protected/``) and the picture go.
        seed: victim seed.
        device: torch device.
        progress: show progress bars.
        per_class: training images per class in the picture.

    Returns:
        ``clean_victim_accuracy``, ``protected_victim_accuracy``, ``chance_accuracy`` (one over the number of
        classes), ``victim`` (the recipe) and ``picture`` (its path).
    """
    data, protected, out_dir = Path(data), Path(protected), Path(out_dir)
    accuracy = {}
    for name, train in (("clean", data), ("protected", protected)):
        report = run_evaluation(train, data, out_dir / f"victim_{name}", recipe=DEMO_VICTIM_RECIPE, seed=seed,
                                device=device, progress=progress)
        accuracy[name] = float(report["selected_accuracy"])
    clean, released = load_npz(data), load_npz(protected)
    labels = clean["train_labels"].reshape(-1)
    index = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    picture = plot_image_grid(
        _picture_images(clean, index), _picture_images(released, index), None, out_dir / "demo_protection.png",
        title="clean / protected / difference / changed pixels",
    )
    return {
        "clean_victim_accuracy": accuracy["clean"],
        "protected_victim_accuracy": accuracy["protected"],
        "chance_accuracy": 1.0 / len(np.unique(labels)),
        "victim": DEMO_VICTIM_RECIPE,
        "picture": str(picture),
    }
