"""A classifier trained on clean images that stands for the legitimate reader of a release."""

from __future__ import annotations

import torch
from monai.data import Dataset
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader

from monai_salm.transforms.functional import recalibrate_batchnorm

__all__ = ["train_reader"]


def train_reader(
    network: torch.nn.Module,
    dataset: Dataset,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Train ``network`` on clean images with MONAI's ``SupervisedTrainer`` (Adam, cross-entropy), as someone who
    holds the clean data would, and return it frozen in eval mode.

    After a few epochs of Adam the batch-norm running statistics still lag behind the weights, and in eval mode such
    a network answers every image alike (its outputs do not move with the image, so it could not guide the
    generator); they are therefore re-estimated on the clean training images once training is done.

    The loader is not sharded: under ``torch.distributed`` every process trains the same reader from the same seed.

    Args:
        network: a fresh classifier returning logits.
        dataset: dictionaries with ``"image"`` and ``"label"`` (class indices), the clean training images.
        epochs: passes over ``dataset``.
        batch_size: images per step.
        lr: Adam learning rate.
        seed: seed of the shuffling.
        device: torch device.

    Returns:
        ``network``, trained, in eval mode, with gradients off for its parameters.

    Raises:
        ValueError: when ``epochs`` is not positive.
    """
    if int(epochs) < 1:
        raise ValueError(f"the reader needs at least one epoch of training, got {epochs}.")
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")
    network = network.to(device)
    SupervisedTrainer(
        device=device,
        max_epochs=int(epochs),
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=lr),
        loss_function=lambda logits, label: torch.nn.functional.cross_entropy(logits, label.long().reshape(-1)),
        non_blocking=device.type == "cuda",
        decollate=False,
    ).run()
    images = DataLoader(dataset, batch_size=max(batch_size, 256), shuffle=False)
    recalibrate_batchnorm(network, (batch["image"].to(device) for batch in images))
    return network.eval().requires_grad_(False)
