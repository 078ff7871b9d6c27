"""Unauthorized-training check: train a fresh classifier on (protected) data, test it on clean data."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.metrics import compute_roc_auc
from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SpatialPadd
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

__all__ = ["RECIPES", "VICTIM_RECIPE", "classification_metrics", "recipe_epochs", "relabel_map", "select_epoch",
           "train_victim"]

#: Named victim recipes. ``competent`` (the default) is the attacker of the evaluation protocol: the MedMNIST v2
#: ResNet-18 training (Adam 1e-3, learning rate x0.1 at 50% and 75% of the budget, batch 128 in 2D and 32 in 3D,
#: 100 epochs, model selected on validation AUC) with standard augmentation (random flips on every axis and random
#: shifts of up to 2 pixels/voxels), its budget capped at ``max_steps`` optimizer steps on large sets. ``quick`` is
#: a short recipe for fast checks (20 epochs, cosine, flips); it under-trains and so overstates protection.
#: ``small`` trains the small ``cnn`` classifier (Adam 1e-3, batch 32, 15 epochs at a constant learning rate, flips
#: and shifts of up to 2 pixels): a victim that fits in seconds on small images, used by ``monai-salm demo``.
RECIPES: dict[str, dict] = {
    "competent": {
        "network": "resnet18",
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "multistep",
        "epochs": 100,
        "max_steps": 4000,
        "batch_size": None,
        "flips": True,
        "shift": 2,
    },
    "quick": {
        "network": "resnet18",
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "epochs": 20,
        "max_steps": None,
        "batch_size": 128,
        "flips": True,
        "shift": 0,
    },
    "small": {
        "network": "cnn",
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "constant",
        "epochs": 15,
        "max_steps": None,
        "batch_size": 32,
        "flips": True,
        "shift": 2,
    },
}
#: The default recipe.
VICTIM_RECIPE = RECIPES["competent"]
SCHEDULES = ("multistep", "cosine", "constant")

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
def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Softmax class probabilities ``(N, num_classes)`` of ``model`` (put in eval mode) on CPU."""
    model.eval()
    out = [torch.softmax(model(images[i : i + batch_size].to(device)), 1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _loader(images, labels, flips: bool, shift: int, cms: Sequence[Countermeasure], batch_size: int, seed: int):
    spatial_dims = images.ndim - 2
    transforms = [RandFlipd("image", prob=0.5, spatial_axis=a) for a in range(spatial_dims)] if flips else []
    if shift > 0:
        size = tuple(images.shape[2:])
        transforms += [SpatialPadd("image", [s + 2 * shift for s in size], mode="constant"),
                       RandSpatialCropd("image", size, random_size=False)]
    transforms += augment_transforms(cms, spatial_dims)
    data = [{"image": images[i], "label": labels[i]} for i in range(len(images))]
    compose = Compose(transforms)
    compose.set_random_state(seed=seed)
    return DataLoader(
        Dataset(data, transform=compose),
        batch_size=min(batch_size, len(data)),
        shuffle=True,
        drop_last=len(data) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )


def recipe_epochs(num_images: int, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    """Epochs of a budget of ``epochs`` capped at ``max_steps`` optimizer steps (at least one epoch).

    Args:
        num_images: training images.
        batch_size: batch size (the last partial batch is dropped when there is more than one batch).
        epochs: the recipe's epochs.
        max_steps: cap on optimizer steps, or None.

    Returns:
        the number of epochs to train.
    """
    steps_per_epoch = max(1, num_images // batch_size)
    if max_steps is None:
        return int(epochs)
    return int(max(1, min(epochs, math.ceil(max_steps / steps_per_epoch))))


def select_epoch(history: Sequence[dict], val_name: str, metric: str = "auc") -> dict:
    """The epoch an attacker keeps when early-stopping on a validation set: the best validation ``metric``.

    Ties go to the earlier epoch (what an attacker who stops early keeps).

    Args:
        history: per-epoch records holding ``val[val_name][metric]``.
        val_name: which validation set the attacker watches.
        metric: ``"auc"`` (the MedMNIST protocol) or ``"accuracy"``.

    Returns:
        that epoch's record.
    """
    return max(history, key=lambda h: (h["val"][val_name][metric], -h["epoch"]))


#: Suffix of the validation settings in which the attacker also relabels its model's outputs (:func:`relabel_map`).
RELABELED = "_relabeled"


def relabel_map(val_probs: torch.Tensor, val_labels: torch.Tensor) -> torch.Tensor:
    """The map an attacker holding labelled validation images fits from its model's outputs to the true classes.

    A model trained on a release can learn a rule that is consistently wrong on clean images: a binary AUC far below
    0.5, or one class read as another. That is as informative as a right rule to an attacker who checks the model
    on labelled images and relabels its outputs. Binary: the scores are swapped when the validation AUC is below
    0.5 (AUC reads the ranking only). Multi-class: the outputs go through the soft confusion matrix on validation,
    ``P(true class | output)``, so each output is read as the classes it stands for.

    Args:
        val_probs: ``(N, num_classes)`` the model's probabilities on the validation images.
        val_labels: ``(N,)`` their true classes.

    Returns:
        ``(num_classes, num_classes)`` matrix ``M``: relabelled probabilities are ``probs @ M``.
    """
    num_classes = val_probs.shape[1]
    labels = val_labels.long().cpu().reshape(-1)
    if num_classes == 2:
        swap = len(labels.unique()) == 2 and float(compute_roc_auc(val_probs[:, 1].float().cpu(), labels)) < 0.5
        return torch.eye(2).flip(0) if swap else torch.eye(2)
    confusion = val_probs.float().cpu().T @ F.one_hot(labels, num_classes).float() + 1e-3
    return confusion / confusion.sum(1, keepdim=True)


def _scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int):
    if schedule == "multistep":
        milestones = [int(0.5 * total_steps), int(0.75 * total_steps)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _without_per_class(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_class_accuracy"}


def _summary(record: dict, val_name: str) -> dict:
    test = record.get("relabeled", {}).get(val_name, record)
    return {"epoch": record["epoch"], **{k: test[k] for k in ("accuracy", "balanced_accuracy", "auc",
                                                              "per_class_accuracy")}}


def train_victim(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    val_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    recipe: str = "competent",
    epochs: int | None = None,
    network: str | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    flips: bool | None = None,
    shift: int | None = None,
    schedule: str | None = None,
    countermeasures: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    keep_model: bool = False,
) -> dict:
    """Train a fresh victim from scratch, test it on clean data after every epoch, select epochs on validation.

    The victim never sees clean training data: ``preprocess`` countermeasures (blur, median, bit depth, JPEG,
    resampling) are applied once to the training images and to its validation sets (an attacker filters what it
    validates on the same way), ``augment`` ones per sample, ``mixup`` per batch and ``adversarial`` replaces each
    batch by its PGD adversarial examples. Test images are left as they are.

    Args:
        train_images: ``(N, C, *spatial)`` in [0, 1], the (protected) training split.
        train_labels: ``(N,)`` class indices.
        test_images: clean test images, same layout.
        test_labels: clean test labels.
        num_classes: number of classes.
        val_sets: named validation sets ``{name: (images, labels)}`` the attacker may early-stop on, e.g.
            ``{"protected_val": ..., "clean_val": ...}``; for each, the report gives the clean-test metrics at the
            epoch of best validation AUC, and, under ``NAME_relabeled``, those of an attacker that also relabels the
            model's outputs with the map it fits on that set (:func:`relabel_map`), at the epoch of best relabelled
            validation AUC.
        recipe: a name in :data:`RECIPES`; the arguments below override its entries (None: the recipe's).
        epochs: training epochs (default: the recipe's, capped at its ``max_steps`` optimizer steps).
        network: classifier name from :func:`monai_salm.networks.build_classifier`.
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
        lr: learning rate.
        weight_decay: weight decay.
        batch_size: batch size (recipe ``None``: 128 in 2D, 32 in 3D).
        flips: random flips on every spatial axis (p=0.5 each).
        shift: random shifts of up to this many pixels/voxels (zero padding, then a random crop); 0: none.
        schedule: ``multistep`` (x0.1 at 50% and 75% of the steps), ``cosine`` or ``constant``.
        countermeasures: names from :data:`monai_salm.evaluation.COUNTERMEASURES`, e.g. ``"median,mixup"``.
        seed: random seed (weights, shuffling, augmentations).
        device: torch device.
        progress: show a progress bar.
        keep_model: return the model the attacker keeps under ``"model"``: the weights of the headline
            validation-selected epoch (the final epoch without validation sets; for a relabelling setting, the
            network alone, without the relabelling map).

    Returns:
        a report with the final-epoch ``accuracy``, ``balanced_accuracy``, ``auc``, ``per_class_accuracy``; the
        peak ``best_accuracy`` / ``best_auc`` / ``best_epoch`` (chosen on the test set: an upper bound no real
        attacker reaches); ``selected`` (per validation setting, with and without relabelling, the test metrics at
        the validation-selected epoch) and the headline ``selected_accuracy`` / ``selected_balanced_accuracy`` /
        ``selected_auc`` / ``selected_epoch`` / ``selected_by``, from the setting that gives the attacker the best
        test result (AUC on binary tasks, accuracy otherwise);
        per-epoch ``history`` (with the relabelled test metrics under ``relabeled``); ``train_seconds``; the
        ``recipe``.

    Raises:
        ValueError: for mismatched shapes, unknown recipes, optimizers, schedules, networks or countermeasures.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown victim recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
    overrides = {"network": network, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
                 "batch_size": batch_size, "flips": flips, "shift": shift, "schedule": schedule}
    settings = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train images {tuple(train_images.shape[1:])} and test images "
                         f"{tuple(test_images.shape[1:])} differ in shape.")
    for name, (images, _) in (val_sets or {}).items():
        if images.shape[1:] != train_images.shape[1:]:
            raise ValueError(f"{name} images {tuple(images.shape[1:])} and train images "
                             f"{tuple(train_images.shape[1:])} differ in shape.")
    if settings["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {settings['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if settings["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {settings['schedule']!r}; choose one of {', '.join(SCHEDULES)}.")
    cms = parse_countermeasures(countermeasures)
    set_determinism(seed)
    spatial_dims = train_images.ndim - 2
    if settings["batch_size"] is None:
        settings["batch_size"] = 128 if spatial_dims == 2 else 32
    if epochs is None:
        epochs = recipe_epochs(len(train_images), settings["batch_size"], settings["epochs"], settings["max_steps"])
    settings["epochs"] = int(epochs)
    net_name = settings["network"]
    model = build_classifier(net_name, spatial_dims, train_images.shape[1], num_classes, train_images.shape[2:])
    model = model.to(device)
    loader = _loader(preprocess(cms, train_images.float()), train_labels.long(), settings["flips"], settings["shift"],
                     cms, settings["batch_size"], seed)
    vals = {name: (preprocess(cms, images.float()), labels) for name, (images, labels) in (val_sets or {}).items()}
    mix = batch_transform(cms, num_classes, seed=seed)
    adversarial = adversarial_training(cms)
    extra = {"momentum": 0.9} if settings["optimizer"] == "sgd" else {}
    opt = OPTIMIZERS[settings["optimizer"]](model.parameters(), lr=settings["lr"],
                                            weight_decay=settings["weight_decay"], **extra)
    sched = _scheduler(opt, settings["schedule"], epochs * len(loader))
    history, snapshots = [], {}
    start = time.perf_counter()
    for epoch in tqdm(range(1, epochs + 1), disable=not progress, desc=f"victim {net_name}"):
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
        test_probs = predict_probabilities(model, test_images, device)
        metrics = classification_metrics(test_probs, test_labels)
        metrics.update(epoch=epoch, train_accuracy=correct / max(seen, 1), val={}, relabeled={})
        for name, (images, labels) in vals.items():
            val_probs = predict_probabilities(model, images, device)
            relabel = relabel_map(val_probs, labels)
            metrics["val"][name] = _without_per_class(classification_metrics(val_probs, labels))
            metrics["val"][name + RELABELED] = _without_per_class(classification_metrics(val_probs @ relabel, labels))
            metrics["relabeled"][name + RELABELED] = classification_metrics(test_probs @ relabel, test_labels)
        history.append(metrics)
        for name, val in metrics["val"].items():  # the attacker's kept weights per validation set
            if keep_model and (name not in snapshots or val["auc"] > snapshots[name][0]):
                snapshots[name] = (val["auc"], {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    final = history[-1]
    report = {
        "accuracy": final["accuracy"],
        "balanced_accuracy": final["balanced_accuracy"],
        "auc": final["auc"],
        "per_class_accuracy": final["per_class_accuracy"],
        "best_accuracy": max(h["accuracy"] for h in history),
        "best_auc": max(h["auc"] for h in history),
        "best_epoch": max(history, key=lambda h: h["accuracy"])["epoch"],
    }
    selected = {name: _summary(select_epoch(history, name), name) for name in history[-1]["val"]}
    if selected:
        headline = "auc" if num_classes == 2 else "accuracy"
        worst = max(selected, key=lambda name: selected[name][headline])
        pick = selected[worst]
        report.update(selected=selected, selected_by=worst, selected_epoch=pick["epoch"],
                      selected_accuracy=pick["accuracy"], selected_balanced_accuracy=pick["balanced_accuracy"],
                      selected_auc=pick["auc"])
    if keep_model:
        if selected:
            model.load_state_dict(snapshots[report["selected_by"]][1])
        report["model"] = model
    report.update(
        history=history,
        train_seconds=time.perf_counter() - start,
        recipe={"name": recipe, **settings, "seed": seed},
        countermeasures=[str(c) for c in cms],
    )
    return report
