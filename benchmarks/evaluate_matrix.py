"""Evaluation matrix behind docs/results.md: protections, victims, countermeasures, paper experiments.

Every step is one ``monai-salm`` command (printed before it runs), single-threaded so two runners share 2 cores.
Outputs go under RUN_DIR/<dataset>/; every victim result is appended to RUN_DIR/results.jsonl, and a step whose
report already exists is skipped, so the runs resume and several runners can split the stages. Then
``python benchmarks/evaluate_report.py RUN_DIR`` writes the tables and plots.

    python benchmarks/eval_data.py RUN_DIR                        # evaluation copies of ../shared/data
    python benchmarks/evaluate_matrix.py RUN_DIR protections      # SALM, random-mask SALM, random noise, EM, OPS
    python benchmarks/evaluate_matrix.py RUN_DIR main             # method x ResNet-18 victim, every dataset
    python benchmarks/evaluate_matrix.py RUN_DIR countermeasures  # SALM / EM / random noise x countermeasure
    python benchmarks/evaluate_matrix.py RUN_DIR architectures    # cross-architecture transfer
    python benchmarks/evaluate_matrix.py RUN_DIR ksweep           # victim accuracy against k (Figure 4)
    python benchmarks/evaluate_matrix.py RUN_DIR classes          # protect selected classes only (Figure 3)
    python benchmarks/evaluate_matrix.py RUN_DIR fraction         # protected + clean combined (Figure 5)
    python benchmarks/evaluate_matrix.py RUN_DIR robust --robust-to median  # SALM trained through a countermeasure
    python benchmarks/evaluate_matrix.py RUN_DIR equal_psnr       # EM at eps * sqrt(k): about SALM's PSNR
    python benchmarks/evaluate_matrix.py RUN_DIR dense --countermeasures median blur  # k=0.2 against them
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np

from monai_salm.api import DEFAULTS

#: the evaluation data sets (benchmarks/eval_data.py)
DATASETS = ("breast", "retina", "pneumonia", "blood", "adrenal")
#: victim epochs when --epochs is not given: None is the competent recipe's own budget (100 epochs, at most 4000
#: steps); every victim of a run, clean or protected, trains for the same budget
EPOCHS: dict[str, int | None] = {ds: None for ds in DATASETS}
#: SALM training epochs per dataset (the default is 10)
SALM_EPOCHS = {"adrenal": 8}
#: EM rounds per dataset (the default is at most 10; one 3D round takes ~10 min on one core)
EM_ROUNDS = {"adrenal": 2}
METHODS = ("clean", "salm", "random_noise", "random_mask", "em", "ops")
COUNTERMEASURE_RUNS = (
    "flip", "rotate", "crop", "cutout", "mixup", "blur", "median", "bitdepth", "jpeg", "gamma", "intensity",
    "resample", "adversarial", "rotate,crop,mixup",
)
VICTIMS = ("resnet18", "densenet121", "efficientnet-b0", "vit")
K_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2)


def run(cmd: list[str], log: Path) -> float:
    """Run one command (logged to ``log``), return its wall time; raise if it fails."""
    print("$ " + shlex.join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def protection(root: Path, ds: str, method: str, extra: tuple[str, ...] = (), tag: str = "") -> Path:
    """Make (or reuse) the protected copy of ``ds`` by ``method``; records its wall time in ``<name>.time.json``."""
    d = root / ds
    data = d / "data.npz"
    if method == "clean":
        return data
    name = tag or method
    out = d / f"{name}.npz"
    if out.exists():
        return out
    common = ["--threads", "1", "--quiet"]
    seconds = 0.0
    if method in ("salm", "random_mask"):
        ckpt = d / f"{name}.pt"
        args = ["--epochs", str(SALM_EPOCHS.get(ds, 10)), *(["--mask-mode", "random"] if method == "random_mask" else [])]
        seconds += run(["monai-salm", "train", "--data", str(data), "--out", str(ckpt), *args, *extra, *common],
                       d / "logs" / f"{name}_train.log")
        seconds += run(["monai-salm", "protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
                        "--overwrite", *common], d / "logs" / f"{name}_protect.log")
    else:
        base = ["monai-salm", "baseline", "--method", method.replace("_", "-"), "--data", str(data), "--out", str(out)]
        if method == "random_noise":
            base += ["--checkpoint", str(protection(root, ds, "salm").with_suffix(".pt"))]
        if method == "em" and ds in EM_ROUNDS:
            base += ["--rounds", str(EM_ROUNDS[ds])]
        seconds += run([*base, *extra, *common], d / "logs" / f"{name}.log")
    (d / f"{name}.time.json").write_text(json.dumps({"method": method, "protect_seconds": seconds}))
    return out


def victim(root: Path, ds: str, train: Path, name: str, net: str = "resnet18", cms: str = "", epochs: int = 0,
           seed: int = 0, readers: tuple[Path, ...] = ()) -> None:
    """Train and test one competent victim unless its report exists; append the result to ``results.jsonl``."""
    cms_name = cms.replace(",", "+").replace("/", "_") or "none"  # adversarial:2/255 names one folder
    out = root / ds / "victims" / f"{name}__{net}__{cms_name}{f'__seed{seed}' if seed else ''}"
    cmd = ["monai-salm", "evaluate", "--train", str(train), "--test", str(root / ds / "data.npz"), "--victim", net,
           "--out", str(out), "--seed", str(seed), "--threads", "1", "--quiet"]
    budget = epochs or EPOCHS[ds]
    cmd += ["--epochs", str(budget)] if budget else []
    cmd += ["--reader-data", *map(str, readers)] if readers else []
    if not (out / "report.json").exists():
        run([*cmd, *(["--countermeasure", cms] if cms else [])], out.with_suffix(".log"))
    report = json.loads((out / "report.json").read_text())
    row = {"dataset": ds, "method": name, "victim": net, "countermeasures": cms or "none", "seed": seed,
           **{k: report.get(k) for k in ("selected_accuracy", "selected_balanced_accuracy", "selected_auc",
                                         "selected_epoch", "selected_by", "selected", "accuracy",
                                         "balanced_accuracy", "auc", "best_accuracy", "best_auc",
                                         "per_class_accuracy", "train_seconds", "recipe", "reader")},
           "history": report["history"], "report": str(out / "report.json")}
    with open(root / "results.jsonl", "a") as f:  # the report reads the last row of each cell
        f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("stage", choices=("protections", "main", "countermeasures", "architectures", "ksweep",
                                          "classes", "fraction", "robust", "equal_psnr", "dense"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=VICTIMS)
    parser.add_argument("--countermeasures", nargs="+", default=list(COUNTERMEASURE_RUNS))
    parser.add_argument("--protected", nargs="+", default=["salm", "em", "random_noise"],
                        help="countermeasures stage: the protected copies to attack")
    parser.add_argument("--robust-to", default="median", help="robust stage: the countermeasure SALM trains through")
    parser.add_argument("--epochs", type=int, default=0,
                        help="victim epochs for every run (default: the competent recipe's budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="main stage: victim seeds")
    args = parser.parse_args()
    for ds in DATASETS:
        EPOCHS[ds] = args.epochs or EPOCHS[ds]
    root = args.root
    for ds in args.datasets:
        if args.stage == "protections":
            for method in args.methods:
                protection(root, ds, method)
        elif args.stage == "main":
            for seed in args.seeds:
                for method in args.methods:
                    # the authorized user also reads the protected release: what protection costs legitimate readers
                    readers = (protection(root, ds, "salm"),) if method == "clean" and seed == 0 else ()
                    victim(root, ds, protection(root, ds, method), method, seed=seed, readers=readers)
        elif args.stage == "countermeasures":
            for cms in args.countermeasures:
                for name in args.protected:  # a method, or a copy an earlier stage made (e.g. salm_k0.2)
                    train = protection(root, ds, name) if name in METHODS else root / ds / f"{name}.npz"
                    victim(root, ds, train, name, cms=cms)
        elif args.stage == "architectures":
            for net in args.victims:
                for method in args.methods:
                    victim(root, ds, protection(root, ds, method), method, net=net)
        elif args.stage == "ksweep":
            for k in K_SWEEP:
                tag = f"salm_k{k:g}"
                victim(root, ds, protection(root, ds, "salm", ("--k", str(k)), tag=tag), tag)
        elif args.stage == "classes":
            ckpt = protection(root, ds, "salm").with_suffix(".pt")
            out = root / ds / "salm_half_classes.npz"
            if not out.exists():
                with np.load(root / ds / "data.npz") as f:
                    n = int(f["train_labels"].max()) + 1
                run(["monai-salm", "protect", "--checkpoint", str(ckpt), "--data", str(root / ds / "data.npz"),
                     "--out", str(out), "--classes", *map(str, range(n // 2)), "--threads", "1", "--quiet"],
                    root / ds / "logs" / "salm_half_classes.log")
            victim(root, ds, out, "salm_half_classes")
        elif args.stage == "robust":
            protected = protection(root, ds, "salm", ("--robust-to", args.robust_to), tag="salm_robust")
            for cms in ("", args.robust_to, *args.countermeasures):
                victim(root, ds, protected, "salm_robust", cms=cms)
        elif args.stage == "equal_psnr":
            # SALM changes a fraction k of the pixels by up to eps, full-image EM every pixel: EM's squared error
            # matches SALM's at eps * sqrt(k) (defaults: 20/255 * sqrt(0.1) = 6.3/255)
            eps = f"{DEFAULTS['epsilon'] * 255 * DEFAULTS['k'] ** 0.5:.2f}/255"
            victim(root, ds, protection(root, ds, "em", ("--eps", eps), tag="em_equal_psnr"), "em_equal_psnr")
        elif args.stage == "dense":
            # denser masks against the filters that undo the default: k=0.2 at the default eps, and at the eps
            # whose PSNR is about the default's (28/255 * sqrt(0.05 / 0.2) = 14/255)
            for eps, tag in (("28/255", "salm_k0.2"), ("14/255", "salm_k0.2_eps14")):
                protected = protection(root, ds, "salm", ("--k", "0.2", "--eps", eps), tag=tag)
                for cms in ("", *args.countermeasures):
                    victim(root, ds, protected, tag, cms=cms)
        elif args.stage == "fraction":
            ckpt = protection(root, ds, "salm").with_suffix(".pt")
            for fraction in (0.2, 0.5, 0.8):
                out = root / ds / f"salm_fraction{fraction:g}.npz"
                if not out.exists():
                    run(["monai-salm", "protect", "--checkpoint", str(ckpt), "--data", str(root / ds / "data.npz"),
                         "--out", str(out), "--fraction", str(fraction), "--threads", "1", "--quiet"],
                        root / ds / "logs" / f"salm_fraction{fraction:g}.log")
                victim(root, ds, out, f"salm_fraction{fraction:g}")


if __name__ == "__main__":
    main()
