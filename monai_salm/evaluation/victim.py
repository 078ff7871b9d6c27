"""Unauthorized-training check: train a fresh classifier on (protected) data, test on clean data."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.metrics import compute_roc_auc
from monai.transforms import Compose, RandFlipd
from monai.utils import set_determinism
from tqdm.auto import tqdm

from monai_salm.networks import build_classifier

__all__ = ["VICTIM_RECIPE", "classification_metrics", "train_victim"]

#: The victim recipe, fixed before any result was collected.
VICTIM_RECIPE = {
    "network": "resnet18",
    "optimizer": "Adam",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "batch_size": 128,
    "augmentation": "random flip on every spatial axis, p=0.5 each",
}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC.

    Args:
        probs: ``(N, num_classes)`` class probabilities.
        labels: ``(N,)`` true class indices.

    Returns:
        ``{"accuracy", "balanced_accuracy", "auc"}``; AUC over the classes present in ``labels``.
    """
    labels = labels.long().cpu()
    probs = probs.float().cpu()
    pred = probs.argmax(1)
    acc = float((pred == labels).float().mean())
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    num_classes = probs.shape[1]
    if num_classes == 2:
        auc = float(compute_roc_auc(probs[:, 1], labels))
    else:
        onehot = F.one_hot(labels, num_classes)
        present = onehot.sum(0) > 0
        auc = float(compute_roc_auc(probs[:, present], onehot[:, present], average="macro"))
    return {"accuracy": acc, "balanced_accuracy": float(np.mean(recalls)), "auc": auc}


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    out = [torch.softmax(model(images[i : i + batch_size].to(device)), 1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def train_victim(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 20,
    network: str = VICTIM_RECIPE["network"],
    lr: float = VICTIM_RECIPE["lr"],
    weight_decay: float = VICTIM_RECIPE["weight_decay"],
    batch_size: int = VICTIM_RECIPE["batch_size"],
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Train a fresh victim from scratch and test it on clean data after every epoch.

    Args:
        train_images: ``(N, C, *spatial)`` in [0, 1], the (protected) training split.
        train_labels: ``(N,)`` class indices.
        test_images: clean test images, same layout.
        test_labels: clean test labels.
        num_classes: number of classes.
        epochs: training epochs.
        network: classifier name from :func:`monai_salm.networks.build_classifier`.

    Returns:
        a report with the final-epoch ``accuracy``, ``balanced_accuracy``, ``auc``, the best-epoch
        ``best_accuracy`` / ``best_auc``, per-epoch ``history``, ``train_seconds`` and the recipe.
    """
    set_determinism(seed)
    spatial_dims = train_images.ndim - 2
    model = build_classifier(network, spatial_dims, train_images.shape[1], num_classes).to(device)
    flips = Compose([RandFlipd("image", prob=0.5, spatial_axis=a) for a in range(spatial_dims)])
    data = [{"image": train_images[i], "label": train_labels[i]} for i in range(len(train_images))]
    loader = DataLoader(Dataset(data, transform=flips), batch_size=batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    history = []
    start = time.perf_counter()
    for epoch in tqdm(range(1, epochs + 1), disable=not progress, desc=f"victim {network}"):
        model.train()
        for batch in loader:
            x = torch.as_tensor(batch["image"]).to(device).float()
            y = torch.as_tensor(batch["label"]).to(device).long().reshape(-1)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        metrics = classification_metrics(_predict(model, test_images, device), test_labels)
        metrics["epoch"] = epoch
        history.append(metrics)
    final = history[-1]
    return {
        "accuracy": final["accuracy"],
        "balanced_accuracy": final["balanced_accuracy"],
        "auc": final["auc"],
        "best_accuracy": max(h["accuracy"] for h in history),
        "best_auc": max(h["auc"] for h in history),
        "history": history,
        "train_seconds": time.perf_counter() - start,
        "recipe": {**VICTIM_RECIPE, "network": network, "lr": lr, "epochs": epochs, "batch_size": batch_size},
    }
