"""Batched SALM math shared by the transforms and the trainer.

Every function here works on batches (``B, C, *spatial``) so that the trainer and the per-sample
transforms run exactly the same code.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "resolve_k",
    "epsilon_for_psnr",
    "saliency_scores",
    "topk_mask",
    "block_average",
    "flip_average",
    "regional_rank",
    "resize_images",
    "to_grid",
    "perturb",
    "call_generator",
    "mixed_precision",
    "preserve_model_state",
    "recalibrate_batchnorm",
    "batchnorm_statistics",
]


def resolve_k(k: float | int, num_positions: int) -> int:
    """Turn a sparsity ``k`` into a count of spatial positions.

    Args:
        k: a fraction in (0, 1] (a Python/numpy float) or a positive integer count (an int).
        num_positions: number of spatial positions of one image.

    Returns:
        ``round(k * num_positions)`` for a fraction, ``k`` for an integer.

    Raises:
        ValueError: when ``k`` is not a number, is out of range, or selects no position.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"k must be a fraction in (0, 1] or a positive integer count, got {k!r}.")
    if isinstance(k, numbers.Integral):
        count = int(k)
        if not 1 <= count <= num_positions:
            raise ValueError(f"k={count} must be an integer count in [1, {num_positions}] for this image size.")
        return count
    frac = float(k)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"k={frac} must be a fraction in (0, 1] (or an integer count).")
    count = int(round(frac * num_positions))
    if count < 1:
        raise ValueError(f"k={frac} selects no position of an image with {num_positions} positions.")
    return count


def epsilon_for_psnr(psnr_db: float, k: float | int, num_positions: int, data_range: float = 1.0) -> float:
    """The L-infinity budget at which a release with sparsity ``k`` has a PSNR of at least ``psnr_db``.

    A masked position changes by at most epsilon in every channel, so the mean squared change is at most
    ``(count / num_positions) * epsilon ** 2`` and ``epsilon = data_range * 10 ** (-psnr_db / 20) *
    sqrt(num_positions / count)`` meets the PSNR exactly when every masked value moves by the full epsilon;
    clipping at the range limits only raises it.

    Args:
        psnr_db: target PSNR in dB (positive).
        k: sparsity, fraction or count (see :func:`resolve_k`).
        num_positions: spatial positions of one image.
        data_range: the value range's width (1 for [0, 1]).

    Returns:
        epsilon in the units of ``data_range``, at most ``data_range``.

    Raises:
        ValueError: for a non-positive PSNR or a bad ``k``.
    """
    if not psnr_db > 0:
        raise ValueError(f"psnr must be a positive number of dB, got {psnr_db}.")
    fraction = resolve_k(k, num_positions) / num_positions
    return float(min(data_range, data_range * 10 ** (-psnr_db / 20) / fraction**0.5))


def mixed_precision(device: str | torch.device, enabled: bool) -> torch.autocast:
    """``torch.autocast`` for the networks: float16 on CUDA, bfloat16 elsewhere; a no-op when not ``enabled``."""
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=bool(enabled))


class preserve_model_state:
    """Context manager that restores a module's train/eval flags and its parameters' ``requires_grad``.

    Parameter ``.grad`` tensors are never touched by :func:`saliency_scores` (it differentiates with
    respect to the input only), so only the flags need restoring.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        return self.model

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        return False


def _tracking_batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The batch-norm layers of ``model`` that keep running statistics."""
    batchnorm = torch.nn.modules.batchnorm._BatchNorm
    return [m for m in model.modules() if isinstance(m, batchnorm) and m.track_running_stats]


class batchnorm_statistics(preserve_model_state):
    """Context manager in which a model's forward passes re-estimate its batch-norm running statistics.

    On entry the running statistics are reset and every batch-norm layer set to accumulate a cumulative average of
    the batches it sees, in train mode (each batch is normalised with its own statistics); the other layers are set
    to eval mode. On exit the momenta and every train/eval flag are restored. A forward pass inside needs a batch of
    two or more.
    """

    def __enter__(self):
        super().__enter__()
        self.model.eval()
        self.bns = _tracking_batchnorms(self.model)
        self.momenta = [m.momentum for m in self.bns]
        for m in self.bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        return self.model

    def __exit__(self, *exc):
        for m, momentum in zip(self.bns, self.momenta):
            m.momentum = momentum
        return super().__exit__(*exc)


