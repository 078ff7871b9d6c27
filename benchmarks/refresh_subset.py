"""Could the per-epoch class-mask refresh score a subset of the images? A measurement, not a method.

The refresh at the start of every epoch scores every training image (one surrogate forward and backward to the
input each), about a fifth of a default epoch. A class mask is the top k of a class-average score map, so a seeded
random subset of ``S`` images would estimate it at ``S / N`` of the cost. This trains the default SALM on
``DATA`` and, at the end of every epoch, refreshes the class masks from every image and from subsets of each
size, and prints, per epoch and class, the share of the full refresh's mask that each subset's mask keeps, the
share that the full mask keeps from one epoch to the next (how much the masks move anyway), and the seconds of each
refresh. The training itself is the default's: the extra refreshes change only the batch-norm running statistics,
which the next refresh estimates again.

    OMP_NUM_THREADS=1 python benchmarks/refresh_subset.py RUN/pneumonia/data.npz --subsets 64 128 256 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from ignite.engine import Events
from torch.utils.data import DataLoader, Subset

from monai_salm.api import DEFAULTS, train_salm
from monai_salm.workflows import load_training_arrays


class RefreshOverlap:
    """At each epoch's end, the class masks from every image and from seeded subsets of the given sizes."""

    def __init__(self, subsets: list[int], seed: int = 0) -> None:
        self.subsets, self.seed, self.rows, self.previous = subsets, seed, [], None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _refresh(self, trainer, loader: DataLoader) -> tuple[torch.Tensor, float]:
        trainer.shard_loader = loader
        start = time.perf_counter()
        trainer.refresh_masks()
        return trainer.class_masks.clone(), time.perf_counter() - start

    def __call__(self, trainer) -> None:
        every = trainer.shard_loader
        full, seconds = self._refresh(trainer, every)
        row = {"epoch": trainer.state.epoch, "all_s": round(seconds, 2)}
        if self.previous is not None:
            row["kept_from_last_epoch"] = _kept(self.previous, full)
        for size in self.subsets:
            order = torch.randperm(len(every.dataset), generator=torch.Generator().manual_seed(self.seed))
            subset = Subset(every.dataset, sorted(order[:size].tolist()))
            masks, seconds = self._refresh(trainer, DataLoader(subset, batch_size=every.batch_size))
            row[f"subset{size}_kept"], row[f"subset{size}_s"] = _kept(full, masks), round(seconds, 2)
        self._refresh(trainer, every)  # leave the full refresh's masks and statistics, as the default has them
        self.previous = full
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def _kept(reference: torch.Tensor, masks: torch.Tensor) -> list[float]:
    """Per class, the share of ``reference``'s mask positions that ``masks`` also holds."""
    return [round(float((masks[c] & reference[c]).sum() / reference[c].sum()), 3) for c in range(len(reference))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="training .npz (or any source `monai-salm train --data` reads)")
    parser.add_argument("--subsets", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_training_arrays(args.data)
    overlap = RefreshOverlap(args.subsets, args.seed)
    train_salm(data.images, data.labels, data.num_classes, epsilon=DEFAULTS["epsilon"], seed=args.seed,
               handlers=[overlap])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(overlap.rows, f, indent=1)


if __name__ == "__main__":
    main()
