"""Surrogate / victim classifier factory built on ``monai.networks.nets``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks import nets
from monai.networks.layers import Conv

__all__ = ["build_classifier", "CLASSIFIERS", "EFFICIENTNET_B0_BLOCKS"]

CLASSIFIERS = ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet-b0", "vit", "cnn")
#: Channels of the three stride-2 convolutional blocks of the small ``cnn`` classifier.
SMALL_CNN_CHANNELS = (16, 32, 64)

#: EfficientNet-B0's stages (Tan & Le, 2019) in MONAI's block-string format; ``EfficientNetBN`` fixes the padding
#: for 224-pixel inputs, so the network is built from these with the real image size instead.
EFFICIENTNET_B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)

#: A small ViT (ViT-Tiny width, 6 blocks) that trains on a CPU; patches of 4 pixels in 2D, 7 voxels in 3D.
VIT_ARGS = {"hidden_size": 192, "mlp_dim": 768, "num_layers": 6, "num_heads": 3}


def _densenet121(spatial_dims: int, in_channels: int, num_classes: int) -> torch.nn.Module:
    """DenseNet-121 with a 3x3 stride-2 stem and no stem pooling, so 28-pixel inputs survive its 3 transitions."""
    net = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
    net.features.conv0 = Conv[Conv.CONV, spatial_dims](in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
    net.features.pool0 = torch.nn.Identity()
    return net


class _ViTClassifier(torch.nn.Module):
    """``monai.networks.nets.ViT`` returning only the class logits."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, image_size: Sequence[int]):
        super().__init__()
        patch = 4 if spatial_dims == 2 else 7
        if any(s % patch for s in image_size):
            raise ValueError(f"vit needs an image size divisible by its patch size {patch}, got {tuple(image_size)}.")
        self.vit = nets.ViT(
            in_channels=in_channels, img_size=image_size, patch_size=patch, classification=True,
            num_classes=num_classes, spatial_dims=spatial_dims, post_activation=None, **VIT_ARGS,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]


def build_classifier(
    name: str | torch.nn.Module,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int] | int = 28,
) -> torch.nn.Module:
    """Create a classifier from ``monai.networks.nets`` (or pass a module through).

    All are adapted to small (28-pixel MedMNIST) inputs the usual way: ResNets use a 3x3 first convolution
    (stride 1 in 2D, 2 in 3D, which keeps 3D training affordable on a CPU); DenseNet-121 a 3x3 stride-2 stem
    without pooling; EfficientNet-B0 the real image size for its "same" padding; the ViT is ViT-Tiny width with
    6 blocks (:data:`VIT_ARGS`). ``cnn`` is a small MONAI ``Classifier`` (three stride-2 residual blocks of
    :data:`SMALL_CNN_CHANNELS`), a fast victim for demonstrations and quick checks.

    Args:
        name: one of :data:`CLASSIFIERS`, or an ``nn.Module`` returned unchanged.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        image_size: spatial size of the inputs (needed by ``efficientnet-b0``, ``vit`` and ``cnn``).

    Returns:
        the network, returning logits ``(B, num_classes)``.

    Raises:
        ValueError: for an unknown name, or an image size the ViT's patches do not divide.
    """
    if isinstance(name, torch.nn.Module):
        return name
    key = name.lower()
    size = (image_size,) * spatial_dims if isinstance(image_size, int) else tuple(image_size)
    if key in ("resnet18", "resnet34", "resnet50"):
        return getattr(nets, key)(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            conv1_t_size=3,
            conv1_t_stride=1 if spatial_dims == 2 else 2,
        )
    if key == "densenet121":
        return _densenet121(spatial_dims, in_channels, num_classes)
    if key == "efficientnet-b0":
        return nets.EfficientNet(
            list(EFFICIENTNET_B0_BLOCKS), spatial_dims=spatial_dims, in_channels=in_channels,
            num_classes=num_classes, image_size=max(size),
        )
    if key == "vit":
        return _ViTClassifier(spatial_dims, in_channels, num_classes, size)
    if key == "cnn":
        return nets.Classifier(
            in_shape=(in_channels, *size), classes=num_classes, channels=SMALL_CNN_CHANNELS,
            strides=(2,) * len(SMALL_CNN_CHANNELS),
        )
    raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)} or pass a module.")
