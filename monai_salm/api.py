"""High-level SALM entry points used by the command line and the bundle."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.handlers import from_engine
from monai.utils import CommonKeys as Keys
from monai.utils import set_determinism
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from monai_salm.engines import MAX_CLASSES, FreshModelMonitor, SALMSettings, SALMTrainer, train_reader
from monai_salm.engines.distributed import is_main, rank, world_size
from monai_salm.evaluation.countermeasures import differentiable_view
from monai_salm.networks import NoiseGenerator, build_classifier
from monai_salm.transforms.functional import (
    call_generator,
    mixed_precision,
    perturb,
    resize_images,
    resolve_k,
    saliency_scores,
    to_grid,
    topk_mask,
)

__all__ = [
    "DEFAULTS", "MAX_CLASSES", "make_dataset", "surrogate_optimizer", "train_salm", "protect_tensor", "protection_stats"
]

#: Defaults chosen by the sweep in docs/results.md.
DEFAULTS: dict[str, Any] = {
    "k": 0.1,
    "epsilon": 20 / 255,
    "psnr": 32.0,
    "mask_mode": "class",
    "flip_symmetric": True,
    "rotation_symmetric": False,
    "spread": 1,
    "placement": "salient",
    "image_term": True,
    "block": 4,
    "label_conditioned": True,
    "class_pattern": True,
    "pattern": "learned",
    "mask_refresh": 1,
    "refresh_samples": 0,
    "warmup_epochs": 0,
    "generator_steps": 1,
    "joint_step": False,
    "adversarial_radius": 0.0,
    "adversarial_steps": 2,
    "epochs": 10,
    "batch_size": 128,
    "surrogate_lr": 0.01,
    "generator_lr": 2e-3,
    "pattern_lr": None,
    "stop_accuracy": 0.99,
    "monitor_steps": 0,
    "robust_to": "flip,crop:2",
    "reader_weight": 0.0,
    "reader_epochs": 5,
    "reader_target": "clean",
}


def make_dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
    """MONAI dataset of ``{"image", "label", "index"}`` dictionaries over in-memory tensors."""
    return Dataset([{"image": images[i], "label": labels[i], "index": i} for i in range(images.shape[0])])


def surrogate_optimizer(parameters, lr: float = DEFAULTS["surrogate_lr"]) -> torch.optim.Optimizer:
    """The optimizer SALM trains its surrogate with: SGD, momentum 0.9, weight decay 5e-4.

    Args:
        parameters: the surrogate's parameters.
        lr: learning rate.

    Returns:
        the optimizer.
    """
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=5e-4)


def train_salm(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = DEFAULTS["epochs"],
    k: float | int = DEFAULTS["k"],
    epsilon: float = DEFAULTS["epsilon"],
    mask_mode: str = DEFAULTS["mask_mode"],
    flip_symmetric: bool = DEFAULTS["flip_symmetric"],
    rotation_symmetric: bool = DEFAULTS["rotation_symmetric"],
    spread: int = DEFAULTS["spread"],
    placement: str = DEFAULTS["placement"],
    image_term: bool = DEFAULTS["image_term"],
    block: int = DEFAULTS["block"],
    label_conditioned: bool = DEFAULTS["label_conditioned"],
    class_pattern: bool = DEFAULTS["class_pattern"],
    pattern: str = DEFAULTS["pattern"],
    mask_refresh: int = DEFAULTS["mask_refresh"],
    refresh_samples: int = DEFAULTS["refresh_samples"],
    warmup_epochs: int = DEFAULTS["warmup_epochs"],
    generator_steps: int = DEFAULTS["generator_steps"],
    joint_step: bool = DEFAULTS["joint_step"],
    adversarial_radius: float = DEFAULTS["adversarial_radius"],
    adversarial_steps: int = DEFAULTS["adversarial_steps"],
    batch_size: int = DEFAULTS["batch_size"],
    surrogate_lr: float = DEFAULTS["surrogate_lr"],
    generator_lr: float = DEFAULTS["generator_lr"],
    pattern_lr: float | None = DEFAULTS["pattern_lr"],
    stop_accuracy: float | None = DEFAULTS["stop_accuracy"],
    value_range: Sequence[float] = (0.0, 1.0),
    surrogate: str = "resnet18",
    generator_kwargs: dict | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    handlers: Sequence | None = None,
    progress: bool = False,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    monitor_steps: int = DEFAULTS["monitor_steps"],
    monitor_target: float | None = None,
    robust_to: str | None = DEFAULTS["robust_to"],
    reader_weight: float = DEFAULTS["reader_weight"],
    reader_epochs: int = DEFAULTS["reader_epochs"],
    reader_target: str = DEFAULTS["reader_target"],
    amp: bool | None = None,
) -> tuple[SALMTrainer, SALMSettings]:
    """Train SALM's surrogate and generator on in-memory images.

    Args:
        images: ``(N, C, *spatial)`` scaled to ``value_range``.
        labels: ``(N,)`` class indices.
        num_classes: number of classes.
        epochs .. generator_lr: see :class:`monai_salm.engines.SALMTrainer` and :data:`DEFAULTS`.
        rotation_symmetric: make the class masks and the learned class pattern unchanged by in-plane 90-degree
            turns as well as flips (``SALMTrainer(rotation_symmetric=...)``,
            ``NoiseGenerator(rotation_symmetric=...)``), so a victim that rotates its inputs sees each class's own
            pattern.
        spread: spread the class masks over ``spread`` parts per axis (``SALMTrainer(mask_spread=...)``), so that
            no single hole an attacker cuts out removes most of the pattern; 1 keeps the top k of the whole image.
        placement: ``"salient"`` puts each class mask on the class's most salient cells, ``"least-salient"`` on its
            least salient ones (``SALMTrainer(mask_placement=...)``).
        pattern_lr: Adam learning rate of the learned class pattern (None: ``generator_lr``). The pattern starts
            from random signs near saturation; at the generator's rate a 10-epoch training barely moves it, so a
            larger rate is what lets it learn.
        image_term: ``False`` trains the learned class pattern alone, without the generator's image-dependent UNet
            term (``NoiseGenerator(image_term=False)``): cheaper to train, and a class-mask release is a lookup.
        block: side of the solid cells, in pixels/voxels, that make up the class masks and the class pattern
            (``SALMTrainer(mask_block=...)``, ``NoiseGenerator(pattern_cell=...)``); 1 is single positions.
        class_pattern: give a label-conditioned generator a learnable per-class spatial pattern of the
            training image size (``NoiseGenerator(pattern_size=...)``) instead of one code per channel.
        pattern: the kind of that class pattern: ``"learned"`` (cells of learnable values) or ``"texture"`` (a fixed
            stripe or checkerboard texture per class, ``NoiseGenerator(pattern_kind=...)``).
        adversarial_radius, adversarial_steps: train against a robust surrogate, adding to each protected batch a
            PGD change of this L-inf radius and step count that raises its loss (``SALMTrainer(adversarial_radius=...,
            adversarial_steps=...)``); 0 turns it off.
        stop_accuracy: stop after the first epoch in which the surrogate's running accuracy on the protected
            batches reaches it (None: run all ``epochs``).
        progress: show an Ignite progress bar.
        val_images, val_labels: clean held-out data for the fresh-model monitor.
        monitor_steps: when > 0 (and validation data is given), attach a
            :class:`monai_salm.engines.FreshModelMonitor` training a fresh surrogate-architecture model for
            this many steps on up to 1024 protected training images after every epoch.
        monitor_target: stop once the fresh model's clean accuracy is at or below this.
        robust_to: countermeasures the surrogate sees the protected batch through in half the iterations, so the noise
            learns to survive them (:class:`~monai_salm.engines.SALMTrainer`): preprocessing (e.g. ``"median"``)
            or the attacker's own augmentations (the default ``"flip,crop:2"``: a random flip per axis and a random
            shift of up to 2 pixels/voxels; also ``rotate`` and ``cutout``, see
            :func:`~monai_salm.evaluation.countermeasures.differentiable_view`).
            ``None`` or ``""``: none.
        reader_weight: when > 0, first train a reader (a classifier of the surrogate's architecture) on the clean
            images for ``reader_epochs`` (:func:`~monai_salm.engines.train_reader`), then add
            ``reader_weight * KL(reader(x) || reader(x'))`` to the generator's loss (``SALMTrainer(reader=...,
            reader_weight=...)``), so that models trained on clean data read the release as they read the originals.
        reader_epochs: epochs of that reader's training.
        reader_target: ``"clean"``: the reader should read the protected image as the clean one; ``"uniform"``: it
            should read no class from it (``SALMTrainer(reader_target=...)``).
        amp: mixed precision (MONAI's ``amp``); ``None``: on for CUDA devices. On CUDA the loaders also pin memory
            and copies are non-blocking.

    Under ``torch.distributed`` (``torchrun``; see :func:`monai_salm.engines.distributed.distributed_context`) every
    process calls this with the same data: ``batch_size`` is the global batch, split evenly over the processes,
    the networks train under DistributedDataParallel, masks are computed on shards and combined, and ``handlers``
    and the progress bar run on rank 0 only. Every process returns the same trained networks. The fresh-model
    monitor is not shared out: each process runs it whole, with the same seed, so all reach the same stop decision.

    Returns:
        the finished trainer (with final masks) and the settings to store in a checkpoint.

    Raises:
        ValueError: for labels out of range or bad ``k``/``epsilon``/``spread``.
    """
    if not 2 <= int(num_classes) <= MAX_CLASSES:
        raise ValueError(f"SALM needs 2 to {MAX_CLASSES} classes, got {num_classes} (labels must be class indices "
                         "0, 1, ...).")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}].")
    resolve_k(k, math.prod(images.shape[2:]))
    if not 1 <= int(spread) <= min(images.shape[2:]):
        raise ValueError(f"spread must be in [1, {min(images.shape[2:])}] parts per axis for images of "
                         f"{tuple(images.shape[2:])}, got {spread}.")
    set_determinism(seed)
    spatial_dims, in_channels = images.ndim - 2, images.shape[1]
    generator_kwargs = dict(generator_kwargs or {})
    if class_pattern and label_conditioned:
        generator_kwargs.setdefault("pattern_size", list(images.shape[2:]))
        if pattern != "learned":
            generator_kwargs.setdefault("pattern_kind", pattern)
        else:
            if block > 1:
                generator_kwargs.setdefault("pattern_cell", int(block))
            if rotation_symmetric:
                generator_kwargs.setdefault("rotation_symmetric", True)
            if not image_term:
                generator_kwargs.setdefault("image_term", False)
    generator = NoiseGenerator(spatial_dims, in_channels, num_classes if label_conditioned else 0, **generator_kwargs)
    net = build_classifier(surrogate, spatial_dims, in_channels, num_classes, images.shape[2:])
    dataset = make_dataset(images, labels)
    cuda = torch.device(device).type == "cuda"
    amp = cuda if amp is None else bool(amp)
    processes = world_size()
    if batch_size % processes:
        raise ValueError(f"the batch size ({batch_size}) is the global batch and must be divisible by the number of "
                         f"processes ({processes}).")
    # a seeded sampler (the same order for any number of processes: rank r takes every r-th sample of each global
    # batch), so a run on N processes sees the batches of a one-process run
    sampler = DistributedSampler(dataset, num_replicas=processes, rank=rank(), shuffle=True, seed=seed)
    per_process = batch_size // processes
    loader = DataLoader(dataset, batch_size=per_process, sampler=sampler, drop_last=len(sampler) > per_process,
                        pin_memory=cuda)
    reader = None
    if reader_weight > 0:
        reader = train_reader(build_classifier(surrogate, spatial_dims, in_channels, num_classes, images.shape[2:]),
                              dataset, reader_epochs, batch_size=batch_size, seed=seed, device=device)
    trainer = SALMTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=loader,
        surrogate=net,
        generator=generator,
        surrogate_optimizer=surrogate_optimizer(net.parameters(), surrogate_lr),
        generator_optimizer=torch.optim.Adam(generator.parameter_groups(pattern_lr), lr=generator_lr),
        epsilon=epsilon,
        k=k,
        value_range=value_range,
        mask_mode=mask_mode,
        flip_symmetric=flip_symmetric,
        rotation_symmetric=rotation_symmetric,
        mask_spread=spread,
        mask_placement=placement,
        mask_block=block,
        mask_refresh=mask_refresh,
        refresh_samples=refresh_samples,
        generator_steps=generator_steps,
        joint_step=joint_step,
        adversarial_radius=adversarial_radius,
        adversarial_steps=adversarial_steps,
        warmup_epochs=warmup_epochs,
        stop_accuracy=stop_accuracy,
        mask_loader=DataLoader(dataset, batch_size=max(batch_size, 256), shuffle=False, pin_memory=cuda),
        seed=seed,
        surrogate_view=differentiable_view(robust_to, seed=seed) if robust_to else None,
        reader=reader,
        reader_weight=reader_weight,
        reader_target=reader_target,
        train_handlers=handlers if is_main() else None,
        amp=amp,
        non_blocking=cuda,
    )
    if monitor_steps > 0 and val_images is not None and val_labels is not None:
        subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:1024]
        FreshModelMonitor(
            lambda: build_classifier(surrogate, spatial_dims, in_channels, num_classes, images.shape[2:]),
            images[subset], labels[subset], subset, val_images, val_labels,
            steps=monitor_steps, target=monitor_target, seed=seed,
        ).attach(trainer)
    if progress and is_main():
        from ignite.handlers import ProgressBar

        loss = from_engine([Keys.LOSS], first=True)  # the output is decollated: a list of per-sample dicts
        ProgressBar(persist=True).attach(trainer, output_transform=lambda out: {"loss": loss(out)})
    start = time.perf_counter()
    trainer.run()
    trainer.refresh_masks()  # final masks and clean batch-norm statistics for release
    trainer.train_seconds = time.perf_counter() - start
    settings = SALMSettings(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=tuple(images.shape[2:]),
        epsilon=float(epsilon),
        k=k,
        value_range=tuple(float(v) for v in value_range),
        mask_mode=mask_mode,
        label_conditioned=label_conditioned,
        surrogate=surrogate,
        generator=generator_kwargs,
    )
    return trainer, settings


def protect_tensor(
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: SALMSettings,
    generator: torch.nn.Module,
    surrogate: torch.nn.Module | None,
    class_scores: torch.Tensor | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    amp: bool | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Protect images with a trained generator: one saliency gradient (or class mask) and one generator pass each.

    The images may have any spatial size. Mask and generator work on the checkpoint's working grid
    (``settings.image_size``): images of another size are resampled onto it (:func:`resize_images`), and the
    bounded change is mapped back onto their own grid by nearest neighbour (:func:`perturb`), so the release keeps
    the native size and the guarantees hold there (no change outside the mask, at most epsilon inside).

    Args:
        images: ``(N, C, *spatial)`` images in ``settings.value_range``, all of one size (any size).
        labels: ``(N,)`` class indices.
        settings, generator, surrogate, class_scores: the checkpoint's (:func:`monai_salm.engines.load_protection`);
            ``surrogate`` may be ``None`` for the ``class`` and ``random`` mask modes.
        batch_size: images per forward pass.
        device: torch device.
        seed: seed of the ``random`` mask mode.
        progress: show a progress bar.
        amp: run the networks in mixed precision (float16 on CUDA, bfloat16 on CPU); ``None``: on for CUDA. The
            perturbation is computed in float32 either way, so the bounds are exact.
        shard: ``(index, count)``: protect only the batches ``index, index + count, ...`` (one process's share
            under ``torch.distributed``); each batch comes out exactly as in a run over all of them.

    Returns:
        ``(protected, masks)`` on the CPU, at the images' own size (only the shard's batches, in order); masks are
        ``(N, 1, *spatial)`` bool.

    Raises:
        ValueError: when the images do not match the checkpoint (dims, channels, labels).
    """
    if images.ndim - 2 != settings.spatial_dims:
        raise ValueError(f"checkpoint is {settings.spatial_dims}D but the images are {images.ndim - 2}D.")
    if images.shape[1] != settings.in_channels:
        raise ValueError(f"checkpoint expects {settings.in_channels} channel(s), the images have {images.shape[1]}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= settings.num_classes):
        raise ValueError(f"labels must lie in [0, {settings.num_classes}) for this checkpoint.")
    if settings.mask_mode == "sample" and surrogate is None:
        raise ValueError("per-image saliency masks (mask_mode 'sample') need the surrogate, and this checkpoint has "
                         "none (a slim release checkpoint only serves the 'class' and 'random' mask modes).")
    generator = generator.to(device).eval()
    surrogate = None if surrogate is None else surrogate.to(device).eval()
    work = tuple(settings.image_size)
    autocast = mixed_precision(device, torch.device(device).type == "cuda" if amp is None else amp)
    rng = torch.Generator().manual_seed(seed)
    outs, masks = [], []
    index, count = shard
    # top-k works per map, so each class's mask is computed once instead of once per image
    class_masks = topk_mask(class_scores.to(device), settings.k) if settings.mask_mode == "class" else None
    for batch, start in enumerate(tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="protect")):
        stop = min(start + batch_size, images.shape[0])
        draws = torch.rand(stop - start, *work, generator=rng) if settings.mask_mode == "random" else None
        if batch % count != index:
            continue  # another process's batch (its random draws are taken all the same, to stay in step)
        x = images[start:stop].to(device, non_blocking=True).float()
        y = labels[start:stop].to(device, non_blocking=True).long()
        if settings.mask_mode == "class" and not getattr(generator, "reads_images", True):
            xw = x.new_zeros(()).expand(x.shape[0], x.shape[1], *work)  # the change is the class pattern alone
        else:
            xw = resize_images(x, work)
        if settings.mask_mode == "class":
            mask = class_masks[y]
        elif settings.mask_mode == "random":
            mask = topk_mask(draws.to(device), settings.k)
        else:
            with autocast:
                scores = saliency_scores(surrogate, xw, y)
            mask = topk_mask(scores.float(), settings.k)
        with torch.no_grad(), autocast:
            raw = call_generator(generator, xw, y).float()
        out = perturb(x, mask, raw, settings.epsilon, settings.value_range)
        inside = to_grid(mask.bool(), x.shape[2:])
        _check_release(x, out, inside, settings.epsilon)
        outs.append(out.cpu())
        masks.append(inside.cpu())
    if not outs:
        empty = images[:0].float()
        return empty, torch.zeros(0, 1, *images.shape[2:], dtype=torch.bool)
    return torch.cat(outs), torch.cat(masks)


def _check_release(clean: torch.Tensor, protected: torch.Tensor, inside: torch.Tensor, epsilon: float,
                   slab: int = 1 << 22) -> None:
    """Refuse a release that breaks its guarantees: finite, unchanged outside the mask, at most epsilon inside.

    Checked slab by slab, so a large volume needs no full-size temporaries.
    """
    flat_clean, flat_protected = clean.reshape(-1), protected.reshape(-1)
    flat_inside = inside.expand_as(clean).reshape(-1)
    for start in range(0, flat_clean.numel(), slab):
        c, p, m = (t[start : start + slab] for t in (flat_clean, flat_protected, flat_inside))
        if bool((~torch.isfinite(p) & m).any()):
            raise ValueError("the generator produced NaN or infinite values: the checkpoint is broken; nothing "
                             "written.")
        if bool(((p != c) & ~m).any()) or bool((((p - c).abs() > epsilon * 1.0001) & m).any()):
            raise ValueError(f"the protected images break the release bounds (at most {epsilon:.6g} inside the "
                             "mask, no change outside); nothing written.")


def protection_stats(clean, protected, data_range: float = 255.0) -> dict[str, float]:
    """Changed-position fraction, max absolute change and PSNR between two arrays of equal shape.

    Args:
        clean: original array (numpy or torch), any layout.
        protected: protected array of the same shape.
        data_range: peak value for PSNR (255 for uint8).

    Returns:
        ``{"changed_fraction", "max_abs_change", "psnr_db"}``; changed fraction counts array elements.
    """
    a = torch.as_tensor(clean).double()
    b = torch.as_tensor(protected).double()
    diff = (a - b).abs()
    mse = float((diff**2).mean())
    return {
        "changed_fraction": float((diff > 0).double().mean()),
        "max_abs_change": float(diff.max()) if diff.numel() else 0.0,
        "psnr_db": float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse),
    }
