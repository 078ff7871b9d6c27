"""Tables and plots of the issue-4 evaluation (run benchmarks/evaluate_matrix.py first).

    python benchmarks/evaluate_report.py RUN_DIR [--docs docs]

Reads RUN_DIR/results.jsonl and the protected copies, writes PNGs into DOCS/figures/ and replaces the part of
DOCS/results.md between the ``<!-- evaluation:begin -->`` / ``<!-- evaluation:end -->`` markers.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch

from monai_salm.api import protect_tensor, protection_stats
from monai_salm.data import changed_pixel_fraction, load_npz, split_arrays, to_tensor
from monai_salm.engines import load_protection
from monai_salm.evaluation import markdown_table, plot_image_grid, plot_learning_curves, plot_sweep

NAMES = {
    "clean": "clean (authorized user)",
    "salm": "SALM (default)",
    "random_noise": "uniform noise in SALM's mask",
    "random_mask": "random-mask SALM",
    "em": "full-image EM",
    "em_equal_psnr": "full-image EM at SALM's PSNR (eps 6.3/255)",
    "ops": "one-pixel shortcut (OPS)",
    "salm_k0.2": "SALM k=0.2",
    "salm_k0.2_eps14": "SALM k=0.2, eps=14/255",
    "salm_robust": "SALM trained through median",
}
TITLES = {"breast": "BreastMNIST", "retina": "RetinaMNIST", "pneumonia": "PneumoniaMNIST (trimmed train)",
          "blood": "BloodMNIST", "adrenal": "AdrenalMNIST3D"}
BEGIN, END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def load_results(root: Path) -> list[dict]:
    rows = {}
    for line in (root / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[(r["dataset"], r["method"], r["victim"], r["countermeasures"])] = r  # last one wins
    return list(rows.values())


@functools.cache
def train_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The train images and labels of an ``.npz``, read once per file."""
    return split_arrays(load_npz(path), "train")


def protection_row(root: Path, ds: str, name: str) -> dict:
    """PSNR, changed fraction and wall time of one protected copy against the clean data."""
    if name == "clean":
        return {}
    clean, _ = train_split(root / ds / "data.npz")
    prot, _ = train_split(root / ds / f"{name}.npz")
    stats = protection_stats(clean, prot, 255.0)
    timing = root / ds / f"{name}.time.json"
    seconds = json.loads(timing.read_text())["protect_seconds"] if timing.exists() else None
    return {"psnr": stats["psnr_db"], "changed": 100 * changed_pixel_fraction(clean, prot), "seconds": seconds}


