"""One-line log summaries of a checkpoint and of a manifest (the bundle's ``finalize`` steps)."""

from __future__ import annotations

import json
import logging
import os

import torch

from monai_salm.engines import SALMSettings
from monai_salm.io import read_manifest
from monai_salm.workflows.intensity import scaling_from_settings

__all__ = ["log_checkpoint", "log_manifest"]

logger = logging.getLogger(__name__)


def log_checkpoint(path: str | os.PathLike) -> dict:
    """Log (and return) a one-line summary of a checkpoint: epochs run, protected accuracy, budget, intensity."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    s, extra = payload["settings"], payload.get("extra", {})
    summary = {
        "checkpoint": str(path),
        "epochs_run": extra.get("epochs_run"),
        "protected_accuracy": extra.get("protected_accuracy"),
        "k": s["k"],
        "epsilon": s["epsilon"],
        "epsilon_in_original_units": scaling_from_settings(SALMSettings(**s)).epsilon_in_units(s["epsilon"]),
        "intensity": s["intensity"],
        "image_size": list(s["image_size"]),
        "num_classes": s["num_classes"],
    }
    logger.info(f"monai-salm checkpoint: {json.dumps(summary)}")
    return summary


def log_manifest(path: str | os.PathLike) -> dict:
    """Log (and return) a summary of a manifest: files, changed voxels, maximum change in original units."""
    entries = read_manifest(path)
    summary = {
        "manifest": str(path),
        "files": len(entries),
        "changed_voxels": int(sum(e.changed_voxels for e in entries)),
        "max_abs_change": max((e.max_abs_change for e in entries), default=0.0),
    }
    logger.info(f"protected copy: {json.dumps(summary)}")
    return summary
