import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


class TinyClassifier(torch.nn.Module):
    """Small 2D/3D classifier with batch norm, fast enough for unit tests."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int):
        super().__init__()
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        bn = torch.nn.BatchNorm2d if spatial_dims == 2 else torch.nn.BatchNorm3d
        pool = torch.nn.AdaptiveAvgPool2d if spatial_dims == 2 else torch.nn.AdaptiveAvgPool3d
        self.net = torch.nn.Sequential(
            conv(in_channels, 8, 3, padding=1), bn(8), torch.nn.ReLU(), pool(2), torch.nn.Flatten(),
            torch.nn.Linear(8 * 2**spatial_dims, num_classes),
        )

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_classifier():
    return TinyClassifier


def make_medmnist(path, n=48, shape=(16, 16), num_classes=2, seed=0, rgb=False, label_shape=(-1, 1)):
    """Write a small MedMNIST-style npz whose classes differ in brightness (learnable)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 4)):
        labels = np.arange(count) % num_classes
        base = rng.integers(0, 120, size=(count, *shape) + ((3,) if rgb else ()))
        bump = (labels * 100 // max(num_classes - 1, 1)).reshape(-1, *[1] * (base.ndim - 1))
        arrays[f"{split}_images"] = np.clip(base + bump, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(label_shape)
    np.savez(path, **arrays)
    return arrays
