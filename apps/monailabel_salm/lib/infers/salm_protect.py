"""The ``salm_protect`` MONAI Label inference task: return a SALM-protected copy of the requested image.

Add it to any MONAI Label app (see ``docs/monailabel.md``)::

    from lib.infers.salm_protect import SALMProtect

    def init_infers(self):
        return {"salm_protect": SALMProtect(self.conf.get("checkpoint"))}

Request: ``POST /infer/salm_protect?image=<id>&output=image`` (optional form field ``params={"class_index": N}``;
without it the surrogate's prediction on the clean image picks the class). Answer: the protected file, same format,
header, affine, shape and stored dtype as the image. ``output=json`` gives the summary (class used, changed
fraction, largest change, epsilon in original units). Errors are HTTP errors whose ``detail`` names the problem:
404 unknown image, 422 unreadable or corrupt file / image that does not fit the checkpoint / bad ``class_index``,
503 no usable checkpoint, 500 anything unexpected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .salm_core import SALMProtector, parse_class_index

__all__ = ["SALMProtect"]

logger = logging.getLogger(__name__)


class SALMProtect(InferTask):
    """MONAI Label inference task wrapping :class:`~.salm_core.SALMProtector`.

    The checkpoint is loaded once, when the app starts. A missing or invalid checkpoint does not stop the server:
    the task is left out of ``/info`` (``is_valid()`` is False) and each request to it answers 503 with the reason.

    Args:
        checkpoint: a monai-salm checkpoint (``monai-salm train --out``, or the bundle's ``models/model.pt``).
        device: torch device (``"cpu"``, ``"cuda"``); default: CUDA when available, else CPU.
        seed: seed of the random-mask ablation.
        description: shown by MONAI Label clients.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None,
        device: str | None = None,
        seed: int = 0,
        description: str = "Protect the image with SALM unlearnable noise (monai-salm); returns the protected copy",
    ) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.protector: SALMProtector | None = None
        self.error: str | None = None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.checkpoint is None:
            self.error = "no checkpoint configured (start the server with --conf checkpoint /path/to/salm.pt)"
        else:
            try:
                self.protector = SALMProtector(self.checkpoint, device=device, seed=seed)
            except Exception as e:  # noqa: BLE001 - keep the server up; each request explains the reason
                self.error = str(e)
        if self.error:
            logger.error(f"salm_protect is disabled: {self.error}")
        dims = self.protector.protection.settings.spatial_dims if self.protector else 3
        super().__init__(type=InferType.OTHERS, labels=None, dimension=dims, description=description,
                         config={"class_index": -1})

    def is_valid(self) -> bool:
        """Whether the checkpoint loaded."""
        return self.protector is not None

    def info(self) -> dict[str, Any]:
        """MONAI Label's task info plus ``salm``: epsilon, k, value range, intensity scaling, checkpoint."""
        info = super().info()
        info["salm"] = self.protector.describe() if self.protector else {
            "checkpoint": str(self.checkpoint) if self.checkpoint else None, "error": self.error}
        return info

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Protect ``request["image"]`` (a path: MONAI Label resolves the image id before calling the task).

        Args:
            request: MONAI Label's request; ``class_index`` (optional) picks the class, -1 or absent asks the
                surrogate.

        Returns:
            ``(protected file, summary)``; MONAI Label sends the file and removes it afterwards.

        Raises:
            HTTPException: 404 (image not found), 422 (unsupported, unreadable or corrupt file, image that does not
                fit the checkpoint, bad ``class_index``), 503 (no usable checkpoint), 500 (anything else).
        """
        if self.protector is None:
            raise HTTPException(status_code=503, detail=f"salm_protect is not available: {self.error}")
        image = request.get("image")
        if not image:  # MONAI Label maps an unknown image id to ""
            raise HTTPException(status_code=404, detail="salm_protect: image not found in the datastore (unknown id).")
        if not isinstance(image, (str, os.PathLike)):
            raise HTTPException(status_code=422, detail="salm_protect needs an image file, not an in-memory array.")
        try:
            class_index = parse_class_index(request.get("class_index"))
            result = self.protector.protect_file(image, class_index=class_index)
        except FileNotFoundError as e:
            raise HTTPException(status_code=404, detail=f"salm_protect: {e}") from e
        except ValueError as e:
            raise HTTPException(status_code=422, detail=f"salm_protect: {e}") from e
        except Exception as e:
            logger.exception("salm_protect failed")
            raise HTTPException(
                status_code=500, detail=f"salm_protect failed on {Path(image).name}: {type(e).__name__}: {e}"
            ) from e
        summary = {**result.to_json(), "checkpoint": str(self.checkpoint)}
        logger.info(f"salm_protect {Path(image).name}: {summary}")
        return str(result.output), summary
