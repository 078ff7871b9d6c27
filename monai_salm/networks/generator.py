"""Noise generator G for SALM (2D and 3D)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from monai_salm.transforms.functional import flip_average

__all__ = ["NoiseGenerator", "sign_code", "class_textures", "PATTERNS"]

#: Kinds of per-class pattern: ``"learned"`` (cells of learnable values) or ``"texture"`` (a fixed texture per class).
PATTERNS = ("learned", "texture")
#: Texture periods in pixels/voxels, in the order classes take them (stripes along each axis, then a checkerboard,
#: at each period); the order measured in docs/results.md.
_TEXTURE_PERIODS = (4, 2, 6, 8, 3, 5, 7)


def sign_code(num_classes: int, channels: int) -> torch.Tensor:
    """Distinct per-class, per-channel codes in [-1, 1].

    With ``num_classes <= 2 ** channels`` each class gets its own sign pattern over channels (for RGB
    and 8 classes: every +-1 colour corner); otherwise the classes get evenly spaced levels shared by
    all channels.

    Returns:
        ``(num_classes, channels)`` float tensor.
    """
    if num_classes <= 2**channels:
        corners = list(itertools.product((-1.0, 1.0), repeat=channels))
        # spread the used corners: for 2 classes pick opposite corners
        step = max(1, len(corners) // num_classes)
        picks = [corners[(i * step) % len(corners)] for i in range(num_classes)]
        if num_classes == 2:
            picks = [corners[0], corners[-1]]
        return torch.tensor(picks, dtype=torch.float32)
    levels = torch.linspace(-1.0, 1.0, num_classes)
    return levels[:, None].repeat(1, channels)


def _square_wave(positions: torch.Tensor, period: int) -> torch.Tensor:
    """The sign of ``cos(2 pi (positions + 0.5) / period)`` as exact +-1, also where the cosine is zero (every
    position for period 2), where the float sign would follow rounding noise."""
    phase = torch.remainder((positions + 0.5) / period + 0.25, 1.0)
    return torch.where(phase < 0.5, 1.0, -1.0).float()


def class_textures(num_classes: int, channels: int, size: Sequence[int]) -> torch.Tensor:
    """One +-1 texture per class: square-wave stripes along one axis, or a checkerboard, of a given period.

    Classes take, period by period (4, 2, 6, 8, 3, 5, 7, then 9, 10, ...), the stripes along each spatial axis and
    the checkerboard. A texture is local: any patch of a few periods shows it, wherever the class mask puts it and
    however the image is shifted, and a flip keeps its kind and period, so a network that sees it after the
    attacker's flips and shifts still reads the class. Every channel carries the same texture.

    Args:
        num_classes: number of classes.
        channels: image channels.
        size: spatial size (2 or 3 values).

    Returns:
        ``(num_classes, channels, *size)`` float tensor of -1 and +1.
    """
    kinds = len(size) + 1
    periods = list(_TEXTURE_PERIODS) + [p for p in range(9, 9 + num_classes) if p not in _TEXTURE_PERIODS]
    grids = torch.meshgrid(*[torch.arange(int(n), dtype=torch.float64) for n in size], indexing="ij")
    codes = []
    for c in range(num_classes):
        period, kind = periods[c // kinds], c % kinds
        waves = [_square_wave(g, period) for g in grids]
        codes.append(math.prod(waves) if kind == len(size) else waves[kind])
    return torch.stack(codes)[:, None].expand(-1, channels, *[-1] * len(size)).contiguous()


class NoiseGenerator(torch.nn.Module):
    """Image-to-image noise generator: a MONAI ``UNet`` plus an optional learnable per-class code.

    The output is the raw noise; SALM applies ``epsilon * tanh(.)`` and the mask. Inputs whose spatial
    size is not divisible by the product of ``strides`` are padded (replicate) and cropped back.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (the output has the same number).
        num_classes: classes for label conditioning; 0 disables conditioning. When > 0 the network is
            called as ``G(x, y)``: one-hot label maps are concatenated to the input and a learnable
            per-class, per-channel code is added to the output.
        channels: UNet feature channels per level.
        strides: UNet strides between levels.
        code_scale: initial magnitude of the class code (in raw units, before tanh); 0 starts at zero.
        pattern_size: when given (the training image size), the class code is a learnable per-class
            spatial pattern ``(num_classes, C, *pattern_size)`` started from random signs (made
            flip-symmetric, so flip augmentation leaves it unchanged) instead of one value per channel;
            inputs must then have this spatial size.
        pattern_cell: side, in pixels/voxels, of the pattern's constant cells: the learnable pattern has
            ``ceil(pattern_size / pattern_cell)`` cells per axis and is upsampled (nearest) to ``pattern_size``.
            Cells of 3 or more survive a 3x3 median filter, a 1-pixel blur and 2x down-up resampling, which
            destroy single-pixel patterns; 1 (the default) is one value per pixel.
        pattern_kind: ``"learned"`` (the default): the spatial class pattern above; ``"texture"``: the output is a
            fixed per-class texture (:func:`class_textures`) of magnitude 10, so ``epsilon * tanh`` puts it at
            +-epsilon inside the mask; the UNet is not used and nothing is trained (the surrogate still chooses
            the masks). A texture is a local, shift- and flip-robust feature that a victim picks up in its first
            steps (docs/results.md). Needs ``pattern_size``; ``pattern_cell`` does not apply.
        rotation_symmetric: keep the learned spatial class pattern unchanged by flips and by in-plane 90-degree
            turns (when the pattern's in-plane grid is square): it is averaged over those symmetries whenever it
            is used, so a victim that rotates its inputs sees each class's own pattern. A 90-degree turn of a
            pattern that is only flip-symmetric is another pattern, often close to another class's.

    Raises:
        ValueError: for unsupported ``spatial_dims`` or bad label values.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int = 0,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2),
        code_scale: float = 2.0,
        pattern_size: Sequence[int] | None = None,
        pattern_cell: int = 1,
        pattern_kind: str = "learned",
        rotation_symmetric: bool = False,
        image_term: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = int(num_classes)
        self.label_conditioned = self.num_classes > 0
        self.divisor = int(math.prod(strides))
        self.pattern_size = None if pattern_size is None else tuple(int(v) for v in pattern_size)
        self.image_term = bool(image_term)
        if not self.image_term and (self.pattern_size is None or not self.label_conditioned):
            raise ValueError("a generator without the image term needs label conditioning and a pattern_size.")
        self.net = None
        if self.image_term:
            self.net = UNet(
                spatial_dims=spatial_dims,
                in_channels=in_channels + self.num_classes,
                out_channels=in_channels,
                channels=tuple(channels),
                strides=tuple(strides),
                num_res_units=1,
            )
        if int(pattern_cell) < 1:
            raise ValueError(f"pattern_cell must be a positive integer, got {pattern_cell}.")
        self.pattern_cell = int(pattern_cell)
        if pattern_kind not in PATTERNS:
            raise ValueError(f"pattern_kind must be one of {PATTERNS}, got {pattern_kind!r}.")
        if pattern_kind == "texture" and (self.pattern_size is None or not self.label_conditioned):
            raise ValueError("a texture pattern needs label conditioning and a pattern_size.")
        self.pattern_kind = pattern_kind
        self.rotation_symmetric = bool(rotation_symmetric)
        if pattern_kind == "texture":
            if len(self.pattern_size) != spatial_dims:
                raise ValueError(f"pattern_size must have {spatial_dims} values, got {pattern_size}.")
            self.register_buffer("class_code", 10.0 * class_textures(self.num_classes, in_channels, self.pattern_size))
            if self.net is not None:
                self.net.requires_grad_(False)  # the output is the texture alone: nothing here is trained
        elif self.label_conditioned:
            code = sign_code(self.num_classes, in_channels)
            if self.pattern_size is not None:
                if len(self.pattern_size) != spatial_dims:
                    raise ValueError(f"pattern_size must have {spatial_dims} values, got {pattern_size}.")
                gen = torch.Generator().manual_seed(0)
                cells = [math.ceil(s / self.pattern_cell) for s in self.pattern_size]
                signs = torch.randn(self.num_classes, in_channels, *cells, generator=gen)
                for dim in range(2, 2 + spatial_dims):
                    signs = signs + signs.flip(dim)
                if self.rotation_symmetric:
                    signs = flip_average(signs, rotations=True, spatial_dims=spatial_dims)
                code = signs.sign()
            self.class_code = torch.nn.Parameter(code_scale * code)

    @property
    def reads_images(self) -> bool:
        """Whether the output depends on the images (``False``: it is the class pattern alone)."""
        return self.image_term and self.pattern_kind != "texture"

    def parameter_groups(self, pattern_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: the learned class pattern at its own learning rate, the rest at the optimizer's.

        Args:
            pattern_lr: learning rate of the learned class pattern; None puts every parameter in one group.

        Returns:
            a list of parameter-group dictionaries for a ``torch.optim`` optimizer (trainable parameters only).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        code = self.class_code if isinstance(getattr(self, "class_code", None), torch.nn.Parameter) else None
        if pattern_lr is None or code is None:
            return [{"params": params}]
        return [{"params": [p for p in params if p is not code]}, {"params": [code], "lr": float(pattern_lr)}]

    def class_pattern(self) -> torch.Tensor:
        """The per-class code: ``(num_classes, C)``, or ``(num_classes, C, *pattern_size)`` for a spatial pattern."""
        code = self.class_code
        if self.pattern_size is None or self.pattern_kind == "texture":
            return code
        if self.rotation_symmetric:
            code = flip_average(code, rotations=True, spatial_dims=self.spatial_dims)
        if self.pattern_cell == 1:
            return code
        code = F.interpolate(code, scale_factor=self.pattern_cell, mode="nearest")
        return code[(..., *[slice(0, s) for s in self.pattern_size])]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, C, *spatial)`` images.
            y: ``(B,)`` class indices, required when label-conditioned.

        Returns:
            raw noise shaped like ``x``.
        """
        spatial = x.shape[2:]
        if self.pattern_size is not None and tuple(spatial) != self.pattern_size:
            raise ValueError(f"this generator's class pattern is {self.pattern_size}, got images of {tuple(spatial)}.")
        if self.label_conditioned:
            if y is None:
                raise ValueError("this generator is label-conditioned: call it as G(x, y).")
            y = y.long().reshape(-1)
            if y.numel() != x.shape[0] or (y < 0).any() or (y >= self.num_classes).any():
                raise ValueError(f"labels must be {x.shape[0]} class indices in [0, {self.num_classes}).")
            if self.pattern_kind == "texture":
                return self.class_code[y].to(x.dtype)
            if not self.image_term:
                return self.class_pattern()[y].to(x.dtype)
            onehot = F.one_hot(y, self.num_classes).to(x.dtype)
            onehot = onehot.reshape(*onehot.shape, *([1] * self.spatial_dims)).expand(-1, -1, *spatial)
            x = torch.cat([x, onehot], dim=1)
        pad = []
        for size in reversed(spatial):
            pad += [0, (-size) % self.divisor]
        padded = F.pad(x, pad, mode="replicate") if any(pad) else x
        out = self.net(padded)[(..., *[slice(0, s) for s in spatial])]
        if self.label_conditioned:
            code = self.class_pattern()[y]
            if self.pattern_size is None:
                code = code.reshape(y.shape[0], self.in_channels, *([1] * self.spatial_dims))
            out = out + code
        return out
