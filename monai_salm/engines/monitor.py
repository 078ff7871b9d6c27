"""Stronger stop rule: how much does a fresh model learn from the protected images?"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from monai_salm.transforms.functional import call_generator, perturb

__all__ = ["FreshModelMonitor"]


class FreshModelMonitor:
    """Every ``interval`` epochs, train a freshly initialised classifier for ``steps`` steps on the
    current protected images and measure its accuracy on held-out clean images.

    The value is stored as ``engine.state.metrics["fresh_clean_accuracy"]`` (so StatsHandler and
    TensorBoardStatsHandler log it) and the run stops once it is at or below ``target``. This is the
    rule DESIGN.md section 7 recommends: a surrogate that fits protected images proves little on small
    sets, while a fresh model failing on clean data is what protection means.

    Args:
        model_factory: returns a new, randomly initialised classifier.
        train_images: ``(N, C, *spatial)`` images to protect with the current generator (a subset of the
            training set, with indices ``train_indices`` into it).
        train_labels: their labels.
        train_indices: their positions in the trainer's dataset (used to look up per-sample masks).
        clean_images: held-out clean images.
        clean_labels: their labels.
        steps: optimisation steps of the fresh model.
        batch_size: its batch size.
        lr: its Adam learning rate.
        interval: run every this many epochs.
        target: stop when the fresh model's clean accuracy is at or below this (None: only record).
    """

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        train_indices: torch.Tensor,
        clean_images: torch.Tensor,
        clean_labels: torch.Tensor,
        steps: int = 40,
        batch_size: int = 64,
        lr: float = 1e-3,
        interval: int = 1,
        target: float | None = None,
        seed: int = 0,
    ) -> None:
        self.model_factory = model_factory
        self.train_images, self.train_labels, self.train_indices = train_images, train_labels.long(), train_indices.long()
        self.clean_images, self.clean_labels = clean_images, clean_labels.long()
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.interval, self.target, self.seed = interval, target, seed
        self.history: list[tuple[int, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    @torch.no_grad()
    def _protected(self, trainer) -> torch.Tensor:
        device = trainer.state.device
        outs = []
        for start in range(0, len(self.train_images), 256):
            sl = slice(start, start + 256)
            x, y = self.train_images[sl].to(device), self.train_labels[sl].to(device)
            mask = trainer.mask_for(self.train_indices[sl], y)
            outs.append(perturb(x, mask, call_generator(trainer.generator, x, y), trainer.epsilon, trainer.value_range))
        return torch.cat(outs)

    def __call__(self, engine: Engine) -> None:
        device = engine.state.device
        protected = self._protected(engine)
        rng_state = torch.get_rng_state()
        torch.manual_seed(self.seed)
        model = self.model_factory().to(device).train()
        torch.set_rng_state(rng_state)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            idx = torch.randint(0, len(protected), (self.batch_size,), generator=gen)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(protected[idx]), self.train_labels[idx].to(device)).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(self.clean_images[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(self.clean_images), 512)])
        acc = float((pred == self.clean_labels).float().mean())
        del model, opt
        engine.state.metrics["fresh_clean_accuracy"] = acc
        self.history.append((engine.state.epoch, acc))
        engine.logger.info(f"epoch {engine.state.epoch}: fresh model clean accuracy {acc:.4f}")
        if self.target is not None and acc <= self.target:
            engine.logger.info(f"fresh model clean accuracy {acc:.4f} <= {self.target}: stopping.")
            engine.terminate()
