"""SALM training and release on 1 process against N processes under torchrun, side by side, medians.

Each configuration runs ``monai-salm train`` (and ``monai-salm protect`` on the same ``.npz``) through torchrun with
the given processes x threads per process; the repeats interleave the configurations, so load on a shared machine
hits them alike. Throughput is images per second of the trainer's own time (``train_seconds``, without process
start and data loading) and of the release (``protect_seconds``); the ratio is to the first configuration.

    python benchmarks/distributed_scaling.py                                  # 1x2 threads, 1x1 and 2x1, CPU (gloo)
    python benchmarks/distributed_scaling.py --data ../shared/data/breastmnist_28.npz --epochs 2
    python benchmarks/distributed_scaling.py --configs 1x8 2x8 --device cuda  # GPUs: processes x threads (nccl)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def synthetic_npz(path: Path, n: int, size: int = 28, num_classes: int = 4, seed: int = 0) -> Path:
    """A MedMNIST-format ``.npz`` whose classes differ in where a bright bar sits."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", n // 8), ("test", n // 8)):
        labels = rng.integers(0, num_classes, count)
        images = rng.integers(0, 90, (count, size, size))
        for i, label in enumerate(labels):
            top = 2 + label * (size - 6) // num_classes
            images[i, top : top + 4, 4 : size - 4] += 120
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def run(processes: int, threads: int, args: list[str]) -> dict:
    """``monai-salm ARGS`` under torchrun; the JSON summary it prints last."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
           "monai_salm.cli", *args, "--threads", str(threads), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="MedMNIST-format .npz (default: a synthetic 28 px set)")
    parser.add_argument("--images", type=int, default=1024, help="synthetic set: training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--configs", nargs="+", default=["1x2", "1x1", "2x1"],
                        help="PROCESSESxTHREADS per configuration; ratios are to the first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else synthetic_npz(tmp / "data.npz", args.images)
        n = int(np.load(data)["train_labels"].size)
        times: dict[tuple, dict[str, list[float]]] = {c: {"train": [], "protect": []} for c in configs}
        for r in range(args.repeats):
            for p, t in configs:
                ckpt = tmp / f"salm_{p}x{t}.pt"
                train = run(p, t, ["train", "--data", str(data), "--out", str(ckpt), "--epochs", str(args.epochs),
                                   "--warmup-epochs", "1", "--batch-size", str(args.batch_size),
                                   "--stop-accuracy", "none", "--device", args.device])  # images/s needs every epoch
                release = run(p, t, ["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out",
                                     str(tmp / f"release_{p}x{t}.npz"), "--overwrite", "--device", args.device])
                times[(p, t)]["train"].append(train["train_seconds"])
                times[(p, t)]["protect"].append(release["protect_seconds"])
                print(f"repeat {r + 1}: {p}x{t} train {train['train_seconds']:.1f} s, protect "
                      f"{release['protect_seconds']:.2f} s", file=sys.stderr)
    rows = []
    base = {k: statistics.median(v) for k, v in times[configs[0]].items()}
    for (p, t), values in times.items():
        med = {k: statistics.median(v) for k, v in values.items()}
        rows.append({"processes": p, "threads_each": t, "train_s": med["train"],
                     "train_img_per_s": n * args.epochs / med["train"], "train_speedup": base["train"] / med["train"],
                     "protect_s": med["protect"], "protect_speedup": base["protect"] / med["protect"]})
    print(f"\n{n} training images, {args.epochs} epochs, global batch {args.batch_size}, device {args.device}, "
          f"median of {args.repeats}; speed-up relative to {configs[0][0]}x{configs[0][1]}\n")
    print("| processes x threads | train s | train images/s | train speed-up | protect s (all splits) | protect speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} x {row['threads_each']} | {row['train_s']:.1f} | {row['train_img_per_s']:.0f} | "
              f"{row['train_speedup']:.2f} | {row['protect_s']:.2f} | {row['protect_speedup']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "epochs": args.epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
