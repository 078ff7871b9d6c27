"""Evaluation outputs: ``report.json``, a markdown summary and PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "markdown_table",
    "plot_image_grid",
    "plot_learning_curves",
    "plot_sweep",
    "summary_markdown",
    "write_report",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Render ``rows`` as a GitHub markdown table; floats get 3 decimals, missing cells a dash.

    Args:
        rows: one mapping per row.
        columns: keys to show, in order.
        headers: column titles (default: the keys).

    Returns:
        the table, one line per row, ending with a newline.
    """

    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(report: Mapping) -> str:
    """A short markdown summary of one victim report (from :func:`monai_salm.evaluation.train_victim`)."""
    recipe = report.get("recipe", {})
    cms = ", ".join(report.get("countermeasures", [])) or "none"
    lines = [
        f"# Victim {recipe.get('network', '?')} trained on {report.get('train_data', 'the given data')}",
        "",
        f"Tested on the clean test split of {report.get('test_data', 'the given data')}; "
        f"{report.get('train_n', '?')} training images; countermeasures: {cms}.",
        "",
        markdown_table(
            [
                *[{"epoch": f"selected on {name} ({sel['epoch']})" + (" (headline)" if name == report.get("selected_by")
                                                                      else ""),
                   "accuracy": sel["accuracy"], "balanced_accuracy": sel["balanced_accuracy"], "auc": sel["auc"]}
                  for name, sel in report.get("selected", {}).items()],
                {"epoch": "final", "accuracy": report["accuracy"], "auc": report["auc"],
                 "balanced_accuracy": report["balanced_accuracy"]},
                {"epoch": f"peak on test ({report.get('best_epoch', '?')})", "accuracy": report["best_accuracy"],
                 "auc": report["best_auc"]},
            ],
            ["epoch", "accuracy", "balanced_accuracy", "auc"],
        ),
        "The attacker received " + ", ".join(f"{k} ({v})" for k, v in report.get("release_splits", {}).items())
        + " from the release; validation sets: "
        + (", ".join(f"{k} ({v} images)" for k, v in report.get("validation", {}).items()) or "none") + ".",
        "",
        "Per-epoch history:",
        "",
        markdown_table(report["history"], ["epoch", "train_accuracy", "accuracy", "balanced_accuracy", "auc"]),
        "Recipe: " + ", ".join(f"{k}={v}" for k, v in recipe.items()) + f"; training took {report['train_seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot_learning_curves(
    histories: Mapping[str, Sequence[Mapping]], path: str | Path, chance: float | None = None, title: str = ""
) -> Path:
    """Plot clean-test accuracy (solid) and protected-train accuracy (dashed) per epoch, one colour per run.

    Args:
        histories: run label -> per-epoch history (``epoch``, ``accuracy`` and optionally ``train_accuracy``).
        path: PNG to write.
        chance: draw a chance-level line at this accuracy.
        title: figure title.

    Returns:
        the PNG path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for i, (label, history) in enumerate(histories.items()):
        color = f"C{i}"
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["accuracy"] for h in history], color=color, label=f"{label}: clean test")
        if all("train_accuracy" in h for h in history):
            ax.plot(epochs, [h["train_accuracy"] for h in history], color=color, ls="--", label=f"{label}: train")
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)


def plot_sweep(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """Line plot of ``(x, y)`` points per series (e.g. victim accuracy against k).

    Args:
        series: label -> points.
        path: PNG to write.
        xlabel: x axis label.
        ylabel: y axis label.
        title: figure title.

    Returns:
        the PNG path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_image_grid(
    clean: torch.Tensor, protected: torch.Tensor, masks: torch.Tensor | None, path: str | Path, title: str = ""
) -> Path:
    """One row per image: clean, protected, amplified difference and mask (middle slice for 3D).

    Args:
        clean: ``(N, C, *spatial)`` in [0, 1].
        protected: same shape.
        masks: ``(N, 1, *spatial)`` or ``None`` (then the changed positions are shown).
        path: PNG to write.
        title: figure title.

    Returns:
        the PNG path.
    """
    plt = _pyplot()
    diff = protected.float() - clean.float()
    if masks is None:
        masks = (diff.abs() > 0).any(1, keepdim=True)

    def view(t: torch.Tensor) -> np.ndarray:
        t = t[..., t.shape[-3] // 2, :, :] if t.ndim == 4 else t  # middle slice of a volume
        a = t.detach().cpu().float().numpy()
        return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)

    n = clean.shape[0]
    scale = float(diff.abs().max()) or 1.0
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.7 * n), squeeze=False)
    for i in range(n):
        panels = (view(clean[i]), view(protected[i]), view(diff[i] / (2 * scale) + 0.5), view(masks[i].float()))
        for ax, image, name in zip(axes[i], panels, ("clean", "protected", f"difference x{0.5 / scale:.0f}", "mask")):
            ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def write_report(report: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``summary.md`` and ``learning_curves.png`` for one victim run.

    Args:
        report: the dictionary returned by :func:`monai_salm.evaluation.train_victim` (plus any context keys).
        out_dir: folder, created if needed.

    Returns:
        ``{"report", "summary", "curves"}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.json", "summary": out / "summary.md", "curves": out / "learning_curves.png"}
    paths["report"].write_text(json.dumps(report, indent=2))
    paths["summary"].write_text(summary_markdown(report))
    plot_learning_curves({report.get("recipe", {}).get("network", "victim"): report["history"]}, paths["curves"])
    return paths
