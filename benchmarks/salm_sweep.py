"""Small SALM sweep: train SALM on a subset, protect a victim subset, train a fresh victim, print a table.

Each configuration trains SALM on the first ``--salm-n`` training images, protects the first
``--victim-n`` training images with the trained checkpoint (images beyond ``--salm-n`` are new to the
generator, as in release), trains a fresh MONAI ResNet-18 on them with the fixed victim recipe and
tests it on the clean test split. Results are appended as JSON lines to ``--out``.

Example (the sweep in docs/results.md):
    python benchmarks/salm_sweep.py --data ../shared/data/bloodmnist_28.npz --out sweep_blood.jsonl \
        --configs baseline_clean sample_k10 class_k10 class_k10_sym random_k10 class_k05_e28_sym
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from monai_salm.api import protect_tensor, protection_stats, train_salm
from monai_salm.data import changed_pixel_fraction, from_tensor, load_npz, split_arrays, to_tensor
from monai_salm.evaluation import train_victim

CONFIGS = {
    "baseline_clean": None,
    "sample_k10": dict(mask_mode="sample", k=0.1, epsilon=20 / 255, class_pattern=False),
    "sample_k10_nolabel": dict(mask_mode="sample", k=0.1, epsilon=20 / 255, label_conditioned=False),
    "random_k10": dict(mask_mode="random", k=0.1, epsilon=20 / 255, class_pattern=False),
    "class_k10": dict(mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=False, class_pattern=False),
    "class_k10_sym": dict(mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=True, class_pattern=False),
    "class_k05_e28_sym": dict(mask_mode="class", k=0.05, epsilon=28 / 255, flip_symmetric=True, class_pattern=False),
    "class_k10_sym_nowarm": dict(mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=True, warmup_epochs=0),
    "class_k10_sym_norefresh": dict(mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=True, mask_refresh=0),
    "class_k10_sym_nolabel": dict(mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=True, label_conditioned=False),
    "class_k10_sym_code0": dict(
        mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=True, generator_kwargs={"code_scale": 0.0}
    ),
    "class_k10_sym_pattern": dict(mask_mode="class", k=0.1, epsilon=20 / 255, flip_symmetric=True, class_pattern=True),
    "class_k05_e28_sym_pattern": dict(mask_mode="class", k=0.05, epsilon=28 / 255, flip_symmetric=True, class_pattern=True),
    "sample_k10_pattern": dict(mask_mode="sample", k=0.1, epsilon=20 / 255, class_pattern=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--salm-n", type=int, default=2000)
    parser.add_argument("--salm-epochs", type=int, default=6)
    parser.add_argument("--victim-n", type=int, default=4000)
    parser.add_argument("--victim-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    arrays = load_npz(args.data)
    xtr, ytr = split_arrays(arrays, "train")
    xte, yte = split_arrays(arrays, "test")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    xv, yv = xtr[: args.victim_n], ytr[: args.victim_n]
    test_x, test_y = to_tensor(xte), torch.from_numpy(yte)
    for name in args.configs:
        cfg = CONFIGS[name]
        row = {"config": name, "data": args.data, "salm_n": args.salm_n, "victim_n": len(xv)}
        if cfg is None:
            victim_x = xv
        else:
            start = time.perf_counter()
            trainer, settings = train_salm(
                to_tensor(xtr[: args.salm_n]), torch.from_numpy(ytr[: args.salm_n]), num_classes,
                epochs=args.salm_epochs, seed=args.seed, **cfg,
            )
            row["salm_train_s"] = round(time.perf_counter() - start, 1)
            row["surrogate_protected_acc"] = trainer.state.metrics.get("protected_accuracy")
            start = time.perf_counter()
            protected, _ = protect_tensor(
                to_tensor(xv), torch.from_numpy(yv), settings, trainer.generator, trainer.surrogate, trainer.class_scores
            )
            row["protect_s"] = round(time.perf_counter() - start, 1)
            victim_x = from_tensor(protected, xv)
            row.update(protection_stats(xv, victim_x))
            row["changed_pixel_fraction"] = changed_pixel_fraction(xv, victim_x)
            row["settings"] = {k: (v if not isinstance(v, float) else round(v, 5)) for k, v in cfg.items()}
        rep = train_victim(
            to_tensor(victim_x), torch.from_numpy(yv), test_x, test_y, num_classes, epochs=args.victim_epochs, seed=args.seed
        )
        row.update({k: rep[k] for k in ("accuracy", "balanced_accuracy", "auc", "best_accuracy", "best_auc")})
        row["victim_s"] = round(rep["train_seconds"], 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{name:28s} acc {row['accuracy']:.3f} best {row['best_accuracy']:.3f} auc {row['auc']:.3f} "
            f"psnr {row.get('psnr_db', float('nan')):.2f} changed {row.get('changed_pixel_fraction', 0):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
