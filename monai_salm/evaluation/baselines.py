"""Baseline protections that SALM is compared against (DESIGN.md section 4).

All functions take float images in [0, 1] shaped ``(N, C, H, W)`` or ``(N, C, D, H, W)`` (torch tensors or
numpy arrays) and return new torch tensors of the same shape, dtype and device; the inputs are never
modified.

- :func:`uniform_noise_in_mask`: i.i.d. uniform noise of the same budget in the same mask (the
  "is it just noise?" control).
- :func:`error_minimizing_noise`: full-image sample-wise error-minimizing noise, EM (Huang et al.,
  "Unlearnable Examples: Making Personal Data Unexploitable", ICLR 2021), the dense L-inf baseline.
- :func:`one_pixel_shortcut`: the model-free sparse shortcut OPS (Wu et al., "One-Pixel Shortcut: on the
  Learning Preference of Deep Neural Networks", ICLR 2023), the sparse, unbounded baseline.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_salm.networks import build_classifier
from monai_salm.transforms.functional import recalibrate_batchnorm

__all__ = ["error_minimizing_noise", "one_pixel_shortcut", "uniform_noise_in_mask"]

#: OPS: a class's deviation std below this counts as this value (a constant position is a perfect shortcut;
#: the floor keeps the score finite and lets the larger mean deviation win among constant positions).
_OPS_STD_FLOOR = 1e-6


# --------------------------------------------------------------------------------------------- validation
def _check_images(images, name: str = "images") -> torch.Tensor:
    """Return ``images`` as a floating tensor ``(N, C, *spatial)`` with 2 or 3 spatial dims, in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(images).__name__}.")
    if images.ndim not in (4, 5):
        raise ValueError(
            f"{name} must be shaped (N, C, H, W) or (N, C, D, H, W), got shape {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor scaled to [0, 1], got dtype {images.dtype}.")
    if images.shape[0] == 0 or images[0].numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}.")
    lo, hi = float(images.min()), float(images.max())
    if not (0.0 <= lo and hi <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo}, {hi}].")
    return images


def _check_epsilon(epsilon) -> float:
    eps = float(epsilon)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"epsilon must lie in (0, 1] (an L-inf budget in the [0, 1] scale), got {epsilon!r}.")
    return eps


def _check_labels(labels, num: int, num_classes) -> torch.Tensor:
    """Return labels as a CPU ``int64`` tensor ``(N,)``; accepts ``(N,)`` or MedMNIST-style ``(N, 1)``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    labels = torch.as_tensor(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != num:
        raise ValueError(f"labels must be shaped ({num},) to match the images, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    labels = labels.detach().to("cpu", torch.long)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, got [{lo}, {hi}].")
    return labels


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------------------------- random noise
def uniform_noise_in_mask(images, masks, epsilon: float, seed: int = 0) -> torch.Tensor:
    """Add i.i.d. uniform noise in ``[-epsilon, epsilon]`` on the masked positions only.

    The control for SALM: the same budget in the same mask, but noise that carries no shortcut. Noise is
    drawn for every element (channels independently) from a CPU ``torch.Generator`` seeded with ``seed``, so
    the result depends only on ``seed`` and the shapes, not on the device or the global RNG.

    Args:
        images: ``(N, C, *spatial)`` floating tensor (or numpy array) in [0, 1], 2 or 3 spatial dims.
        masks: boolean tensor/array with as many dimensions as ``images`` and broadcastable to it, e.g. a
            SALM mask ``(N, 1, *spatial)``. A 0/1 numeric mask is accepted too.
        epsilon: L-inf budget in (0, 1].
        seed: seed of the noise.

    Returns:
        a new tensor like ``images`` with ``|out - images| <= epsilon`` (up to float rounding), ``out ==
        images`` exactly where the mask is False, and values in [0, 1] (clamped).

    Raises:
        TypeError: when ``images`` is neither a torch tensor nor a numpy array.
        ValueError: for images that are not ``(N, C, *spatial)`` floats in [0, 1], a mask that does not
            broadcast to them or is not binary, or ``epsilon`` outside (0, 1].
    """
    images = _check_images(images)
    eps = _check_epsilon(epsilon)
    masks = torch.as_tensor(masks)
    if masks.ndim != images.ndim:
        raise ValueError(
            f"masks must have as many dimensions as images ({images.ndim}), got shape {tuple(masks.shape)}."
        )
    try:
        shape = torch.broadcast_shapes(masks.shape, images.shape)
    except RuntimeError:
        shape = None
    if shape != images.shape:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not broadcast to images {tuple(images.shape)}.")
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be boolean (or contain only 0 and 1).")
        masks = masks != 0
    gen = torch.Generator().manual_seed(int(seed))
    noise = (torch.rand(images.shape, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * eps
    noise = noise.to(device=images.device, dtype=images.dtype)
    noisy = (images + noise).clamp(0.0, 1.0)
    return torch.where(masks.to(images.device).expand_as(images), noisy, images)


# --------------------------------------------------------------------------------------------- EM
def _batches(num: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled index batches (full batches only when ``num > batch_size``)."""
    while True:
        perm = torch.randperm(num, generator=gen)
        stop = num - num % batch_size if num > batch_size else num
        for start in range(0, stop, min(batch_size, num)):
            yield perm[start : start + batch_size]