def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate a model's batch-norm running statistics on ``batches`` (cumulative average).

    Running statistics are reset and recomputed over every batch of two or more images
    (:class:`batchnorm_statistics`), then momenta and the model's train/eval flags are restored.

    Args:
        model: the network.
        batches: input batches, already on the model's device.
    """
    if not _tracking_batchnorms(model):
        return
    with batchnorm_statistics(model), torch.no_grad():
        for x in batches:
            if x.shape[0] > 1:  # a lone last image has no batch statistics (batch norm refuses it)
                model(x)


def saliency_scores(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eval_mode: bool | None = True
) -> torch.Tensor:
    """Per-position saliency ``sum_c |d CE(model(x), y) / d x|``.

    Args:
        model: classifier returning logits ``(B, num_classes)``.
        images: ``(B, C, *spatial)`` float tensor.
        labels: ``(B,)`` integer class indices.
        eval_mode: run the model in eval mode (batch-norm running statistics) while scoring; ``False``: in train
            mode; ``None``: in the modes its layers are in (e.g. inside :class:`batchnorm_statistics`).

    Returns:
        ``(B, *spatial)`` non-negative float tensor. The model's mode, ``requires_grad`` flags and
        parameter ``.grad`` are the same after the call as before.
    """
    x = images.detach().float().clone().requires_grad_(True)
    with preserve_model_state(model), torch.enable_grad():
        if eval_mode is not None:
            model.train(not eval_mode)
        for p in model.parameters():
            p.requires_grad_(False)
        logits = model(x)
        loss = F.cross_entropy(logits, labels.long().reshape(-1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.abs().sum(dim=1)


def topk_mask(scores: torch.Tensor, k: float | int) -> torch.Tensor:
    """Mask of the ``k`` highest-scoring positions of each image.

    Ties are broken deterministically: among equal scores the position with the lower flat
    (C-order) index wins.

    Args:
        scores: ``(B, *spatial)`` scores.
        k: fraction in (0, 1] or integer count, see :func:`resolve_k`.

    Returns:
        ``(B, 1, *spatial)`` float tensor of zeros and ones with exactly ``resolve_k(k, N)`` ones per image.
    """
    batch, spatial = scores.shape[0], scores.shape[1:]
    flat = scores.reshape(batch, -1)
    count = resolve_k(k, flat.shape[1])
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :count]
    mask = torch.zeros_like(flat, dtype=torch.float32)
    mask.scatter_(1, order, 1.0)
    return mask.reshape(batch, 1, *spatial)


def block_average(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Replace every position's score by the mean over its ``block``-sided cell (cells from the origin).

    A top-k of the result selects whole cells (only the last one may be partial, by the lower-index tie rule),
    so the mask is made of solid blocks instead of scattered positions.

    Args:
        scores: ``(B, *spatial)`` scores, 2 or 3 spatial dimensions.
        block: cell side in positions; 1 returns ``scores`` unchanged.

    Returns:
        a tensor shaped like ``scores``.

    Raises:
        ValueError: for a block smaller than 1.
    """
    if block < 1:
        raise ValueError(f"block must be a positive integer, got {block}.")
    if block == 1:
        return scores
    spatial = scores.shape[1:]
    pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
    pooled = pool(scores[:, None].float(), block, stride=block, ceil_mode=True, count_include_pad=False)
    up = F.interpolate(pooled, scale_factor=block, mode="nearest")
    return up[(slice(None), 0, *[slice(0, s) for s in spatial])].to(scores.dtype)


def flip_average(scores: torch.Tensor, rotations: bool = False, spatial_dims: int | None = None) -> torch.Tensor:
    """Average maps over every combination of spatial-axis flips.

    Args:
        scores: ``(..., *spatial)`` maps.
        rotations: also average over the swap of the last two spatial axes (the in-plane axes) when they have the
            same size, so that together with the flips the maps are unchanged by in-plane 90-degree turns.
        spatial_dims: number of trailing spatial axes (default: every axis but the first).

    Returns:
        a tensor shaped like ``scores``.
    """
    spatial_dims = scores.ndim - 1 if spatial_dims is None else int(spatial_dims)
    axes = list(range(scores.ndim - spatial_dims, scores.ndim))
    out = torch.zeros_like(scores)
    for bits in itertools.product((False, True), repeat=len(axes)):
        dims = [a for a, b in zip(axes, bits) if b]
        out += scores.flip(dims) if dims else scores
    out = out / 2 ** len(axes)
    if rotations and scores.shape[-1] == scores.shape[-2]:
        out = (out + out.transpose(-1, -2)) / 2
    return out


def regional_rank(scores: torch.Tensor, regions: int) -> torch.Tensor:
    """Replace every score by its rank within its region, as a fraction in (0, 1].

    The spatial axes are cut into ``regions`` equal parts each (``regions ** dims`` regions). After this, a top-k
    over the whole map takes about the same share of every region, its most salient positions first: the mask is
    spread over the image instead of gathered in one place, so that no single hole (cutout) removes most of it.

    Args:
        scores: ``(B, *spatial)`` maps.
        regions: parts per axis; 1 ranks over the whole map (the top-k is then the same as on ``scores``).

    Returns:
        a float tensor shaped like ``scores``; ties keep their order by flat (C-order) index within a region.

    Raises:
        ValueError: for ``regions`` below 1 or above an axis's size.
    """
    spatial = scores.shape[1:]
    if regions < 1 or regions > min(spatial):
        raise ValueError(f"regions must be in [1, {min(spatial)}] for maps of {tuple(spatial)}, got {regions}.")
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    cuts = [[round(i * size / regions) for i in range(regions + 1)] for size in spatial]
    for cell in itertools.product(range(regions), repeat=len(spatial)):
        index = (slice(None), *[slice(c[i], c[i + 1]) for c, i in zip(cuts, cell)])
        part = scores[index].reshape(scores.shape[0], -1).float()
        order = torch.sort(part, dim=1, stable=True).indices
        ranks = torch.empty_like(part)
        ranks.scatter_(1, order, torch.arange(1, part.shape[1] + 1, dtype=part.dtype, device=part.device).expand_as(part))
        out[index] = (ranks / part.shape[1]).reshape(scores[index].shape)
    return out


