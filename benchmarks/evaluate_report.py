"""Tables and plots of the evaluation against the competent attacker (run benchmarks/evaluate_matrix.py first).

    python benchmarks/evaluate_report.py RUN_DIR [--docs docs]

Reads RUN_DIR/results.jsonl and the protected copies, writes PNGs into DOCS/figures/ and replaces the part of
DOCS/results.md between the ``<!-- evaluation:begin -->`` / ``<!-- evaluation:end -->`` markers. The headline of
every cell is the clean-test result at the attacker's validation-selected epoch (AUC on binary sets, accuracy on
multi-class sets); seeds are reported as mean ± spread (half the range).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch

from monai_salm.api import protect_tensor, protection_stats
from monai_salm.data import changed_pixel_fraction, load_npz, split_arrays, structural_similarity, to_tensor
from monai_salm.engines import load_protection
from monai_salm.evaluation import markdown_table, plot_image_grid, plot_learning_curves

NAMES = {
    "clean": "clean (authorized user)",
    "salm": "SALM (default)",
    "salm_pixel": "SALM, single-pixel class mask, k=0.05, eps 28/255",
    "salm_k20": "SALM, 4x4 cells, k=0.2, eps 14/255",
    "random_noise": "uniform noise in SALM's mask",
    "random_mask": "random-mask SALM",
    "em": "full-image EM",
    "em_equal_psnr": "full-image EM at SALM's PSNR",
    "ops": "one-pixel shortcut (OPS)",
}
TITLES = {"breast": "BreastMNIST", "retina": "RetinaMNIST", "pneumonia": "PneumoniaMNIST (trimmed train)",
          "blood": "BloodMNIST", "adrenal": "AdrenalMNIST3D"}
#: MedMNIST v2 ResNet-18 (28) test AUC / ACC (3D: ResNet-18 3D)
PUBLISHED = {"breast": (0.901, 0.863), "retina": (0.717, 0.524), "pneumonia": (0.944, 0.854),
             "blood": (0.998, 0.958), "adrenal": (0.827, 0.721)}
BEGIN, END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def load_results(root: Path) -> dict[tuple, list[dict]]:
    """``(dataset, method, victim, countermeasures) -> [row per seed]`` (the last row of a seed wins)."""
    rows: dict[tuple, dict[int, dict]] = {}
    for line in (root / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("selected_accuracy") is None:  # rows of the earlier quick recipe
            continue
        key = (r["dataset"], r["method"], r["victim"], r["countermeasures"])
        rows.setdefault(key, {})[r.get("seed", 0)] = r
    return {key: list(seeds.values()) for key, seeds in rows.items()}


def complete_relabeling(row: dict, binary: bool) -> dict:
    """Add the relabelling attacker (``monai_salm.evaluation.relabel_map``) to a row from a report made before it.

    Binary sets: swapping the two scores turns AUC into 1 - AUC and every prediction into the other class, so the
    relabelling attacker's selection and test metrics follow exactly from the per-epoch history. Multi-class rows
    without it are marked ``relabeling = "not measured"``. The headline becomes the worst case over all settings.
    """
    row = dict(row, selected=dict(row.get("selected") or {}), headline_without_relabeling=None)
    if not row["selected"]:
        return row
    metric = "auc" if binary else "accuracy"
    row["headline_without_relabeling"] = max(sel[metric] for name, sel in row["selected"].items()
                                             if not name.endswith("_relabeled"))
    history = row["history"]
    if "relabeled" in history[0]:
        row["relabeling"] = "measured"
    elif binary:
        row["relabeling"] = "from history"
        for name in list(row["selected"]):
            best = max(history, key=lambda h: (max(h["val"][name]["auc"], 1 - h["val"][name]["auc"]), -h["epoch"]))
            swap = best["val"][name]["auc"] < 0.5
            row["selected"][name + "_relabeled"] = {
                "epoch": best["epoch"],
                **{k: (1 - best[k] if swap else best[k]) for k in ("accuracy", "balanced_accuracy", "auc")}}
    else:
        row["relabeling"] = "not measured"
    worst = max(row["selected"], key=lambda name: row["selected"][name][metric])
    row.update(selected_by=worst, selected_epoch=row["selected"][worst]["epoch"],
               **{f"selected_{k}": row["selected"][worst][k] for k in ("accuracy", "balanced_accuracy", "auc")})
    return row


@functools.cache
def split_images(path: Path, split: str) -> np.ndarray:
    return split_arrays(load_npz(path), split)[0]


def protection_row(root: Path, ds: str, name: str) -> dict:
    """PSNR, SSIM, changed fraction (train split) and wall time of one protected copy against the clean data."""
    path = root / ds / f"{name}.npz"
    if name == "clean" or not path.exists():
        return {}
    clean, prot = split_images(root / ds / "data.npz", "train"), split_images(path, "train")
    stats = protection_stats(clean, prot, 255.0)
    timing = root / ds / f"{name}.time.json"
    seconds = json.loads(timing.read_text())["protect_seconds"] if timing.exists() else None
    return {"psnr": stats["psnr_db"], "ssim": structural_similarity(clean, prot),
            "changed": 100 * changed_pixel_fraction(clean, prot), "seconds": seconds}


def headline(rows: list[dict] | None, binary: bool, key: str = "selected") -> tuple[float, float] | None:
    """Mean and spread (half the range) over seeds of the headline metric (``selected``, ``final`` or ``best``)."""
    if not rows:
        return None
    metric = "auc" if binary else "accuracy"
    name = {"selected": f"selected_{metric}", "final": metric, "best": f"best_{metric}"}[key]
    values = np.array([r[name] for r in rows], dtype=float)
    return float(values.mean()), float((values.max() - values.min()) / 2)


def fmt(value: tuple[float, float] | None, seeds: int = 1) -> str:
    if value is None:
        return "–"
    mean, spread = value
    return f"{mean:.3f} ± {spread:.3f} ({seeds} seeds)" if seeds > 1 else f"{mean:.3f}"


def retained(protected: float, clean: float, chance: float) -> float | None:
    """Share of the protection kept under a countermeasure: (clean - protected) / (clean - chance)."""
    return None if clean - chance <= 0 else (clean - protected) / (clean - chance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args()
    root, figures = args.root, args.docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    index = load_results(root)
    datasets = [ds for ds in TITLES if any(k[0] == ds for k in index)]
    info = {}
    for ds in datasets:
        with np.load(root / ds / "data.npz") as f:
            n = int(f["train_labels"].max()) + 1
            info[ds] = {"classes": n, "binary": n == 2, "train_n": len(f["train_labels"]),
                        "chance": 0.5 if n == 2 else 1 / n}
    index = {key: [complete_relabeling(r, info[key[0]]["binary"]) for r in runs] for key, runs in index.items()}
    out = []

    # ---- the attacker on clean data against the published figures
    out.append("### The attacker on clean data (authorized user) against MedMNIST v2\n")
    rows = []
    for ds in datasets:
        runs = index.get((ds, "clean", "resnet18", "none"))
        if not runs:
            continue
        auc = headline(runs, True)
        acc = float(np.mean([r["selected_accuracy"] for r in runs]))
        rows.append({"dataset": TITLES[ds], "train images": info[ds]["train_n"],
                     "epochs": runs[0]["recipe"]["epochs"], "published AUC / ACC": "%.3f / %.3f" % PUBLISHED[ds],
                     "ours AUC": fmt(auc, len(runs)), "ours ACC": acc, "AUC gap": auc[0] - PUBLISHED[ds][0],
                     "selected on": runs[0]["selected_by"]})
    out.append(markdown_table(rows, ["dataset", "train images", "epochs", "published AUC / ACC", "ours AUC",
                                     "ours ACC", "AUC gap", "selected on"]))

    # ---- methods
    out.append("\n### Methods, ResNet-18 attacker\n")
    out.append("Headline: clean-test AUC (binary sets) or accuracy (multi-class sets) at the attacker's "
               "validation-selected epoch, the best for the attacker of: protected or clean validation, each with "
               "and without relabelling the outputs on that validation set; its balanced accuracy (chance: "
               "1 / classes), the best without relabelling, the final and the peak epoch beside it. Relabelling: "
               "measured by the victim, derived exactly from the per-epoch history (binary sets, reports made before "
               "it), or not measured. Targets: AUC <= 0.65 on binary sets, accuracy <= 2x chance on multi-class "
               "sets.\n")
    rows = []
    for ds in datasets:
        binary = info[ds]["binary"]
        for method in NAMES:
            runs = index.get((ds, method, "resnet18", "none"))
            if not runs:
                continue
            p = protection_row(root, ds, method)
            sel = headline(runs, binary)
            target = 0.65 if binary else 2 * info[ds]["chance"]
            rows.append({"dataset": TITLES[ds], "method": NAMES[method], "headline": fmt(sel, len(runs)),
                         "balanced accuracy": float(np.mean([r["selected_balanced_accuracy"] for r in runs])),
                         "without relabeling": float(np.mean([r["headline_without_relabeling"] for r in runs])),
                         "relabeling": runs[0]["relabeling"],
                         "final": headline(runs, binary, "final")[0], "peak": headline(runs, binary, "best")[0],
                         "target met": "–" if method == "clean" else ("no" if sel[0] > target else "yes" if
                                                                      runs[0]["relabeling"] != "not measured" else
                                                                      "yes, relabeling not measured"),
                         "PSNR dB": p.get("psnr"), "SSIM": p.get("ssim"), "changed %": p.get("changed"),
                         "train+protect s": None if p.get("seconds") is None else round(p["seconds"])})
    out.append(markdown_table(rows, ["dataset", "method", "headline", "balanced accuracy", "without relabeling",
                                     "relabeling", "final", "peak", "target met", "PSNR dB", "SSIM", "changed %",
                                     "train+protect s"]))

    # ---- countermeasures
    cms = sorted({k[3] for k in index if k[3] != "none"})
    if cms:
        out.append("\n### Countermeasures (ResNet-18 attacker)\n")
        out.append("Retained = (clean - protected) / (clean - chance), both with the same countermeasure; target "
                   ">= 0.5.\n")
        rows = []
        for ds in datasets:
            binary, chance = info[ds]["binary"], info[ds]["chance"]
            for cm in ["none", *cms]:
                prot = headline(index.get((ds, "salm", "resnet18", cm)), binary)
                clean = headline(index.get((ds, "clean", "resnet18", cm)), binary)
                if prot is None:
                    continue
                kept = retained(prot[0], clean[0], chance) if clean else None
                rows.append({"dataset": TITLES[ds], "countermeasure": cm, "SALM": prot[0],
                             "clean + same countermeasure": None if clean is None else clean[0], "retained": kept,
                             "met": "–" if kept is None else ("yes" if kept >= 0.5 else "no")})
        out.append(markdown_table(rows, ["dataset", "countermeasure", "SALM", "clean + same countermeasure",
                                         "retained", "met"]))

    # ---- cross-architecture
    victims = sorted({k[2] for k in index if k[2] != "resnet18"})
    if victims:
        out.append("\n### Other attacker architectures (surrogate ResNet-18)\n")
        rows = []
        for ds in datasets:
            for method in ("clean", "salm"):
                cells = {v: headline(index.get((ds, method, v, "none")), info[ds]["binary"])
                         for v in ["resnet18", *victims]}
                if sum(c is not None for c in cells.values()) > 1:
                    rows.append({"dataset": TITLES[ds], "method": NAMES[method],
                                 **{v: None if c is None else c[0] for v, c in cells.items()}})
        out.append(markdown_table(rows, ["dataset", "method", "resnet18", *victims]))

    # ---- legitimate readers
    rows = []
    for ds in datasets:
        for r in index.get((ds, "clean", "resnet18", "none"), []):
            for path, reader in (r.get("reader") or {}).items():
                rows.append({"dataset": TITLES[ds], "release": Path(path).stem, "clean test accuracy":
                             reader["clean_accuracy"], "protected test accuracy": reader["protected_accuracy"],
                             "change (points)": 100 * reader["accuracy_change"]})
    if rows:
        out.append("\n### Legitimate readers: a model trained on clean data reading the release\n")
        out.append(markdown_table(rows, ["dataset", "release", "clean test accuracy", "protected test accuracy",
                                         "change (points)"]))

    # ---- learning curves and image grids
    for ds in datasets:
        hist = {NAMES[m]: index[(ds, m, "resnet18", "none")][0]["history"] for m in NAMES
                if (ds, m, "resnet18", "none") in index}
        if hist:
            plot_learning_curves(hist, figures / f"curves_{ds}.png", chance=1 / info[ds]["classes"],
                                 title=f"{TITLES[ds]}: ResNet-18 attacker")
        ckpt = root / ds / "salm.pt"
        if ckpt.exists():
            settings, generator, surrogate, scores = load_protection(ckpt)
            clean, labels = split_arrays(load_npz(root / ds / "data.npz"), "train")
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
    doc = results_md.read_text() if results_md.exists() else ""
    if BEGIN in doc:
        doc = doc[: doc.index(BEGIN) + len(BEGIN)] + "\n" + text + doc[doc.index(END):]
    else:
        doc += f"\n{BEGIN}\n{text}{END}\n"
    results_md.write_text(doc)
    print(text)


if __name__ == "__main__":
    main()
