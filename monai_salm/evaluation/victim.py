"""Unauthorized-training check: train a fresh classifier on (protected) data, test it on clean data."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.metrics import compute_roc_auc
from monai.transforms import Compose, RandFlipd
from monai.utils import set_determinism
from tqdm.auto import tqdm

from monai_salm.evaluation.countermeasures import (
    Countermeasure,
    adversarial_training,
    augment_transforms,
    batch_transform,
    parse_countermeasures,
    pgd_attack,
    preprocess,
)
from monai_salm.networks import build_classifier

__all__ = ["VICTIM_RECIPE", "classification_metrics", "train_victim"]

#: The default victim recipe, fixed (issue 2) before any result was collected. Every key can be overridden.
VICTIM_RECIPE = {
    "network": "resnet18",
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "epochs": 20,
    "batch_size": 128,
    "flips": True,
}

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC and per-class accuracy.

    Args:
        probs: ``(N, num_classes)`` class probabilities.
        labels: ``(N,)`` true class indices.

    Returns:
        ``{"accuracy", "balanced_accuracy", "auc", "per_class_accuracy"}``; AUC and the per-class accuracies
        (recalls, keyed by class index) over the classes present in ``labels``.
    """
    labels = labels.long().cpu().reshape(-1)
    probs = probs.float().cpu()
    pred = probs.argmax(1)
    per_class = {int(c): float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()}
    num_classes = probs.shape[1]
    if num_classes == 2:
        auc = float(compute_roc_auc(probs[:, 1], labels))
    else:
        onehot = F.one_hot(labels, num_classes)
        present = onehot.sum(0) > 0
        auc = float(compute_roc_auc(probs[:, present], onehot[:, present], average="macro"))
    return {
        "accuracy": float((pred == labels).float().mean()),
        "balanced_accuracy": float(np.mean(list(per_class.values()))),
        "auc": auc,
        "per_class_accuracy": per_class,
    }


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = [torch.softmax(model(images[i : i + batch_size].to(device)), 1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _loader(images: torch.Tensor, labels: torch.Tensor, flips: bool, cms: Sequence[Countermeasure], batch_size: int):
    spatial_dims = images.ndim - 2
    transforms = [RandFlipd("image", prob=0.5, spatial_axis=a) for a in range(spatial_dims)] if flips else []
    transforms += augment_transforms(cms, spatial_dims)
    data = [{"image": images[i], "label": labels[i]} for i in range(len(images))]
    return DataLoader(
        Dataset(data, transform=Compose(transforms)),
        batch_size=min(batch_size, len(data)),
        shuffle=True,
        drop_last=len(data) > batch_size,
    )


def train_victim(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = VICTIM_RECIPE["epochs"],
    network: str = VICTIM_RECIPE["network"],
    optimizer: str = VICTIM_RECIPE["optimizer"],
    lr: float = VICTIM_RECIPE["lr"],
    weight_decay: float = VICTIM_RECIPE["weight_decay"],
    batch_size: int = VICTIM_RECIPE["batch_size"],
    flips: bool = VICTIM_RECIPE["flips"],
    countermeasures: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Train a fresh victim from scratch and test it on clean data after every epoch.

    The victim never sees clean training data: ``preprocess`` countermeasures (blur, median, bit depth, JPEG,
    resampling) are applied once to the training images, ``augment`` ones per sample, ``mixup`` per batch and
    ``adversarial`` replaces each batch by its PGD adversarial examples. Test images are left as they are.

    Args:
        train_images: ``(N, C, *spatial)`` in [0, 1], the (protected) training split.
        train_labels: ``(N,)`` class indices.
        test_images: clean test images, same layout.
        test_labels: clean test labels.
        num_classes: number of classes.
        epochs: training epochs (cosine schedule over all of them).
        network: classifier name from :func:`monai_salm.networks.build_classifier`.
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
        lr: learning rate.
        weight_decay: weight decay.
        batch_size: batch size.
        flips: random flips on every spatial axis (p=0.5 each), the recipe's standard augmentation.
        countermeasures: names from :data:`monai_salm.evaluation.COUNTERMEASURES`, e.g. ``"median,mixup"``.
        seed: random seed (weights, shuffling, augmentations).
        device: torch device.
        progress: show a progress bar.

    Returns:
        a report with the final-epoch ``accuracy``, ``balanced_accuracy``, ``auc``, ``per_class_accuracy``, the
        best-epoch ``best_accuracy`` / ``best_auc``, per-epoch ``history`` (test metrics and ``train_accuracy``
        on the protected training batches), ``train_seconds`` and the ``recipe``.

    Raises:
        ValueError: for mismatched shapes, unknown optimizers, networks or countermeasures.
    """
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train images {tuple(train_images.shape[1:])} and test images "
                         f"{tuple(test_images.shape[1:])} differ in shape.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    cms = parse_countermeasures(countermeasures)
    set_determinism(seed)
    spatial_dims = train_images.ndim - 2
    model = build_classifier(network, spatial_dims, train_images.shape[1], num_classes, train_images.shape[2:])
    model = model.to(device)
    loader = _loader(preprocess(cms, train_images.float()), train_labels.long(), flips, cms, batch_size)
    mix = batch_transform(cms, num_classes, seed=seed)
    adversarial = adversarial_training(cms)
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay, **extra)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    history = []
    start = time.perf_counter()
    for epoch in tqdm(range(1, epochs + 1), disable=not progress, desc=f"victim {network}"):
        model.train()
        correct = seen = 0
        for batch in loader:
            x = torch.as_tensor(batch["image"]).to(device).float()
            y = torch.as_tensor(batch["label"]).to(device).long().reshape(-1)
            if adversarial:
                x = pgd_attack(model, x, y, **adversarial)
            target = y
            if mix is not None:
                x, target = mix(x, y)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            F.cross_entropy(logits, target).backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        metrics = classification_metrics(_predict(model, test_images, device), test_labels)
        metrics.update(epoch=epoch, train_accuracy=correct / max(seen, 1))
        history.append(metrics)
    final = history[-1]
    recipe = {**VICTIM_RECIPE, "network": network, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
              "epochs": epochs, "batch_size": batch_size, "flips": flips, "seed": seed}
    return {
        "accuracy": final["accuracy"],
        "balanced_accuracy": final["balanced_accuracy"],
        "auc": final["auc"],
        "per_class_accuracy": final["per_class_accuracy"],
        "best_accuracy": max(h["accuracy"] for h in history),
        "best_auc": max(h["auc"] for h in history),
        "best_epoch": max(history, key=lambda h: h["accuracy"])["epoch"],
        "history": history,
        "train_seconds": time.perf_counter() - start,
        "recipe": recipe,
        "countermeasures": [str(c) for c in cms],
    }
