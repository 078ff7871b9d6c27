"""Ignite/MONAI workflow for SALM's alternating min-min training (DESIGN.md 2.4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy
from monai.data import DistributedSampler
from monai.engines import IterationEvents, Trainer
from monai.engines.workflow import Workflow
from monai.handlers import from_engine
from monai.utils import CommonKeys as Keys
from torch.utils.data import DataLoader, Dataset, Subset

from monai_salm.engines.distributed import all_reduce, average_buffers, gather, is_main, unwrap, world_size, wrap_ddp
from monai_salm.evaluation.countermeasures import ADVERSARIAL_STEP_FACTOR, pgd_attack
from monai_salm.transforms.functional import (
    batchnorm_statistics,
    block_average,
    call_generator,
    flip_average,
    mixed_precision,
    perturb,
    regional_rank,
    saliency_scores,
    topk_mask,
)

__all__ = ["SALMTrainer", "MASK_MODES", "PLACEMENTS", "READER_TARGETS", "INDEX_KEY", "flip_average"]

MASK_MODES = ("sample", "class", "random")
#: Where class masks sit: on the class's most salient cells (the default) or on its least salient ones.
PLACEMENTS = ("salient", "least-salient")
#: What the reader term asks a model trained on clean data to read from a protected image.
READER_TARGETS = ("clean", "uniform")
INDEX_KEY = "index"


def _pred_and_label(output: dict | list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` batch tensors from a batched or decollated engine output."""
    pred, label = from_engine([Keys.PRED, Keys.LABEL])(output)
    if isinstance(pred, list):
        pred, label = torch.stack(pred), torch.as_tensor([int(v) for v in label])
    return pred, label