def call_generator(generator: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Run a generator, passing labels only to label-conditioned ones.

    A generator is label-conditioned when it (or, for a ``DistributedDataParallel`` wrapper, its ``module``) has a
    truthy attribute ``label_conditioned``; it is then
    called as ``generator(images, labels)``, otherwise as ``generator(images)``.

    Raises:
        ValueError: when a conditioned generator gets no labels, or the output shape differs from the input.
    """
    if getattr(getattr(generator, "module", generator), "label_conditioned", False):
        if labels is None:
            raise ValueError("this generator is label-conditioned: a label is required (set label_key).")
        out = generator(images, labels.long().reshape(-1))
    else:
        out = generator(images)
    if out.shape != images.shape:
        raise ValueError(f"generator returned shape {tuple(out.shape)}, expected the input shape {tuple(images.shape)}.")
    return out


def resize_images(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a batch onto the working grid ``size`` (returned unchanged when it already has that size).

    Shrinking every axis averages the covered area (``mode="area"``, so no aliasing); otherwise the images are
    interpolated linearly (``bilinear``/``trilinear``, ``align_corners=False``).

    Args:
        images: ``(B, C, *spatial)`` float tensor, 2 or 3 spatial dimensions.
        size: the target spatial size.

    Returns:
        ``(B, C, *size)`` float tensor.

    Raises:
        ValueError: when ``size`` does not have one value per spatial dimension.
    """
    spatial = tuple(images.shape[2:])
    size = tuple(int(v) for v in size)
    if len(size) != len(spatial):
        raise ValueError(f"a working grid of {len(size)} dimension(s) for images of {len(spatial)}: {size}.")
    if size == spatial:
        return images
    if all(t <= s for t, s in zip(size, spatial)):
        return F.interpolate(images.float(), size=size, mode="area")
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(images.float(), size=size, mode=mode, align_corners=False)


def to_grid(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Map values defined on a working grid onto another grid by nearest neighbour (``nearest-exact``).

    Every target position takes the value of the working-grid position it falls in, so a 0/1 mask stays 0/1 and
    a bounded change stays within its bound; the result is ``values`` itself when the sizes already match.

    Args:
        values: ``(B, C, *spatial)`` tensor (a bool mask is mapped as uint8 and returned as bool).
        size: the target spatial size.

    Returns:
        ``(B, C, *size)`` tensor of the input's dtype.
    """
    size = tuple(int(v) for v in size)
    if tuple(values.shape[2:]) == size:
        return values
    if values.dtype == torch.bool:
        return F.interpolate(values.to(torch.uint8), size=size, mode="nearest-exact").bool()
    return F.interpolate(values, size=size, mode="nearest-exact")


def perturb(
    images: torch.Tensor,
    mask: torch.Tensor,
    raw_noise: torch.Tensor,
    epsilon: float,
    value_range: Sequence[float] = (0.0, 1.0),
) -> torch.Tensor:
    """SALM perturbation ``clip(x + M * eps * tanh(raw), lo, hi)``.

    ``mask`` and ``raw_noise`` may live on a working grid other than the images' own (a checkpoint trained at one
    size protecting scans of any size): the bounded change ``M * eps * tanh(raw)`` is computed there and mapped onto
    the images' grid with :func:`to_grid`, so each native position takes the change of the working-grid position
    it falls in. The guarantees hold on the native grid either way.

    Args:
        images: ``(B, C, *spatial)`` images.
        mask: ``(B, 1, *grid)`` (or broadcastable) 0/1 mask.
        raw_noise: generator output ``(B, C, *grid)``, on the mask's grid.
        epsilon: L-infinity bound in the units of ``images``.
        value_range: ``(lo, hi)`` valid intensity range.

    Returns:
        the protected images; ``|x' - x| <= epsilon`` and ``x' == x`` outside the (mapped) mask (for inputs
        already inside ``value_range``).
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    delta = mask.to(images.dtype) * (epsilon * torch.tanh(raw_noise.to(images.dtype)))
    spatial = images.shape[2:]
    inside = to_grid(mask.to(torch.bool), spatial).expand_as(images)
    protected = (images + to_grid(delta, spatial)).clamp_(lo, hi)
    # outside the mask return the input bit-for-bit, even where it lies outside value_range
    return torch.where(inside, protected, images)