def fmt(r: dict | None, binary: bool) -> str:
    """'final (best)' of AUC on binary sets, accuracy on multi-class sets."""
    if r is None:
        return "–"
    key = "auc" if binary else "accuracy"
    return f"{r[key]:.3f} ({r['best_' + key]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args()
    root, figures = args.root, args.docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results = load_results(root)
    index = {(r["dataset"], r["method"], r["victim"], r["countermeasures"]): r for r in results}
    datasets = [ds for ds in TITLES if any(r["dataset"] == ds for r in results)]
    info = {}
    for ds in datasets:
        with np.load(root / ds / "data.npz") as f:
            n = int(f["train_labels"].max()) + 1
            info[ds] = {"classes": n, "binary": n == 2, "chance": 1 / n, "train_n": len(f["train_labels"])}
    out = []

    # ---- method x dataset, ResNet-18
    out.append("### Methods, ResNet-18 victim\n")
    out.append("Binary sets (breast, pneumonia, adrenal): macro AUC, final epoch (best epoch). Multi-class sets "
               "(retina 5 classes, blood 8): accuracy, final (best). Targets: AUC <= 0.60 on binary sets, accuracy "
               "<= 2x chance on multi-class sets.\n")
    rows = []
    for ds in datasets:
        for method in NAMES:
            r = index.get((ds, method, "resnet18", "none"))
            if r is None:
                continue
            p = protection_row(root, ds, method)
            rows.append({"dataset": TITLES[ds], "method": NAMES[method], "victim result": fmt(r, info[ds]["binary"]),
                         "accuracy": r["accuracy"], "balanced acc.": r["balanced_accuracy"], "AUC": r["auc"],
                         "PSNR dB": p.get("psnr"), "changed %": p.get("changed"),
                         "protect s": None if p.get("seconds") is None else round(p["seconds"])})
    out.append(markdown_table(rows, ["dataset", "method", "victim result", "accuracy", "balanced acc.", "AUC",
                                     "PSNR dB", "changed %", "protect s"]))

    # ---- cross-architecture
    victims = sorted({r["victim"] for r in results if r["victim"] != "resnet18"})
    if victims:
        out.append("\n### Cross-architecture transfer (surrogate ResNet-18)\n")
        rows = []
        for ds in datasets:
            for method in NAMES:
                cells = {v: index.get((ds, method, v, "none")) for v in ["resnet18", *victims]}
                if sum(c is not None for c in cells.values()) < 2:
                    continue
                rows.append({"dataset": TITLES[ds], "method": NAMES[method],
                             **{v: fmt(c, info[ds]["binary"]) for v, c in cells.items()}})
        out.append(markdown_table(rows, ["dataset", "method", "resnet18", *victims]))

    # ---- countermeasures
    cms = [c for c in dict.fromkeys(r["countermeasures"] for r in results) if c != "none"]
    if cms:
        out.append("\n### Countermeasures (ResNet-18 victim)\n")
        for ds in datasets:
            methods = [m for m in ("salm", "salm_robust", "salm_k0.2", "salm_k0.2_eps14", "em", "random_noise")
                       if any(index.get((ds, m, "resnet18", c)) for c in cms)]
            if not methods:
                continue
            rows = [{"countermeasure": c, **{NAMES.get(m, m): fmt(index.get((ds, m, "resnet18", c)),
                                                                  info[ds]["binary"]) for m in methods},
                     "clean data + same countermeasure": fmt(index.get((ds, "clean", "resnet18", c)), info[ds]["binary"])}
                    for c in ["none", *cms]]
            out.append(f"{TITLES[ds]} ({'AUC' if info[ds]['binary'] else 'accuracy'}, final (best)):\n")
            out.append(markdown_table(rows, ["countermeasure", *[NAMES.get(m, m) for m in methods],
                                             "clean data + same countermeasure"]))

    # ---- k sweep
    sweep = {}
    for ds in datasets:
        pts = [(float(r["method"].split("_k")[1]), r) for r in results
               if r["dataset"] == ds and r["method"].startswith("salm_k") and "_eps" not in r["method"]
               and r["countermeasures"] == "none"]
        if pts:
            sweep[ds] = sorted(pts, key=lambda t: t[0])
    if sweep:
        out.append("\n### Clean-test result against k (Figure 4)\n")
        rows = [{"dataset": TITLES[ds], "k": k, "result": fmt(r, info[ds]["binary"]),
                 "changed %": protection_row(root, ds, r["method"])["changed"]} for ds, pts in sweep.items()
                for k, r in pts]
        out.append(markdown_table(rows, ["dataset", "k", "result", "changed %"]))
        series = {TITLES[ds]: [(k, r["auc" if info[ds]["binary"] else "accuracy"]) for k, r in pts]
                  for ds, pts in sweep.items()}
        plot_sweep(series, figures / "k_sweep.png", "k (fraction of pixels perturbed)", "victim AUC / accuracy")
        out.append("![k sweep](figures/k_sweep.png)\n")

    # ---- selected classes and fraction
    for ds in datasets:
        r = index.get((ds, "salm_half_classes", "resnet18", "none"))
        clean = index.get((ds, "clean", "resnet18", "none"))
        if r and clean:
            n = info[ds]["classes"]
            out.append(f"\n### Protecting only classes 0-{n // 2 - 1} of {TITLES[ds]} (Figure 3)\n")
            rows = [{"class": c, "protected": "yes" if c < n // 2 else "no",
                     "clean-data victim": clean["per_class_accuracy"].get(str(c)),
                     "victim on partly protected data": r["per_class_accuracy"].get(str(c))} for c in range(n)]
            out.append(markdown_table(rows, ["class", "protected", "clean-data victim",
                                             "victim on partly protected data"]))
        fr = [(float(x["method"].removeprefix("salm_fraction")), x) for x in results
              if x["dataset"] == ds and x["method"].startswith("salm_fraction")]
        if fr and clean:
            full = index.get((ds, "salm", "resnet18", "none"))
            fr = sorted(fr + [(0.0, clean)] + ([(1.0, full)] if full else []), key=lambda t: t[0])
            out.append(f"\n### Protected and clean images combined, {TITLES[ds]} (Figure 5)\n")
            out.append(markdown_table([{"protected fraction": f, "result": fmt(x, info[ds]["binary"])} for f, x in fr],
                                      ["protected fraction", "result"]))

    # ---- learning curves and image grids
    for ds in datasets:
        hist = {NAMES[m]: index[(ds, m, "resnet18", "none")]["history"] for m in NAMES
                if (ds, m, "resnet18", "none") in index}
        if hist:
            plot_learning_curves(hist, figures / f"curves_{ds}.png", chance=info[ds]["chance"],
                                 title=f"{TITLES[ds]}: ResNet-18 victim")
        ckpt = root / ds / "salm.pt"
        if ckpt.exists():
            settings, generator, surrogate, scores = load_protection(ckpt)
            clean, labels = train_split(root / ds / "data.npz")
            pick = [int(np.flatnonzero(labels == c)[0]) for c in range(min(info[ds]["classes"], 4))]
            x = to_tensor(clean[pick])
            protected, masks = protect_tensor(x, torch.from_numpy(labels[pick]).long(), settings, generator,
                                              surrogate, scores)
            plot_image_grid(x, protected, masks, figures / f"grid_{ds}.png", title=f"{TITLES[ds]} (one image per class)")
    out.append("\nLearning curves (solid: clean test accuracy; dashed: accuracy on the protected training batches) "
               "and image grids (clean / protected / amplified difference / mask):\n")
    for ds in datasets:
        out.append(f"- {TITLES[ds]}: ![curves](figures/curves_{ds}.png) ![grid](figures/grid_{ds}.png)")
    text = "\n".join(out) + "\n"
    results_md = args.docs / "results.md"
    doc = results_md.read_text()
    if BEGIN in doc:
        doc = doc[: doc.index(BEGIN) + len(BEGIN)] + "\n" + text + doc[doc.index(END):]
    else:
        doc += f"\n{BEGIN}\n{text}{END}\n"
    results_md.write_text(doc)
    print(text)


if __name__ == "__main__":
    main()
