"""Surrogate / victim classifier factory built on ``monai.networks.nets``."""

from __future__ import annotations

import torch
from monai.networks import nets

__all__ = ["build_classifier", "CLASSIFIERS"]

CLASSIFIERS = ("resnet18", "resnet34", "resnet50")


def build_classifier(
    name: str | torch.nn.Module,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
) -> torch.nn.Module:
    """Create a classifier from ``monai.networks.nets`` (or pass a module through).

    ResNets use a 3x3 first convolution (stride 1 in 2D, 2 in 3D), the usual choice for 28-pixel
    MedMNIST images, which keeps 3D training affordable on a CPU.

    Args:
        name: one of :data:`CLASSIFIERS`, or an ``nn.Module`` returned unchanged.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.

    Returns:
        the network, returning logits ``(B, num_classes)``.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(name, torch.nn.Module):
        return name
    key = name.lower()
    if key in ("resnet18", "resnet34", "resnet50"):
        return getattr(nets, key)(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            conv1_t_size=3,
            conv1_t_stride=1 if spatial_dims == 2 else 2,
        )
    raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)} or pass a module.")