def _slices(num: int, batch_size: int) -> list[slice]:
    """Consecutive batches; a trailing batch of one sample joins the previous one (batch norm needs two)."""
    starts = list(range(0, num, batch_size))
    if len(starts) > 1 and num - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [num])]


@torch.no_grad()
def _accuracy(model, images, delta, labels, batch_size, device) -> float:
    model.eval()
    correct = 0
    for sl in _slices(len(images), batch_size):
        pred = model((images[sl] + delta[sl]).clamp(0.0, 1.0).to(device)).argmax(1).cpu()
        correct += int((pred == labels[sl]).sum())
    return correct / len(images)


def error_minimizing_noise(
    images,
    labels,
    num_classes: int,
    epsilon: float,
    *,
    surrogate: str | torch.nn.Module = "resnet18",
    steps: int = 10,
    step_size: float | None = None,
    train_steps: int = 10,
    max_rounds: int = 10,
    stop_accuracy: float = 0.99,
    batch_size: int = 128,
    lr: float = 0.1,
    recalibrate_bn: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Full-image sample-wise error-minimizing noise (EM, Huang et al., ICLR 2021), L-inf.

    The bi-level min-min optimisation of "Unlearnable Examples", sample-wise version:

    1. ``delta`` starts uniform in ``[-eps, eps]`` (then ``x + delta`` is clipped to [0, 1]).
    2. Each round: train the surrogate ``train_steps`` SGD steps (momentum 0.9, weight decay 5e-4, as in
       the reference code) on shuffled batches of ``x + delta`` (the shuffled stream continues across
       rounds); then, in eval mode, run ``steps`` PGD steps for every image that *minimise* the
       cross-entropy: ``delta <- clip(delta - step_size * sign(grad_delta CE), -eps, eps)`` followed by
       ``delta <- clip(x + delta, 0, 1) - x``; finally measure the surrogate's accuracy on ``x + delta``
       (eval mode) and stop when it is ``>= stop_accuracy`` or after ``max_rounds`` rounds.

    Default ``step_size = eps / 5``: with the default 10 steps a sample can move ``2 * eps`` per round,
    i.e. from one face of the L-inf ball to the other, the same steps x step size product as the reference
    setting (20 steps of ``eps / 10``), at half the PGD cost.

    Deviation from the reference code: with ``recalibrate_bn`` (default) the batch-norm running statistics
    are re-estimated on ``x + delta`` before the PGD and the accuracy check of each round. With only a few
    SGD steps per round the running averages otherwise still mix in their initial values and the eval-mode
    surrogate predicts one class (DESIGN.md section 7); training itself is unaffected.

    Determinism: the surrogate initialisation (under a forked global RNG, which is left untouched), the
    initial noise and the shuffling are all seeded by ``seed``; results are bit-identical on CPU for a
    seed (on CUDA up to cuDNN's nondeterministic kernels).

    Args:
        images: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` floating tensor (or numpy array) in [0, 1].
        labels: ``(N,)`` (or ``(N, 1)``) integer class indices in ``[0, num_classes)``.
        num_classes: number of classes.
        epsilon: L-inf budget in (0, 1].
        surrogate: a name for :func:`monai_salm.networks.build_classifier` (a fresh, seeded network), or an
            ``nn.Module`` that is deep-copied (its weights are the start; the caller's module is not trained).
        steps: PGD steps per image per round.
        step_size: PGD step; ``None`` means ``epsilon / 5``.
        train_steps: surrogate SGD steps per round.
        max_rounds: maximum number of rounds.
        stop_accuracy: stop once the surrogate's accuracy on ``x + delta`` reaches this, in (0, 1].
        batch_size: batch size for training, PGD and evaluation (bounds the memory on ``device``).
        lr: surrogate SGD learning rate (0.1 as in the reference; DESIGN.md section 7 found 0.01 safer for
            ResNet-18 on small sets).
        recalibrate_bn: re-estimate batch-norm statistics on ``x + delta`` each round (see above).
        seed: random seed.
        device: where the surrogate runs; images stay where they are and are moved batch by batch.
        progress: show a progress bar over rounds.

    Returns:
        ``(protected, info)``: ``protected = clip(x + delta, 0, 1)`` like ``images`` (same dtype and device),
        with ``|protected - images| <= epsilon`` (up to float rounding); ``info`` holds ``rounds`` (rounds
        run), ``final_accuracy`` (surrogate accuracy on the protected images after the last round),
        ``accuracy_history`` (one value per round) and ``seconds`` (wall time).

    Raises:
        TypeError: when ``images`` is neither a torch tensor nor a numpy array.
        ValueError: for malformed images or labels, labels out of range, ``epsilon`` outside (0, 1],
            ``stop_accuracy`` outside (0, 1], non-positive ``step_size``/``lr`` or step/round/batch counts
            below 1, or an unknown surrogate name.
    """
    start_time = time.perf_counter()
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0], num_classes)
    eps = _check_epsilon(epsilon)
    steps = _check_positive_int(steps, "steps")
    train_steps = _check_positive_int(train_steps, "train_steps")
    max_rounds = _check_positive_int(max_rounds, "max_rounds")
    batch_size = _check_positive_int(batch_size, "batch_size")
    alpha = eps / 5.0 if step_size is None else float(step_size)
    if not alpha > 0.0:
        raise ValueError(f"step_size must be positive, got {step_size!r}.")
    if not float(lr) > 0.0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if not 0.0 < float(stop_accuracy) <= 1.0:
        raise ValueError(f"stop_accuracy must lie in (0, 1], got {stop_accuracy!r}.")
    device = torch.device(device)

    # work on a private float32 CPU copy; batches move to `device`
    x = images.detach().to("cpu", torch.float32).clone()
    spatial_dims, in_channels = x.ndim - 2, x.shape[1]
    if isinstance(surrogate, torch.nn.Module):
        model = copy.deepcopy(surrogate)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = build_classifier(surrogate, spatial_dims, in_channels, num_classes, image_size=tuple(x.shape[2:]))
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.9, weight_decay=5e-4)

    gen = torch.Generator().manual_seed(int(seed))
    delta = (torch.rand(x.shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * eps
    delta = (x + delta).clamp(0.0, 1.0) - x
    stream = _batches(len(x), batch_size, gen)

    history: list[float] = []
    bar = tqdm(range(1, max_rounds + 1), disable=not progress, desc="EM rounds")
    for _ in bar:
        # 1) surrogate steps on x + delta
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        for _ in range(train_steps):
            idx = next(stream)
            xb = (x[idx] + delta[idx]).clamp(0.0, 1.0).to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), labels[idx].to(device)).backward()
            optimizer.step()
        if recalibrate_bn:
            perturbed = ((x[sl] + delta[sl]).clamp(0.0, 1.0).to(device) for sl in _slices(len(x), batch_size))
            recalibrate_batchnorm(model, perturbed)
        # 2) sample-wise PGD that minimises the loss, eval mode, parameters frozen
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for sl in _slices(len(x), batch_size):
            xb, yb, db = x[sl].to(device), labels[sl].to(device), delta[sl].clone().to(device)
            for _ in range(steps):
                db.requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(model((xb + db).clamp(0.0, 1.0)), yb)
                    (grad,) = torch.autograd.grad(loss, db)
                db = (db.detach() - alpha * grad.sign()).clamp(-eps, eps)
                db = (xb + db).clamp(0.0, 1.0) - xb
            delta[sl] = db.detach().cpu()
        for p in model.parameters():
            p.requires_grad_(True)
        # 3) stop condition
        acc = _accuracy(model, x, delta, labels, batch_size, device)
        history.append(acc)
        bar.set_postfix(accuracy=f"{acc:.3f}")
        if acc >= stop_accuracy:
            break
    bar.close()

    protected = (x + delta).clamp(0.0, 1.0).to(device=images.device, dtype=images.dtype)
    info = {
        "rounds": len(history),
        "final_accuracy": history[-1],
        "accuracy_history": history,
        "seconds": time.perf_counter() - start_time,
    }
    return protected, info


# --------------------------------------------------------------------------------------------- OPS
def one_pixel_shortcut(images, labels, num_classes: int) -> tuple[torch.Tensor, dict]:
    """One-Pixel Shortcut (OPS, Wu et al., ICLR 2023): one fixed pixel/voxel per class, model-free.

    For every class ``k`` (greedily, in class order) the search scores every spatial position ``p`` and
    every corner ``v`` of the value cube ``{0, 1}^C`` by the objective of the authors' reference code:

    ``score_k(p, v) = mean(d) / max(std(d), 1e-6)``,  ``d = |x_c[p] - v_c|`` over all images ``x`` of class
    ``k`` and all channels ``c`` (one pool of ``n_k * C`` values; population std, ``ddof = 0``),

    i.e. the position where the class's images lie far from the target value *and* consistently so. The
    std floor keeps constant positions (a perfect shortcut) finite and ranks them by their mean deviation.
    The best ``(p, v)`` whose position no earlier class took is chosen (the reference code only excludes
    identical position *and* value; distinct positions make every class's pixel unambiguous); ties go to
    the lowest flat position index, then the lowest corner index. Then ``x[:, p] = v`` for every image of
    class ``k``. The statistics come from per-class sums of ``x`` and ``x ** 2`` (one batched pass, float64),
    so nothing loops over pixels.

    OPS is unbounded in L-inf by design: the changed value can move by up to 1 (the whole range). It is
    L0-sparse instead: at most one position per image changes (none if it already held the target value).

    Args:
        images: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` floating tensor (or numpy array) in [0, 1].
        labels: ``(N,)`` (or ``(N, 1)``) integer class indices in ``[0, num_classes)``.
        num_classes: number of classes; at most the number of spatial positions.

    Returns:
        ``(protected, info)``: a new tensor like ``images``, and ``info`` with ``positions`` (per class a
        tuple of spatial indices, ``(h, w)`` or ``(d, h, w)``, or ``None`` for a class without images),
        ``values`` (per class a tuple of ``C`` floats, each 0.0 or 1.0, or ``None``), ``scores`` (the chosen
        objective values, ``None`` for absent classes) and ``seconds``.

    Raises:
        TypeError: when ``images`` is neither a torch tensor nor a numpy array.
        ValueError: for malformed images or labels, labels out of range, or more classes than positions.
    """
    start_time = time.perf_counter()
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0], num_classes)
    num, channels, spatial = images.shape[0], images.shape[1], tuple(images.shape[2:])
    num_pos = int(np.prod(spatial))
    if num_classes > num_pos:
        raise ValueError(f"OPS needs a distinct position per class: {num_classes} classes > {num_pos} positions.")

    # per-class sums of x and x^2 for every (channel, position), batch by batch in float64
    flat = images.detach().reshape(num, channels, num_pos)
    s1 = torch.zeros(num_classes, channels, num_pos, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for start in range(0, num, 256):
        xb = flat[start : start + 256].to("cpu", torch.float64)
        yb = labels[start : start + 256]
        s1.index_add_(0, yb, xb)
        s2.index_add_(0, yb, xb * xb)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)

    # corners of {0,1}^C, corner j has bit c = (j >> (C-1-c)) & 1 (channel 0 most significant, as the reference)
    corner_ids = torch.arange(2**channels)
    bits = (corner_ids[:, None] >> torch.arange(channels - 1, -1, -1)[None, :]) & 1  # (V, C)
    bitsf = bits.to(torch.float64)[:, :, None]  # (V, C, 1)

    taken = torch.zeros(num_pos, dtype=torch.bool)
    positions: list = [None] * num_classes
    values: list = [None] * num_classes
    scores: list = [None] * num_classes
    pos_table = torch.zeros(num_classes, dtype=torch.long)
    val_table = torch.zeros(num_classes, channels, dtype=images.dtype)
    for k in range(num_classes):
        n = float(counts[k])
        if n == 0:
            continue
        # d = x for target 0, d = 1 - x for target 1:  sum d = S1 or n - S1;  sum d^2 = S2 or n - 2 S1 + S2
        sum_d = (1 - bitsf) * s1[k][None] + bitsf * (n - s1[k][None])  # (V, C, P)
        sum_d2 = (1 - bitsf) * s2[k][None] + bitsf * (n - 2 * s1[k][None] + s2[k][None])
        pool = n * channels
        mean = sum_d.sum(1) / pool  # (V, P)
        var = (sum_d2.sum(1) / pool - mean**2).clamp_min(0.0)
        score = mean / var.sqrt().clamp_min(_OPS_STD_FLOOR)
        score[:, taken] = -1.0  # scores are >= 0, so any free position beats a taken one
        # position-major flat order so that ties go to the lowest position, then the lowest corner
        best = int(torch.argmax(score.t().reshape(-1)))
        pos, corner = divmod(best, 2**channels)
        taken[pos] = True
        pos_table[k] = pos
        val_table[k] = bits[corner].to(images.dtype)
        positions[k] = tuple(int(i) for i in np.unravel_index(pos, spatial))
        values[k] = tuple(float(b) for b in bits[corner])
        scores[k] = float(score[corner, pos])

    protected = images.detach().clone(memory_format=torch.contiguous_format)
    out = protected.view(num, channels, num_pos)
    rows = torch.arange(num, device=images.device)
    out[rows, :, pos_table[labels].to(images.device)] = val_table[labels].to(images.device)
    info = {"positions": positions, "values": values, "scores": scores, "seconds": time.perf_counter() - start_time}
    return protected, info
