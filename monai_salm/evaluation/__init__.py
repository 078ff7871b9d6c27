"""Unauthorized-training evaluation: victims, baselines, countermeasures, reports and plots."""

from monai_salm.evaluation.baselines import error_minimizing_noise, one_pixel_shortcut, uniform_noise_in_mask
from monai_salm.evaluation.countermeasures import COUNTERMEASURES, parse_countermeasures
from monai_salm.evaluation.report import (
    markdown_table,
    plot_image_grid,
    plot_learning_curves,
    plot_sweep,
    summary_markdown,
    write_report,
)
from monai_salm.evaluation.victim import RECIPES, VICTIM_RECIPE, classification_metrics, relabel_map, train_victim

__all__ = [
    "COUNTERMEASURES",
    "RECIPES",
    "VICTIM_RECIPE",
    "classification_metrics",
    "error_minimizing_noise",
    "markdown_table",
    "one_pixel_shortcut",
    "parse_countermeasures",
    "plot_image_grid",
    "plot_learning_curves",
    "plot_sweep",
    "relabel_map",
    "summary_markdown",
    "train_victim",
    "uniform_noise_in_mask",
    "write_report",
]