def _grow(sums: torch.Tensor | None, counts: torch.Tensor | None, num_classes: int, spatial: Sequence[int],
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class score sums ``(num_classes, *spatial)`` and counts, zero-padded to at least ``num_classes`` rows."""
    if sums is None:
        return torch.zeros(num_classes, *spatial, device=device), torch.zeros(num_classes, device=device)
    grow = num_classes - sums.shape[0]
    if grow <= 0:
        return sums, counts
    return torch.cat([sums, sums.new_zeros(grow, *sums.shape[1:])]), torch.cat([counts, counts.new_zeros(grow)])


class SALMTrainer(Trainer):
    """SALM min-min trainer: a surrogate classifier and a noise generator that both minimise the
    surrogate's cross-entropy on protected images ``x' = clip(x + M * eps * tanh(G(x, y)))``.

    Each iteration takes one batch and runs one surrogate step followed by ``generator_steps``
    generator steps (or, with ``joint_step``, one step of both networks on one backward pass, then the remaining
    ``generator_steps - 1`` generator steps). Masks are (re)computed from the surrogate's saliency before the first
    epoch and every ``mask_refresh`` epochs from clean images, each batch scored with its own batch-norm statistics
    while the running statistics are re-estimated on the same batches. The run stops when the surrogate's running
    accuracy on protected images reaches ``stop_accuracy`` (after ``min_epochs``) or at ``max_epochs``.

    Under ``torch.distributed`` (e.g. launched by ``torchrun``) the networks are wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` for their training steps (or may be passed wrapped), so their
    gradients are averaged over the processes; give ``train_data_loader`` a ``DistributedSampler`` with this
    process's share of the global batch. Masks are computed on each process's shard of the data and combined: class
    score maps summed, per-sample masks gathered, batch-norm statistics averaged, so every process holds the same
    masks; the key metric is reduced by Ignite, so the stop rule agrees. :attr:`surrogate` and :attr:`generator` are
    always the bare networks (what a checkpoint stores).

    Batches are dictionaries with ``"image"`` (``B, C, *spatial``, scaled to ``value_range``),
    ``"label"`` (class indices) and ``"index"`` (position of the sample in ``train_data_loader.dataset``).
    Engine outputs use MONAI's keys (``image`` = protected batch, ``label``, ``pred``, ``loss``) plus
    ``generator_loss``, so MONAI handlers work unchanged; the key metric is ``protected_accuracy``.

    Args:
        device: torch device.
        max_epochs: maximum number of epochs.
        train_data_loader: loader of dictionaries as above.
        surrogate: classifier f.
        generator: noise generator G (label-conditioned generators get labels).
        surrogate_optimizer: optimizer of f.
        generator_optimizer: optimizer of G.
        epsilon: L-infinity budget in ``value_range`` units.
        k: sparsity, fraction in (0, 1] or integer count of positions.
        value_range: intensity range of the scaled images.
        mask_mode: ``"sample"`` (per-image saliency, the paper), ``"class"`` (top-k of the class-average
            normalised saliency; every image of a class shares the positions) or ``"random"`` (the
            random-mask ablation, a fixed random top-k per image).
        flip_symmetric: in ``"class"`` mode, average each class score map over all axis flips before
            taking the top k, so the class pattern is unchanged by flip augmentation.
        rotation_symmetric: in ``"class"`` mode, also average over in-plane 90-degree turns (square in-plane
            grids), so the class masks are unchanged by rotation augmentation too.
        mask_spread: in ``"class"`` mode, rank each class score map within ``mask_spread`` parts per axis before
            the top k (:func:`regional_rank`), so the mask is spread over the image; 1: one region.
        mask_placement: in ``"class"`` mode, ``"salient"`` puts each class mask on the class's most salient cells;
            ``"least-salient"`` on its least salient ones (the stored class scores are turned over, so a release
            takes the same cells), where a clean image carries little of what tells the classes apart.
        mask_block: in ``"class"`` mode, average each class score map over cells of this side before the top k,
            so the mask is made of solid blocks (which a 3x3 median filter or a small blur cannot remove)
            instead of scattered positions; 1 keeps single positions.
        mask_refresh: recompute masks every this many epochs (0: only before the first epoch).
        refresh_samples: in ``"class"`` mode, the refreshes after the first score only a seeded random subset of this
            many training images (every class kept in it), chosen once from the labels the first refresh read; a
            class mask is the top k of a class average, which a subset estimates at a fraction of the cost. 0 (the
            default) scores every image each time. An explicit :meth:`refresh_masks` call (the one before release)
            scores every image either way.
        generator_steps: generator steps per iteration.
        joint_step: update the surrogate and the generator from one forward and backward pass through both (both
            minimise the same loss, so one pass gives each its gradient; the generator's is taken at the surrogate's
            weights before their update), instead of a surrogate step followed by a generator step. Saves one
            surrogate forward and backward pass per iteration.
        adversarial_radius: train against a robust surrogate (as REM does): each iteration adds to the protected
            batch an L-inf PGD perturbation of this radius that raises the surrogate's loss, in the surrogate and
            the generator steps alike, so the generator has to find noise that stays a shortcut for a surrogate
            trained adversarially, as an attacker's may be; 0 (the default) turns it off. Needs ``value_range``
            ``(0, 1)``.
        adversarial_steps: PGD steps of that perturbation (step size ``2.5 * radius / steps``, as the evaluation's
            PGD attacker); each costs one more surrogate forward and backward pass per iteration.
        warmup_epochs: epochs of surrogate training on clean images before min-min starts.
        stop_accuracy: stop when the protected-data accuracy of an epoch reaches it (None: never).
        min_epochs: do not stop before this many epochs.
        mask_loader: loader over the same dataset in order used to compute masks; by default one is
            built from ``train_data_loader.dataset``. Under ``torch.distributed`` each process reads its own shard
            of its dataset.
        seed: seed of the random-mask ablation and of ``surrogate_view``'s coin.
        surrogate_view: a countermeasure the protection must survive (e.g. a median filter), applied to the
            protected batch before the surrogate sees it, in the surrogate and the generator steps, with
            probability ``view_prob`` per iteration. It should be differentiable, or pass gradients straight
            through (see :func:`monai_salm.evaluation.countermeasures.differentiable_view`).
        view_prob: probability of applying ``surrogate_view`` in an iteration.
        reader: a frozen classifier trained on clean images, standing for the legitimate reader of a release (a
            model trained on clean data). With ``reader_weight > 0`` the generator's loss adds
            ``reader_weight * KL(reader(x) || reader(x'))``: the generator is asked to leave what such a model reads
            from an image unchanged, so that readers of the release see what they would see in the originals and the
            shortcut is not also a push along the anatomy's own direction (docs/results.md measures how far either
            holds). Kept in eval mode; costs one reader forward and backward pass per generator step.
        reader_weight: weight of that term; 0 (the default) turns it off.
        reader_target: what the reader should read from the protected images: ``"clean"`` (the default) what it reads
            from the clean ones, as above; ``"uniform"`` no class at all, ``KL(uniform || reader(x'))``, so the change
            also erases what a model trained on clean data reads from the image and the shortcut is left as the
            easiest thing to learn from the release.
        train_handlers: MONAI/Ignite handlers to attach.
        kwargs: passed to :class:`monai.engines.Trainer` (``epoch_length``, ``amp``, ``non_blocking``, ...). With
            ``amp=True`` the networks run under ``torch.autocast`` (float16 on CUDA, with a gradient scaler per
            optimizer as MONAI's ``GanTrainer`` does; bfloat16 on CPU); the perturbation itself is always computed
            in float32, so the epsilon bound is exact.

    Raises:
        ValueError: for an unknown ``mask_mode``, a bad ``k``/``epsilon`` or a ``stop_accuracy`` outside (0, 1].
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        surrogate: torch.nn.Module,
        generator: torch.nn.Module,
        surrogate_optimizer: torch.optim.Optimizer,
        generator_optimizer: torch.optim.Optimizer,
        epsilon: float,
        k: float | int,
        value_range: Sequence[float] = (0.0, 1.0),
        mask_mode: str = "sample",
        flip_symmetric: bool = False,
        rotation_symmetric: bool = False,
        mask_spread: int = 1,
        mask_placement: str = "salient",
        mask_block: int = 1,
        mask_refresh: int = 1,
        refresh_samples: int = 0,
        generator_steps: int = 1,
        joint_step: bool = False,
        adversarial_radius: float = 0.0,
        adversarial_steps: int = 2,
        warmup_epochs: int = 0,
        stop_accuracy: float | None = 0.99,
        min_epochs: int = 1,
        mask_loader: DataLoader | None = None,
        seed: int = 0,
        surrogate_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
        view_prob: float = 0.5,
        reader: torch.nn.Module | None = None,
        reader_weight: float = 0.0,
        reader_target: str = "clean",
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}.")
        lo, hi = (float(v) for v in value_range)
        if not 0.0 < float(epsilon) <= hi - lo:
            raise ValueError(f"epsilon={epsilon} must be in (0, {hi - lo}] for value_range {(lo, hi)}.")
        if not isinstance(k, (int, float)) or isinstance(k, bool) or k <= 0 or (isinstance(k, float) and k > 1):
            raise ValueError(f"k must be a fraction in (0, 1] or a positive integer count, got {k!r}.")
        if mask_placement not in PLACEMENTS:
            raise ValueError(f"mask_placement must be one of {PLACEMENTS}, got {mask_placement!r}.")
        if mask_placement != "salient" and mask_mode != "class":
            raise ValueError(f"mask_placement={mask_placement!r} needs mask_mode='class', got {mask_mode!r}.")
        if float(adversarial_radius) < 0 or int(adversarial_steps) < 1:
            raise ValueError(f"adversarial_radius must be >= 0 and adversarial_steps >= 1, got {adversarial_radius} "
                             f"and {adversarial_steps}.")
        if float(adversarial_radius) > 0 and (lo, hi) != (0.0, 1.0):
            raise ValueError(f"adversarial_radius needs value_range (0, 1), got {(lo, hi)}.")
        if int(mask_spread) < 1:
            raise ValueError(f"mask_spread must be a positive integer, got {mask_spread}.")
        if float(reader_weight) < 0 or (float(reader_weight) > 0 and reader is None):
            raise ValueError(f"reader_weight must be >= 0, and > 0 needs a reader, got {reader_weight} with "
                             f"{'no reader' if reader is None else 'a reader'}.")
        if reader_target not in READER_TARGETS:
            raise ValueError(f"reader_target must be one of {READER_TARGETS}, got {reader_target!r}.")
        if int(refresh_samples) < 0:
            raise ValueError(f"refresh_samples must be >= 0, got {refresh_samples}.")
        if stop_accuracy is not None and not 0.0 < float(stop_accuracy) <= 1.0:
            raise ValueError(f"stop_accuracy must be an accuracy in (0, 1] or None, got {stop_accuracy!r}.")
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            key_metric={"protected_accuracy": Accuracy(output_transform=_pred_and_label)},
            handlers=train_handlers,
            **kwargs,
        )
        # the training steps run through DDP wrappers when distributed; the bare networks serve everything else
        # any classifier may serve as surrogate, and some (MONAI's ViT) leave parameters unused
        self.surrogate_step_net = wrap_ddp(surrogate.to(self.state.device), self.state.device,
                                           find_unused_parameters=True)
        generator = generator.to(self.state.device)
        # a generator with nothing to train (a fixed texture pattern) skips its steps
        self.train_generator = any(p.requires_grad for p in unwrap(generator).parameters())
        self.generator_step_net = wrap_ddp(generator, self.state.device) if self.train_generator else generator
        self.surrogate = unwrap(self.surrogate_step_net)
        self.generator = unwrap(self.generator_step_net)
        self.surrogate_optimizer = surrogate_optimizer
        self.generator_optimizer = generator_optimizer
        self.epsilon = float(epsilon)
        self.k = k
        self.value_range = (lo, hi)
        self.mask_mode = mask_mode
        self.flip_symmetric = bool(flip_symmetric)
        self.rotation_symmetric = bool(rotation_symmetric)
        self.mask_spread = int(mask_spread)
        self.mask_placement = mask_placement
        self.mask_block = int(mask_block)
        self.mask_refresh = int(mask_refresh)
        self.refresh_samples = int(refresh_samples)
        self.generator_steps = int(generator_steps)
        self.joint_step = bool(joint_step)
        self.adversarial_radius = float(adversarial_radius)
        self.adversarial_steps = int(adversarial_steps)
        self.warmup_epochs = int(warmup_epochs)
        self.stop_accuracy = stop_accuracy
        self.min_epochs = int(min_epochs)
        self.seed = int(seed)
        self.surrogate_view = surrogate_view
        self.view_prob = float(view_prob)
        self._view_coin = torch.Generator().manual_seed(self.seed)
        self.reader_weight = float(reader_weight)
        self.reader_target = reader_target
        self.reader = None
        if reader is not None and self.reader_weight > 0:
            self.reader = reader.to(self.state.device).eval().requires_grad_(False)
        use_scaler = bool(self.amp) and self.state.device.type == "cuda"
        self.surrogate_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.generator_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.mask_loader = mask_loader or DataLoader(
            train_data_loader.dataset, batch_size=getattr(train_data_loader, "batch_size", None) or 64, shuffle=False
        )
        self.shard_loader = self._shard(self.mask_loader.dataset)
        self.subset_loader: DataLoader | None = None  # the refresh_samples subset, chosen at the first refresh
        self.masks: torch.Tensor | None = None  # (N, 1, *spatial) bool, per sample
        self.class_scores: torch.Tensor | None = None  # (num_classes, *spatial), class mode
        self.add_event_handler(Events.STARTED, self._on_started)
        self.add_event_handler(Events.EPOCH_STARTED, self._maybe_refresh_masks)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_stop)

    def run(self) -> None:
        """Run the training. The gradient scalers are this trainer's own, one per optimizer (see ``amp``), so MONAI's
        single ``Trainer.scaler`` is not made."""
        Workflow.run(self)

    # ----------------------------------------------------------------- events
    def _on_started(self, engine: Engine) -> None:
        for _ in range(self.warmup_epochs):
            for batch in self.data_loader:
                x, y, _ = self._unpack(batch)
                self.surrogate.train()
                self.surrogate_optimizer.zero_grad()
                F.cross_entropy(self.surrogate_step_net(x), y).backward()
                self.surrogate_optimizer.step()

    def _maybe_refresh_masks(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # 1-based, already incremented
        if self.masks is None and self.class_scores is None:
            self.refresh_masks()
        elif self.mask_refresh > 0 and (epoch - 1) % self.mask_refresh == 0:
            self.refresh_masks(subset=True)

    def _maybe_stop(self, engine: Engine) -> None:
        acc = engine.state.metrics.get("protected_accuracy")
        if self.stop_accuracy is not None and acc is not None and engine.state.epoch >= self.min_epochs:
            if acc >= self.stop_accuracy:
                if is_main():
                    self.logger.info(f"protected accuracy {acc:.4f} >= {self.stop_accuracy}: stopping.")
                engine.terminate()

    # ------------------------------------------------------------------ masks
    def _unpack(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = batch[Keys.IMAGE].to(self.state.device, non_blocking=self.non_blocking).float()
        y = batch[Keys.LABEL].to(self.state.device, non_blocking=self.non_blocking).long().reshape(-1)
        return x, y, batch[INDEX_KEY].long().reshape(-1)

    def _shard(self, dataset: Dataset) -> DataLoader:
        """A loader, in order, over this process's shard of ``dataset`` (all of it when not distributed)."""
        if world_size() <= 1 and dataset is self.mask_loader.dataset:
            return self.mask_loader
        sampler = DistributedSampler(dataset, even_divisible=False, shuffle=False) if world_size() > 1 else None
        return DataLoader(dataset, batch_size=self.mask_loader.batch_size, shuffle=False, sampler=sampler,
                          pin_memory=self.mask_loader.pin_memory)

    def _choose_subset(self, indices: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        """Pick the ``refresh_samples`` subset from the labels of a full refresh (gathered over processes): a seeded
        random choice, plus the first image of any class it missed, so every class keeps a score map."""
        parts = gather((torch.cat(indices), torch.cat(labels)) if indices else None)
        index = torch.cat([p[0] for p in parts if p is not None])
        label = torch.cat([p[1] for p in parts if p is not None])
        order = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.seed))
        chosen = order[: self.refresh_samples]
        if len(chosen) >= len(index):
            self.subset_loader = self.shard_loader
            return
        missed = [order[label[order] == c][:1] for c in label.unique() if not (label[chosen] == c).any()]
        chosen = torch.cat([chosen, *missed])
        self.subset_loader = self._shard(Subset(self.mask_loader.dataset, sorted(index[chosen].tolist())))

    def _clean_saliency(self, loader: DataLoader):
        """``(scores, labels, indices)`` of every batch of ``loader`` (this process's shard of clean images), scored
        with each batch's own batch-norm statistics; the same pass re-estimates the surrogate's running statistics on
        them (averaged over processes once the pass is done). A lone last image is scored with the statistics
        gathered up to it."""
        with batchnorm_statistics(self.surrogate):
            for batch in loader:
                x, y, idx = self._unpack(batch)
                lone = x.shape[0] < 2  # batch norm has no statistics of one image
                yield saliency_scores(self.surrogate, x, y, eval_mode=True if lone else None), y, idx
        average_buffers(self.surrogate)

    def refresh_masks(self, subset: bool = False) -> None:
        """Recompute every sample's mask (or the class masks) from the current surrogate.

        Under ``torch.distributed`` this is collective: every process scores its shard, and the class score maps
        (or the per-sample masks) of all processes are combined.

        Args:
            subset: in ``"class"`` mode with ``refresh_samples``, score only the subset chosen at the first refresh
                (what the refreshes during training do); otherwise, or before any refresh, every image.
        """
        n = len(self.mask_loader.dataset)
        if self.mask_mode == "random":
            if self.masks is not None:
                return
            gen = torch.Generator().manual_seed(self.seed)
            masks = []
            for batch in self.mask_loader:  # all of it on every process: cheap, and the same draws as one process
                x, _, _ = self._unpack(batch)
                masks.append(topk_mask(torch.rand(x.shape[0], *x.shape[2:], generator=gen), self.k).bool())
            self.masks = torch.cat(masks).to(self.state.device)
            return
        # the subset is only ever chosen in class mode
        loader = self.subset_loader if subset and self.subset_loader is not None else self.shard_loader
        choose = self.mask_mode == "class" and self.refresh_samples > 0 and self.subset_loader is None
        indices, labels, sample_masks, sums, counts = [], [], [], None, None
        for scores, y, idx in self._clean_saliency(loader):
            if choose:
                indices.append(idx.cpu())
                labels.append(y.cpu())
            if self.mask_mode == "sample":
                indices.append(idx.cpu())
                sample_masks.append(topk_mask(scores, self.k).bool().cpu())
                continue
            norm = scores / scores.flatten(1).sum(1).clamp_min(1e-12).reshape(-1, *[1] * (scores.ndim - 1))
            sums, counts = _grow(sums, counts, int(y.max()) + 1, scores.shape[1:], scores.device)
            sums.index_add_(0, y, norm)
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
        if choose:
            self._choose_subset(indices, labels)
        if self.mask_mode == "sample":
            masks = [None] * n
            for part in gather((torch.cat(indices), torch.cat(sample_masks)) if indices else None):
                for i, mask in zip(*part) if part is not None else ():
                    masks[int(i)] = mask
            self.masks = torch.stack(masks).to(self.state.device)
            return
        if world_size() > 1:
            num_classes = int(all_reduce(torch.tensor([0 if sums is None else sums.shape[0]]), "MAX")[0])
            spatial = self.mask_loader.dataset[0][Keys.IMAGE].shape[1:]
            sums, counts = _grow(sums, counts, num_classes, spatial, self.state.device)
            sums, counts = all_reduce(sums), all_reduce(counts)
        self.class_scores = (sums / counts.clamp_min(1).reshape(-1, *[1] * (sums.ndim - 1))).detach()
        if self.mask_placement == "least-salient":
            # still non-negative scores whose top k is the least salient cells, so a release's top k agrees
            peak = self.class_scores.flatten(1).amax(1).reshape(-1, *[1] * (sums.ndim - 1))
            self.class_scores = peak - self.class_scores
        if self.mask_spread > 1:
            self.class_scores = regional_rank(self.class_scores, self.mask_spread)
        if self.flip_symmetric or self.rotation_symmetric:
            self.class_scores = flip_average(self.class_scores, rotations=self.rotation_symmetric)
        self.class_scores = block_average(self.class_scores, self.mask_block)
        self.class_masks = topk_mask(self.class_scores, self.k).bool()

    def mask_for(self, index: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Masks ``(B, 1, *spatial)`` of a batch given sample indices and labels."""
        if self.mask_mode == "class":
            return self.class_masks[label].float()
        return self.masks[index.to(self.masks.device)].float()

    # -------------------------------------------------------------- iteration
    def _autocast(self) -> torch.autocast:
        """Mixed precision for the networks when ``amp`` is on (float16 on CUDA, bfloat16 on CPU)."""
        return mixed_precision(self.state.device, self.amp)

    def _view(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This iteration's view of the protected batch: ``surrogate_view`` with probability ``view_prob``."""
        if self.surrogate_view is None or float(torch.rand((), generator=self._view_coin)) >= self.view_prob:
            return lambda t: t
        return self.surrogate_view

    def _adversarial_shift(self, protected: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
        """The detached PGD change (radius ``adversarial_radius``) that raises the surrogate's loss on the protected
        batch, or 0 when adversarial training is off."""
        if self.adversarial_radius <= 0:
            return 0.0
        step = ADVERSARIAL_STEP_FACTOR * self.adversarial_radius / self.adversarial_steps
        with self._autocast():
            attacked = pgd_attack(self.surrogate, protected, y, self.adversarial_radius, self.adversarial_steps, step)
        return attacked - protected.detach()  # pgd_attack returns a detached batch

    def _reader_term(self, x: torch.Tensor, protected: torch.Tensor) -> torch.Tensor | float:
        """``reader_weight * KL(target || reader(protected))`` (batch mean), differentiable in ``protected``, with the
        target ``reader(x)`` or uniform (``reader_target``); 0 when the reader term is off."""
        if self.reader is None:
            return 0.0
        with self._autocast():
            read = F.log_softmax(self.reader(protected).float(), dim=1)
            if self.reader_target == "uniform":
                target = torch.full_like(read, -math.log(read.shape[1]))
            else:
                with torch.no_grad():
                    target = F.log_softmax(self.reader(x).float(), dim=1)
        return self.reader_weight * F.kl_div(read, target, reduction="batchmean", log_target=True)

    def _surrogate_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, view: Callable) -> tuple:
        """min over f of CE(f(x' + r), y), noise fixed, with ``r`` the adversarial shift (0 when off). Returns the
        protected batch, the logits, the loss, the generator's output with its graph, which the first generator step
        reuses (the generator's weights do not change in between, so its output is the same), and the shift."""
        self.generator.train()
        with torch.set_grad_enabled(self.train_generator), self._autocast():
            raw = call_generator(self.generator_step_net if self.train_generator else self.generator, x, y)
        with torch.no_grad():
            protected = perturb(x, mask, raw.detach(), self.epsilon, self.value_range)
        shift = self._adversarial_shift(protected, y)
        self.surrogate.train()
        self.surrogate_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.surrogate_step_net(view(protected + shift))
            loss = F.cross_entropy(logits.float(), y)
        self.surrogate_scaler.scale(loss).backward()
        self.surrogate_scaler.step(self.surrogate_optimizer)
        self.surrogate_scaler.update()
        return protected, logits, loss.detach(), raw, shift

    def _joint_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, view: Callable) -> tuple:
        """min over f and G of CE(f(x'), y) from one backward pass; one gradient scaler serves both optimizers.
        Returns the protected batch (detached), the logits, the loss and the adversarial shift (0 when off)."""
        self.generator.train()
        with self._autocast():
            protected = perturb(x, mask, call_generator(self.generator_step_net, x, y), self.epsilon,
                                self.value_range)
        shift = self._adversarial_shift(protected, y)
        self.surrogate.train()
        self.surrogate_optimizer.zero_grad(set_to_none=True)
        self.generator_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.surrogate_step_net(view(protected + shift))
            loss = F.cross_entropy(logits.float(), y)
        # the reader term reaches the generator only: the reader is frozen and the surrogate is not in it
        self.surrogate_scaler.scale(loss + self._reader_term(x, protected)).backward()
        self.surrogate_scaler.step(self.surrogate_optimizer)
        self.surrogate_scaler.step(self.generator_optimizer)
        self.surrogate_scaler.update()
        return protected.detach(), logits, loss.detach(), shift

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x, y, idx = self._unpack(batchdata)
        mask = self.mask_for(idx, y)
        view = self._view()

        joint = self.joint_step and self.train_generator
        if joint:  # any further generator step makes its own generator output
            protected, logits, loss, shift = self._joint_step(x, y, mask, view)
            raw = None
        else:
            protected, logits, loss, raw, shift = self._surrogate_step(x, y, mask, view)

        # generator steps: min over G of CE(f(x'), y), surrogate fixed
        params = list(self.surrogate.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        generator_loss = loss if joint else torch.zeros(())
        try:
            for step in range(int(joint), self.generator_steps if self.train_generator else 0):
                self.generator_optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    if step > 0:
                        raw = call_generator(self.generator_step_net, x, y)
                    noisy = perturb(x, mask, raw, self.epsilon, self.value_range)
                    generator_loss = F.cross_entropy(self.surrogate(view(noisy + shift)).float(), y)
                self.generator_scaler.scale(generator_loss + self._reader_term(x, noisy)).backward()
                self.generator_scaler.step(self.generator_optimizer)
                self.generator_scaler.update()
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

        engine.state.output = {
            Keys.IMAGE: protected,
            Keys.LABEL: y,
            Keys.PRED: logits.detach(),
            Keys.LOSS: loss.item(),
            "generator_loss": generator_loss.item(),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollation and postprocessing hook here
        return engine.state.output
